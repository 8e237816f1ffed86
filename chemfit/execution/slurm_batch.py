"""The batch options of executors whose workers run as Slurm jobs, and the scripts they give.

:class:`SlurmBatchOptions` holds what ``make_executor(..., engines="slurm")`` and
``make_executor("dask", cluster="slurm")`` take as keyword arguments (``partition``, ``time``,
``cores``, ``memory``, ``account``, ``extra_directives``, ``job_name``, ``prologue``,
``srun_mpi``); it checks them before anything is submitted, so that a bad time limit or memory
size is named at once instead of as an ``sbatch`` error. From them come the batch script of
ipyparallel's Slurm engines (:func:`engine_script_template`, :func:`render_engine_script`) and
the keyword arguments of dask-jobqueue's ``SLURMCluster`` (:func:`dask_jobqueue_options`).
:func:`explain_sbatch_error` turns what ``sbatch`` prints into plain words, and
:func:`host_address` is the address of this host that compute nodes can reach.

Nothing here imports ipyparallel or dask.
"""

from __future__ import annotations

import logging
import math
import re
import socket
from dataclasses import dataclass, field, fields
from typing import Any

__all__ = [
    "BATCH_OPTION_NAMES",
    "SlurmBatchOptions",
    "dask_jobqueue_options",
    "engine_script_template",
    "explain_sbatch_error",
    "host_address",
    "render_engine_script",
    "split_batch_options",
]

logger = logging.getLogger(__name__)

# sbatch's time formats: "minutes", "minutes:seconds", "hours:minutes:seconds", "days-hours",
# "days-hours:minutes" and "days-hours:minutes:seconds".
_TIME = re.compile(
    r"^(\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+|\d+-\d+:\d{1,2}|\d+-\d+:\d{1,2}:\d{1,2})$"
)
_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_MB_PER_UNIT = {"k": 1 / 1024, "": 1, "m": 1, "g": 1024, "t": 1024 * 1024}
_DIRECTIVE = re.compile(r"^\s*#SBATCH\s+")


