"""Against the real single-node Slurm that ``.ci/slurm-up`` starts (issue 16).

* a script run as ``__main__`` (models defined there, as in a notebook cell) fits on two
  ipyparallel engines started as a Slurm job, on two MPI engines started by ``srun`` (one world
  of size 2, ``MPIWrapperCOB`` on every rank) and on two Dask ``SLURMCluster`` workers; each
  reproduces the serial fit, and after each executor closes no job is queued;
* ``scancel`` of the engines' (workers') job mid-fit ends the fit within 10 s with an error
  naming the job, the history and the JSON-lines checkpoint kept (every record, once), and a
  new fit resumes from the checkpoint;
* with ``retries``, a fit goes on when one Dask worker's job is cancelled (each is its own job);
* Dask on Slurm speaks TLS with a per-cluster certificate kept in a private folder;
* ``sbatch`` refusing a job (an unknown partition) is said in plain words.

Every test has a timeout and checks that no job and no process of a job is left. Without
Slurm they skip, unless ``CHEMFIT_REQUIRE_SLURM=1`` (CI), where they fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from tests.helpers import main_defined_models as mh
from tests.helpers.slurm import require_slurm, slurm_step_processes, wait_no_jobs

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform != "linux", reason="Slurm and /proc: Linux only"),
]


@pytest.fixture
def slurm():
    require_slurm()
    yield
    left = wait_no_jobs(15)
    steps = slurm_step_processes()
    if left:
        subprocess.run(["scancel", *(line.split()[0] for line in left)], check=False)
    assert not left, f"Slurm jobs left in squeue: {left}"
    assert not steps, f"processes of Slurm jobs left running: {steps}"


# -- the __main__ script: a fit on each route -------------------------------------------------------

SCRIPT_MAIN = """

def _route(make, check):
    import time
    from tests.helpers.slurm import wait_no_jobs

    start = time.perf_counter()
    executor = make()
    ready = time.perf_counter() - start
    try:
        got = check(executor)
    finally:
        executor.shutdown()
    got["ready_seconds"] = round(ready, 2)
    got["left_in_squeue"] = wait_no_jobs(15)
    return got


if __name__ == "__main__":
    import json
    from chemfit.executors import make_executor
    from tests.helpers import main_defined_models as mh

    ns = globals()
    reference = mh.reference_fit(ns)
    report = {"reference": reference}
    batch = {"partition": "debug", "time": "10", "cores": 1, "memory": "400M"}

    def fit_engines(ex):
        info = {"job_id": ex.job_id, "state": ex.job_state, "repr": repr(ex),
                "script": ex.slurm_job.script_text}
        got = mh.fit_on(ns, ex)
        mh.check_fit(ns, got, reference, "Slurm engines")
        return {**got, **info}

    def fit_mpi(ex):
        info = {"job_id": ex.job_id, "engines": ex.engines, "mpi_size": ex.mpi_size,
                "script": ex.slurm_job.script_text}
        return {**mh.check_mpi_fit(ns, ex, reference), **info}

    def fit_dask(ex):
        info = {"job_ids": ex.job_ids, "states": ex.job_states, "script": ex.batch_script,
                "dashboard": ex.dashboard_link, "repr": repr(ex)}
        got = mh.fit_on(ns, ex)
        mh.check_fit(ns, got, reference, "Dask on Slurm")
        return {**got, **info}

    mh.section(report, "engines", _route,
               lambda: make_executor("ipyparallel", 2, engines="slurm", **batch), fit_engines)
    mh.section(report, "mpi", _route,
               lambda: make_executor("ipyparallel", 2, engines="slurm", mpi=True, **batch), fit_mpi)
    mh.section(report, "dask", _route,
               lambda: make_executor("dask", 2, cluster="slurm", **batch), fit_dask)
    print("REPORT " + json.dumps(report, default=str), flush=True)