def _check_time(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return str(value)
    if isinstance(value, str) and _TIME.match(value.strip()):
        return value.strip()
    raise ValueError(
        f"time={value!r} is not a Slurm time limit; write minutes (time=90 or '90'), "
        "'HH:MM:SS' ('01:30:00') or 'D-HH:MM:SS' ('1-00:00:00')"
    )


def memory_megabytes(value: Any) -> int | None:
    """A memory size in whole megabytes (MiB, as Slurm counts them).

    Parameters
    ----------
    value : int, str or None
        An int is megabytes; a string has an optional unit: ``"500M"``, ``"2GB"``, ``"1.5GiB"``.

    Examples
    --------
    >>> memory_megabytes("2GB"), memory_megabytes("500M"), memory_megabytes(750)
    (2048, 500, 750)
    >>> memory_megabytes("lots")
    Traceback (most recent call last):
    ...
    ValueError: memory='lots' is not a memory size; write e.g. memory='2GB', '500MB' or 2048 (megabytes)
    """
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = _MEMORY.match(value) if isinstance(value, str) else None
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(
            f"memory={value!r} is not a memory size; write e.g. memory='2GB', '500MB' or 2048 "
            "(megabytes)"
        )
    return max(1, math.ceil(float(match.group(1)) * _MB_PER_UNIT[match.group(2).lower()]))


def _directive(line: Any) -> str:
    if not isinstance(line, str) or "\n" in line or not line.strip():
        raise ValueError(
            f"extra_directives must be single lines such as '--qos=short' or "
            f"'#SBATCH --constraint=haswell', got {line!r}"
        )
    line = line.strip()
    if _DIRECTIVE.match(line):
        return line
    if line.startswith("-"):
        return f"#SBATCH {line}"
    raise ValueError(
        f"extra directive {line!r} is not an sbatch option; write it as '--option=value' or "
        "'#SBATCH --option=value'"
    )


def _lines(value: Any, name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    lines = tuple(value)
    for line in lines:
        if not isinstance(line, str):
            raise TypeError(f"{name} must be a string or a list of strings, got {line!r}")
    return lines


@dataclass(frozen=True)
class SlurmBatchOptions:
    """What a Slurm job of engines or Dask workers asks for.

    Parameters
    ----------
    partition : str, optional
        ``--partition``; ``None``: the cluster's default partition.
    time : str or int, optional
        ``--time``, the job's time limit: minutes, ``"HH:MM:SS"`` or ``"D-HH:MM:SS"``.
    cores : int
        Cores per engine (per Dask worker): ``--cpus-per-task``.
    memory : str or int, optional
        Memory per engine (per Dask worker), e.g. ``"2GB"``; an int is megabytes.
    account : str, optional
        ``--account`` to charge.
    extra_directives : list of str
        More ``#SBATCH`` lines, as ``"--qos=short"`` or ``"#SBATCH --qos=short"``.
    job_name : str, optional
        ``--job-name``; by default ``chemfit-engines-<cluster id>`` (Dask: ``chemfit-dask``).
    prologue : list of str
        Shell lines run before the engines start, e.g. ``"module load python"``.
    srun_mpi : str
        The ``srun --mpi=`` plugin for MPI engines (``"pmi2"`` suits the MPICH wheel; use
        ``"pmix"`` for an Open MPI built with PMIx, ``None`` for the cluster's default).

    Examples
    --------
    >>> options = SlurmBatchOptions(partition="short", time="0:30:00", cores=2, memory="4GB")
    >>> print("\\n".join(options.directives(n_tasks=2)))
    #SBATCH --ntasks=2
    #SBATCH --cpus-per-task=2
    #SBATCH --mem-per-cpu=2048M
    #SBATCH --partition=short
    #SBATCH --time=0:30:00
    >>> SlurmBatchOptions(time="1h")
    Traceback (most recent call last):
    ...
    ValueError: time='1h' is not a Slurm time limit; write minutes (time=90 or '90'), 'HH:MM:SS' ('01:30:00') or 'D-HH:MM:SS' ('1-00:00:00')
    """

    partition: str | None = None
    time: str | int | None = None
    cores: int = 1
    memory: str | int | None = None
    account: str | None = None
    extra_directives: tuple[str, ...] = field(default=())
    job_name: str | None = None
    prologue: tuple[str, ...] = field(default=())
    srun_mpi: str | None = "pmi2"

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise in place once
        set_(self, "time", _check_time(self.time))
        if isinstance(self.cores, bool) or not isinstance(self.cores, int) or self.cores < 1:
            raise ValueError(f"cores must be a positive int (cores per engine), got {self.cores!r}")
        memory_megabytes(self.memory)
        for name in ("partition", "account", "job_name", "srun_mpi"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"{name} must be a non-empty string or None, got {value!r}")
            if isinstance(value, str) and re.search(r"\s", value.strip()):
                raise ValueError(f"{name}={value!r} must not contain spaces")
        set_(
            self,
            "extra_directives",
            tuple(_directive(line) for line in _lines(self.extra_directives, "extra_directives")),
        )
        set_(self, "prologue", _lines(self.prologue, "prologue"))

    @property
    def memory_mb(self) -> int | None:
        """Memory per engine in megabytes (``None``: not asked for)."""
        return memory_megabytes(self.memory)

    def directives(self, n_tasks: int | None = None) -> list[str]:
        """The ``#SBATCH`` lines for a job of ``n_tasks`` engines (no ``--ntasks`` if ``None``)."""
        lines = []
        if n_tasks is not None:
            lines.append(f"#SBATCH --ntasks={n_tasks}")
        lines.append(f"#SBATCH --cpus-per-task={self.cores}")
        if self.memory_mb is not None:
            # Slurm has no memory per task: ask per core, which gives each engine its share.
            lines.append(f"#SBATCH --mem-per-cpu={math.ceil(self.memory_mb / self.cores)}M")
        if self.partition:
            lines.append(f"#SBATCH --partition={self.partition}")
        if self.time:
            lines.append(f"#SBATCH --time={self.time}")
        if self.account:
            lines.append(f"#SBATCH --account={self.account}")
        lines.extend(self.extra_directives)
        return lines


#: The keyword arguments of ``make_executor`` that are batch options.
BATCH_OPTION_NAMES: tuple[str, ...] = tuple(f.name for f in fields(SlurmBatchOptions))


def split_batch_options(options: dict) -> tuple[SlurmBatchOptions, dict]:
    """Take the batch options out of ``options``: ``(SlurmBatchOptions, the rest)``.

    Examples
    --------
    >>> batch, rest = split_batch_options({"partition": "debug", "timeout": 60})
    >>> batch.partition, rest
    ('debug', {'timeout': 60})
    """
    batch = {k: v for k, v in options.items() if k in BATCH_OPTION_NAMES}
    rest = {k: v for k, v in options.items() if k not in BATCH_OPTION_NAMES}
    return SlurmBatchOptions(**batch), rest


def _escape(text: str) -> str:
    """Braces of user text survive ipyparallel's template formatting."""
    return text.replace("{", "{{").replace("}", "}}")


def engine_script_template(options: SlurmBatchOptions, *, mpi: bool) -> str:
    """The batch script template for ipyparallel's ``SlurmEngineSetLauncher.batch_template``.

    ipyparallel fills in ``{n}``, ``{cluster_id}``, ``{output_file}`` and
    ``{program_and_args}``. ``srun`` starts the ``{n}`` engines as the job's tasks; with ``mpi``
    they form one MPI world through ``srun --mpi=<srun_mpi>``.

    Examples
    --------
    >>> text = engine_script_template(SlurmBatchOptions(partition="debug"), mpi=True)
    >>> print(text.splitlines()[-1].split(" --IPEngine")[0])
    srun --mpi=pmi2 --cpus-per-task=1 {program_and_args} --mpi
    """
    name = _escape(options.job_name) if options.job_name else "chemfit-engines-{cluster_id}"
    lines = [
        "#!/bin/sh",
        f"#SBATCH --job-name={name}",
        *(_escape(line) for line in options.directives()),
        "#SBATCH --ntasks={n}",
        "#SBATCH --output={output_file}",
        "#SBATCH --export=ALL",
        *(_escape(line) for line in options.prologue),
    ]
    srun = ["srun"]
    if mpi and options.srun_mpi:
        srun.append(f"--mpi={options.srun_mpi}")
    # srun does not take --cpus-per-task from sbatch on every Slurm version: repeat it.
    srun.append(f"--cpus-per-task={options.cores}")
    # --mpi: the engine joins the MPI world (rank = engine order) instead of ignoring it.
    engine = "{program_and_args}" + (" --mpi" if mpi else "") + " " + _EXIT_ON_SIGTERM
    lines.append(" ".join(srun) + " " + engine)
    return "\n".join(lines) + "\n"


# An engine busy in a call does not stop on Slurm's SIGTERM (ipyparallel's handler waits for the
# call), so a cancelled job would hold its nodes for Slurm's KillWait (30 s by default).
_EXIT_ON_SIGTERM = (
    "--IPEngine.startup_command=\"__import__('chemfit.execution.slurm_batch', "
    "fromlist=['_']).exit_on_sigterm()\""
)


def exit_on_sigterm() -> None:
    """Engine side: end this process at once on SIGTERM (``scancel``), even in a call.

    Run by the engines of ``engines="slurm"`` at start-up, after ipyparallel has set its own
    handler.
    """
    import os
    import signal

    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(128 + signum))


def render_engine_script(
    options: SlurmBatchOptions,
    *,
    n: int,
    mpi: bool,
    cluster_id: str = "CLUSTER_ID",
    output_file: str = "engines.log",
    program_and_args: str = "python -m ipyparallel.engine",
) -> str:
    """The batch script ipyparallel submits for ``n`` engines (the template filled in).

    Examples
    --------
    >>> script = render_engine_script(SlurmBatchOptions(time=30), n=2, mpi=False, cluster_id="c1")
    >>> print(script)
    #!/bin/sh
    #SBATCH --job-name=chemfit-engines-c1
    #SBATCH --cpus-per-task=1
    #SBATCH --time=30
    #SBATCH --ntasks=2
    #SBATCH --output=engines.log
    #SBATCH --export=ALL
    srun --cpus-per-task=1 python -m ipyparallel.engine --IPEngine.startup_command="__import__('chemfit.execution.slurm_batch', fromlist=['_']).exit_on_sigterm()"
    <BLANKLINE>
    """
    return engine_script_template(options, mpi=mpi).format(
        n=n, cluster_id=cluster_id, output_file=output_file, program_and_args=program_and_args
    )


def dask_jobqueue_options(options: SlurmBatchOptions) -> dict:
    """Keyword arguments for dask-jobqueue's ``SLURMCluster``: one worker process per job.

    Examples
    --------
    >>> kwargs = dask_jobqueue_options(SlurmBatchOptions(partition="debug", cores=2, time="10"))
    >>> kwargs["queue"], kwargs["cores"], kwargs["processes"], kwargs["memory"], kwargs["walltime"]
    ('debug', 2, 1, '2048MiB', '10')
    """
    memory_mb = options.memory_mb if options.memory_mb is not None else 1024 * options.cores
    kwargs: dict[str, Any] = {
        "cores": options.cores,
        "processes": 1,
        "memory": f"{memory_mb}MiB",
        "job_name": options.job_name or "chemfit-dask",
        "job_extra_directives": [_DIRECTIVE.sub("", line) for line in options.extra_directives],
        "job_script_prologue": list(options.prologue),
    }
    if options.partition:
        kwargs["queue"] = options.partition
    if options.account:
        kwargs["account"] = options.account
    if options.time:
        kwargs["walltime"] = options.time
    return kwargs


_SBATCH_ERRORS = (
    (
        re.compile(r"invalid partition specified:?\s*(\S*)", re.IGNORECASE),
        "Slurm has no partition {0!r}. Choose one that `sinfo -s` lists, or leave partition "
        "empty for the cluster's default",
    ),
    (
        re.compile(r"invalid time limit specification", re.IGNORECASE),
        "Slurm refused the time limit. Write minutes ('90'), 'HH:MM:SS' or 'D-HH:MM:SS'",
    ),
    (
        re.compile(r"requested time limit is invalid", re.IGNORECASE),
        "the time limit is longer than the partition allows (`sinfo -s` shows its limit); "
        "ask for less time or choose another partition",
    ),
    (
        re.compile(r"invalid account", re.IGNORECASE),
        "Slurm does not know this account, or you may not charge it; `sacctmgr show assoc "
        "user=$USER` lists yours",
    ),
    (
        re.compile(r"Requested node configuration is not available", re.IGNORECASE),
        "no node of the partition has that many cores or that much memory per engine; ask for "
        "fewer cores or less memory",
    ),
    (
        re.compile(r"More processors requested than permitted", re.IGNORECASE),
        "the partition does not allow that many cores; ask for fewer engines or cores",
    ),
    (
        re.compile(r"QOSMax|qos", re.IGNORECASE),
        "the job breaks a limit of its QOS (quality of service); ask for fewer resources or "
        "another --qos in extra_directives",
    ),
    (
        re.compile(r"Unable to contact slurm controller", re.IGNORECASE),
        "the Slurm controller does not answer: Slurm is down, or this machine is not a login "
        "node of the cluster",
    ),
)


def explain_sbatch_error(output: str) -> str:
    """What an ``sbatch`` error means, in plain words, followed by what it said.

    Examples
    --------
    >>> print(explain_sbatch_error("sbatch: error: invalid partition specified: gpu"))
    Slurm has no partition 'gpu'. Choose one that `sinfo -s` lists, or leave partition empty for the cluster's default (sbatch said: sbatch: error: invalid partition specified: gpu)
    """
    said = " ".join(line.strip() for line in output.strip().splitlines() if line.strip())
    for pattern, text in _SBATCH_ERRORS:
        match = pattern.search(output)
        if match:
            return f"{text.format(*match.groups())} (sbatch said: {said})"
    return f"sbatch refused the job (sbatch said: {said or 'nothing'})"


def host_address() -> str:
    """This host's address that compute nodes can reach: the one its name resolves to, or the
    one of the interface that routes out of this host; ``127.0.0.1`` (with a warning) when
    there is none.

    Examples
    --------
    >>> socket.inet_aton(host_address()) is not None
    True
    """
    try:
        address = socket.gethostbyname(socket.gethostname())
    except OSError:
        address = ""
    if address and not address.startswith("127."):
        return address
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        # A UDP connect sends nothing: it only picks the interface that routes out.
        probe.connect(("198.51.100.1", 9))
        address = probe.getsockname()[0]
    except OSError:
        address = ""
    finally:
        probe.close()
    if address and not address.startswith(("127.", "0.")):
        return address
    logger.warning(
        "found no address of this host other than 127.0.0.1: engines on other nodes cannot "
        "reach the controller; pass controller_ip= the address of this host's cluster network"
    )
    return "127.0.0.1"