"""


def _report(text: str) -> dict:
    lines = [line for line in text.splitlines() if line.startswith("REPORT ")]
    assert lines, f"no report in the output:\n{text[-4000:]}"
    return json.loads(lines[-1][len("REPORT ") :])


@pytest.mark.timeout(400)
def test_main_defined_models_fit_on_slurm_engines_mpi_engines_and_dask_workers(slurm, tmp_path):
    script = tmp_path / "fit_on_slurm.py"
    script.write_text(mh.MODELS + SCRIPT_MAIN)
    tag = uuid.uuid4().hex
    paths = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), mh.TAG_VARIABLE: tag}
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=360)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        left = mh.wait_until_gone(tag, seconds=20)  # the jobs inherit the tag (--export=ALL)
        mh.kill_tagged(tag)
    assert not left, f"processes left behind: {left}"
    report = _report(output)
    assert not report.get("errors"), "failed:\n" + "\n\n".join(report["errors"].values())

    engines, mpi, dask = report["engines"], report["mpi"], report["dask"]
    # The batch scripts carry the options given, and srun starts the engines.
    for script_text in (engines["script"], mpi["script"]):
        assert "#SBATCH --partition=debug" in script_text
        assert "#SBATCH --time=10" in script_text
        assert "#SBATCH --cpus-per-task=1" in script_text
        assert "#SBATCH --ntasks=2" in script_text
        assert "#SBATCH --mem-per-cpu=400M" in script_text
    assert "srun --cpus-per-task=1" in engines["script"]
    assert "srun --mpi=pmi2" in mpi["script"] and "ipyparallel.engine --mpi" in mpi["script"]
    assert "#SBATCH -p debug" in dask["script"] and "#SBATCH -t 10" in dask["script"]
    assert "#SBATCH --cpus-per-task=1" in dask["script"] and "#SBATCH --mem=400M" in dask["script"]
    # Job ids and states are visible; the MPI engines are one world of size 2.
    assert engines["job_id"] and engines["state"] == "RUNNING"
    assert f"Slurm job {engines['job_id']} RUNNING" in engines["repr"]
    assert mpi["mpi_size"] == 2
    ranks = sorted((info["mpi_rank"], info["mpi_size"]) for info in mpi["engines"].values())
    assert ranks == [(0, 2), (1, 2)]
    assert len(dask["job_ids"]) == 2 and set(dask["states"].values()) == {"RUNNING"}
    assert dask["dashboard"].startswith("http://127.0.0.1:")
    # Closing each executor left no job queued.
    for name in ("engines", "mpi", "dask"):
        assert report[name]["left_in_squeue"] == [], (name, report[name]["left_in_squeue"])
    print(
        "ready in s: engines {} / MPI engines {} / Dask workers {}; whole script {:.1f} s".format(
            engines["ready_seconds"],
            mpi["ready_seconds"],
            dask["ready_seconds"],
            time.perf_counter() - start,
        )
    )


# -- a job cancelled mid-fit ------------------------------------------------------------------------


def _slow_objective(seconds: float):
    from chemfit import CombinedObjectiveFunction
    from tests.helpers.slurm_objectives import SlowTerm

    return CombinedObjectiveFunction([SlowTerm(seconds)])


def _fit_and_cancel(
    executor, job_ids: list[str], checkpoint: Path
) -> tuple[BaseException, float, int]:
    """Run a fit on ``executor`` with a JSON-lines checkpoint, scancel ``job_ids`` after 3
    evaluations; the error, the seconds from scancel to the fit's end, and the records kept in
    the history. The checkpoint must hold every record, and a new fit resumes from it."""
    from chemfit import Fitter
    from chemfit.fitter_callbacks import JSONLinesHistory

    fitter = Fitter(_slow_objective(0.3), {"x": 0.5}, bounds={"x": (0.0, 1.0)})
    fitter.register_evaluation_callback(JSONLinesHistory(checkpoint))
    outcome: dict = {}

    def run():
        try:
            fitter.fit_nevergrad(budget=500, num_workers=2, executor=executor, progress=False)
        except BaseException as exc:
            outcome["error"] = exc
        outcome["end"] = time.monotonic()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while len(fitter.history) < 3 and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.05)
    assert len(fitter.history) >= 3, f"the fit did not start: {outcome}"
    cancelled = time.monotonic()
    subprocess.run(["scancel", *job_ids], check=True)
    thread.join(timeout=30)
    assert not thread.is_alive(), "the fit still runs 30 s after scancel"
    assert "error" in outcome, "the fit ended without an error after its job was cancelled"
    _resume_from(checkpoint, fitter.history)
    return outcome["error"], outcome["end"] - cancelled, len(fitter.history)


def _resume_from(checkpoint: Path, history) -> None:
    """The checkpoint holds exactly the history's records, and a new fit (on threads, as after
    a cancelled job) resumes from it."""
    from chemfit import Fitter
    from chemfit.fitter_callbacks import load_observations

    lines = [json.loads(line) for line in checkpoint.read_text().splitlines() if line.strip()]
    assert [line["index"] for line in lines] == [record.index for record in history]
    observations = load_observations(checkpoint)
    assert len(observations) == len(history)
    fitter = Fitter(_slow_objective(0.0), {"x": 0.5}, bounds={"x": (0.0, 1.0)})
    fitter.fit_nevergrad(budget=2, initial_observations=observations, progress=False)
    best = min(record.loss for record in history)
    assert fitter.result.best_loss <= best


@pytest.mark.timeout(120)
def test_scancel_of_the_engines_job_mid_fit_ends_the_fit_naming_the_job(slurm, tmp_path):
    from chemfit.core.exceptions import WorkerLostError
    from chemfit.executors import make_executor

    with make_executor("ipyparallel", 2, engines="slurm", time="5") as executor:
        job_id = executor.job_id
        error, seconds, kept = _fit_and_cancel(executor, [job_id], tmp_path / "fit.jsonl")
        assert executor.job_state == "CANCELLED"
    assert isinstance(error, WorkerLostError), repr(error)
    assert f"Slurm job {job_id}" in str(error) and "CANCELLED" in str(error), str(error)
    assert seconds < 10, f"the fit took {seconds:.1f} s to end after scancel"
    assert kept >= 3
    print(f"the fit ended {seconds:.1f} s after scancel, {kept} records kept")


@pytest.mark.timeout(120)
def test_scancel_of_the_dask_workers_jobs_mid_fit_ends_the_fit_naming_them(slurm, tmp_path):
    from chemfit.core.exceptions import WorkerLostError
    from chemfit.executors import make_executor

    with make_executor("dask", 2, cluster="slurm", time="5") as executor:
        job_ids = executor.job_ids
        error, seconds, kept = _fit_and_cancel(executor, job_ids, tmp_path / "fit.jsonl")
    assert isinstance(error, WorkerLostError), repr(error)
    assert all(f"{job_id} (CANCELLED)" in str(error) for job_id in job_ids), str(error)
    assert seconds < 10, f"the fit took {seconds:.1f} s to end after scancel"
    assert kept >= 3
    print(f"the fit ended {seconds:.1f} s after scancel, {kept} records kept")


@pytest.mark.timeout(180)
def test_with_retries_the_fit_goes_on_when_one_dask_workers_job_is_cancelled(slurm, tmp_path):
    """Each Dask worker is its own Slurm job: one cancelled mid-fit leaves the other, and with
    ``retries`` the fit finishes its budget there, every evaluation recorded once."""
    from chemfit import Fitter
    from chemfit.executors import make_executor

    cancelled: list[str] = []

    def cancel_one_job(record) -> None:
        if record.index == 3 and not cancelled:
            cancelled.append(job_ids[0])
            subprocess.run(["scancel", job_ids[0]], check=True)

    with make_executor("dask", 2, cluster="slurm", time="5") as executor:
        job_ids = executor.job_ids
        fitter = Fitter(_slow_objective(0.2), {"x": 0.5}, bounds={"x": (0.0, 1.0)})
        fitter.register_evaluation_callback(cancel_one_job)
        fitter.fit_nevergrad(budget=16, num_workers=2, executor=executor, retries=2, progress=False)
        states = executor.job_states
    assert cancelled and states[job_ids[0]] == "CANCELLED", states
    assert [record.index for record in fitter.history] == list(range(16))
    assert fitter.result.n_ok == 16, [(r.status, r.error) for r in fitter.history]


# -- Dask on Slurm speaks TLS ----------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_dask_on_slurm_speaks_tls_with_a_key_only_this_user_reads(slurm):
    """The scheduler listens on an address other hosts reach: only TLS with this cluster's own
    certificate gets in, and the workers' key is in a private folder."""
    distributed = pytest.importorskip("distributed")
    pytest.importorskip("cryptography")
    from chemfit.executors import make_executor

    with make_executor("dask", 1, cluster="slurm", time="5") as executor:
        folder = Path(executor.log_directory)
        address = executor.cluster.scheduler_address
        assert address.startswith("tls://"), address
        assert list(executor.map(abs, [-3])) == [3]
        assert folder.stat().st_mode & 0o077 == 0, oct(folder.stat().st_mode)
        keys = sorted(folder.glob("tls-*.pem"))
        assert [key.name for key in keys] == ["tls-cert.pem", "tls-key.pem"], keys
        assert all(key.stat().st_mode & 0o077 == 0 for key in keys)
        assert "tls-key.pem" in executor.batch_script, executor.batch_script
        with pytest.raises((OSError, TimeoutError)):
            distributed.Client(address.replace("tls://", "tcp://"), timeout=3)
        with pytest.raises((OSError, TimeoutError, TypeError)):
            distributed.Client(address, timeout=3)  # TLS, but without the certificate
    assert not folder.exists()  # the key goes with the executor


# -- sbatch refusing a job ----------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["ipyparallel", "dask"])
def test_an_unknown_partition_is_said_in_plain_words(slurm, kind):
    from chemfit.execution.slurm_engines import SlurmSubmitError
    from chemfit.executors import make_executor

    options = {"engines": "slurm"} if kind == "ipyparallel" else {"cluster": "slurm"}
    with pytest.raises(SlurmSubmitError) as caught:
        make_executor(kind, 2, partition="nosuchpartition", **options)
    message = str(caught.value)
    assert "Slurm has no partition 'nosuchpartition'" in message, message
    assert "sinfo -s" in message, message
