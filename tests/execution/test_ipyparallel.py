"""IPyParallelExecutor and MPI engine jobs on real ipyparallel clusters (§3.3, R1, R19).

Clusters are expensive (seconds to start), so three are started per module run: a local one
of two engines owned by an ``IPyParallelExecutor``, one of two MPI engines started here with
``ipp.Cluster`` (the executor connects to it by cluster id), and one started and stopped by an
``MPIEngineJob``. After each is stopped, ``ps`` must show none of its processes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import CancelledError
from pathlib import Path

import pytest

ipp = pytest.importorskip("ipyparallel")
pytest.importorskip("mpi4py")

from chemfit.core.context import EvaluateContext  # noqa: E402
from chemfit.core.exceptions import (  # noqa: E402
    NotPicklableError,
    RankTimeoutError,
    RemoteEvaluationError,
    WorkerLostError,
)
from chemfit.execution.executor_info import executor_info  # noqa: E402
from chemfit.execution.executor_utils import (  # noqa: E402
    as_completed_with_context,
    map_with_context,
)
from chemfit.execution.executors import make_executor  # noqa: E402
from chemfit.execution.ipyparallel_executor import IPyParallelExecutor  # noqa: E402
from chemfit.execution.mpi_engines import MPIEngineJob  # noqa: E402
from chemfit.fitting.fitter import Fitter, FitterEvaluateContext  # noqa: E402
from chemfit.fitting.mpi_engine_fit import MPIEngineFit  # noqa: E402
from tests.helpers import ipyparallel_engine_functions as h  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_WORDS = ("ipyparallel", "ipengine", "ipcontroller", "mpiexec", "hydra_pmi_proxy")
OFFSET = 10.0  # read by a lambda on the engines, like a notebook global


# -- process bookkeeping with ps -------------------------------------------------------------


def _ps() -> dict[int, tuple[int, str, str]]:
    """pid -> (ppid, state, command line) of every process, from ``ps``."""
    out = subprocess.run(
        ["ps", "-eo", "pid=,ppid=,stat=,args="], capture_output=True, text=True, check=True
    ).stdout
    table = {}
    for line in out.splitlines():
        pid, ppid, stat, *args = line.split(None, 3)
        table[int(pid)] = (int(ppid), stat, args[0] if args else "")
    return table


def cluster_processes() -> dict[int, str]:
    """Live (non-zombie) ipyparallel/MPI processes descending from this test process."""
    table = _ps()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, stack = {}, list(children.get(os.getpid(), []))
    while stack:
        pid = stack.pop()
        _, stat, args = table[pid]
        if not stat.startswith("Z") and any(word in args for word in CLUSTER_WORDS):
            found[pid] = args
        stack.extend(children.get(pid, []))
    return found


def still_running(processes: dict[int, str], wait: float = 0.0) -> dict[int, str]:
    """Which of ``processes`` (pid -> command line) still run, after waiting up to ``wait`` s."""
    deadline = time.monotonic() + wait
    while True:
        table = _ps()
        alive = {
            pid: args
            for pid, args in processes.items()
            if pid in table and not table[pid][1].startswith("Z") and table[pid][2] == args
        }
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.1)


def _ctxs(n: int) -> list[EvaluateContext]:
    return [EvaluateContext() for _ in range(n)]


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_ex():
    """A local cluster of two engines, owned by the executor."""
    before = set(cluster_processes())
    t0 = time.perf_counter()
    ex = IPyParallelExecutor(2)
    started = time.perf_counter() - t0
    processes = {p: a for p, a in cluster_processes().items() if p not in before}
    try:
        yield ex
    finally:
        t0 = time.perf_counter()
        ex.shutdown()
        stopped = time.perf_counter() - t0
        print(f"\nlocal cluster: start {started:.1f} s, stop {stopped:.1f} s")
    assert processes, "the executor started no visible processes"
    assert still_running(processes) == {}, "processes left after shutdown()"
    assert not Path(ex.profile_dir).exists(), "the throwaway profile dir was kept"


@pytest.fixture(scope="module")
def mpi_cluster():
    """Two MPI engines started here with ipp.Cluster (as a user would), found by cluster id."""
    from traitlets.config import Config

    config = Config()
    config.MPIEngineSetLauncher.mpi_cmd = [str(Path(sys.executable).parent / "mpiexec")]
    profile_dir = tempfile.mkdtemp(prefix="chemfit-test-ipp-")
    cluster = ipp.Cluster(
        n=2,
        engines="mpi",
        profile_dir=profile_dir,
        cluster_id=f"chemfit-test-{uuid.uuid4().hex[:8]}",
        log_level=40,
        controller_args=["--HeartMonitor.period=500"],
        config=config,
    )
    before = set(cluster_processes())
    t0 = time.perf_counter()
    cluster.start_cluster_sync()
    try:
        yield cluster
    finally:
        processes = {p: a for p, a in cluster_processes().items() if p not in before}
        cluster.stop_cluster_sync()
        # Without the executor's clean-up, engine nannies linger for about 3 s.
        left = still_running(processes, wait=10)
        import shutil

        shutil.rmtree(profile_dir, ignore_errors=True)
        print(f"\nMPI cluster (ipp.Cluster): up and down in {time.perf_counter() - t0:.1f} s")
    assert left == {}, f"processes left after stop_cluster_sync(): {left}"


@pytest.fixture(scope="module")
def mpi_ex(mpi_cluster):
    """An executor connected to ``mpi_cluster`` by its cluster id."""
    ex = IPyParallelExecutor(
        2, cluster_id=mpi_cluster.cluster_id, profile_dir=mpi_cluster.profile_dir, mpi=True
    )
    try:
        yield ex
    finally:
        ex.shutdown()


# -- without a cluster --------------------------------------------------------------------------


def test_missing_ipyparallel_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ipyparallel", None)
    with pytest.raises(ImportError, match=r"chemfit\[ipyparallel\]"):
        IPyParallelExecutor(2)
    with pytest.raises(ImportError, match=r"chemfit\[ipyparallel\]"):
        make_executor("ipyparallel", 2)


def test_bad_arguments_fail_before_starting_anything():
    with pytest.raises(ValueError, match="max_workers"):
        IPyParallelExecutor(0)
    with pytest.raises(ValueError, match="timeout"):
        IPyParallelExecutor(2, timeout=-1)
    with pytest.raises(ValueError, match="budget"):
        MPIEngineFit(h.build_cob, {"x": 0.0}, fit_kwargs={})
    with pytest.raises(ValueError, match="executor"):
        MPIEngineFit(h.build_cob, {"x": 0.0}, fit_kwargs={"budget": 5, "executor": None})
    with pytest.raises(ValueError, match="x"):  # initial value outside its bounds
        MPIEngineFit(h.build_cob, {"x": 9.0}, {"x": (0.0, 1.0)}, fit_kwargs={"budget": 5})
    with pytest.raises(ValueError, match="rank_timeout must be a positive number of seconds"):
        MPIEngineFit(h.build_cob, {"x": 0.0}, fit_kwargs={"budget": 5}, rank_timeout=0)


# -- a local cluster ----------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_local_engines_run_notebook_lambdas(local_ex):
    assert local_ex.n_engines == 2
    assert local_ex.cluster is not None and local_ex.owns_cluster
    assert local_ex.mpi_size is None
    assert os.getpid() not in local_ex.engine_pids
    assert list(local_ex.map(lambda x: x + OFFSET, range(5))) == [10.0, 11.0, 12.0, 13.0, 14.0]
    assert list(local_ex.map(pow, range(5), [2] * 5, chunksize=2)) == [0, 1, 4, 9, 16]
    pids = {local_ex.submit(os.getpid).result(timeout=60) for _ in range(6)}
    assert pids <= set(local_ex.engine_pids)
    assert "2 engines, started" in repr(local_ex)


@pytest.mark.timeout(180)
def test_remote_exceptions_come_back_as_themselves(local_ex):
    with pytest.raises(ValueError, match="invalid literal") as info:
        local_ex.submit(int, "not a number").result(timeout=60)
    cause = info.value.__cause__
    assert isinstance(cause, RemoteEvaluationError)
    assert cause.rank in local_ex.engines
    assert cause.type_name == "ValueError"
    assert "Traceback" in cause.remote_traceback

    # An exception that cannot be rebuilt arrives as RemoteEvaluationError with its details.
    with pytest.raises(RemoteEvaluationError, match="custom failure") as info:
        local_ex.submit(h.raise_unpicklable).result(timeout=60)
    assert info.value.type_name == "UnpicklableError"
    assert "raise_unpicklable" in info.value.remote_traceback


@pytest.mark.timeout(180)
def test_unpicklable_call_fails_at_submit(local_ex):
    lock = threading.Lock()
    with pytest.raises(NotPicklableError, match="lock"):
        local_ex.submit(lambda: lock)


@pytest.mark.timeout(180)
def test_map_with_context_round_trip(local_ex):
    params = [{"x": float(x)} for x in range(4)]
    ctxs = _ctxs(4)
    results = map_with_context(local_ex, h.engine_square, params, ctxs=ctxs)
    assert results == [0.0, 1.0, 4.0, 9.0]
    assert [c.loss for c in ctxs] == results
    assert [c.parameters for c in ctxs] == params
    assert [c.meta["label"] for c in ctxs] == [f"x={float(x)}" for x in range(4)]
    assert {c.meta["pid"] for c in ctxs} <= set(local_ex.engine_pids)

    ctxs = _ctxs(3)
    seen = dict(as_completed_with_context(local_ex, h.engine_square, params[:3], ctxs=iter(ctxs)))
    assert seen == {0: 0.0, 1: 1.0, 2: 4.0}
    assert [c.loss for c in ctxs] == [0.0, 1.0, 4.0]


NOTEBOOK_CELL = """
import os

from chemfit.wrap_funcs import to_objective_functor

@to_objective_functor(pass_ctx=True)
def notebook_square(params, ctx):
    ctx.meta["pid"] = os.getpid()
    return params["x"] ** 2
"""


@pytest.mark.timeout(180)
def test_engines_run_models_decorated_in_a_notebook_cell(local_ex, monkeypatch):
    namespace = {"__name__": "__main__"}  # the engines' __main__ has none of it
    exec(NOTEBOOK_CELL, namespace)
    square = namespace["notebook_square"]
    monkeypatch.setattr(sys.modules["__main__"], "notebook_square", square, raising=False)
    ctxs = _ctxs(3)
    params = [{"x": float(x)} for x in range(3)]
    assert map_with_context(local_ex, square, params, ctxs=ctxs) == [0.0, 1.0, 4.0]
    assert {c.meta["pid"] for c in ctxs} <= set(local_ex.engine_pids)


@pytest.mark.timeout(180)
def test_engines_that_cannot_rebuild_a_task_say_what(local_ex, monkeypatch):
    import types

    module = types.ModuleType("only_in_the_caller")
    exec("def objective(params, ctx):\n    return 1.0\n", module.__dict__)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    with pytest.raises(NotPicklableError, match="could not rebuild the function objective"):
        map_with_context(local_ex, module.objective, [{"x": 1.0}], ctxs=_ctxs(1))


@pytest.mark.timeout(180)
def test_fitter_keeps_best_so_far_from_engines(local_ex):
    """R1: the contexts' best-so-far state comes back from the engines."""
    fitter = Fitter(h.fit_objective, {"x": 0.0, "y": 0.0}, {"x": (-3, 3), "y": (-3, 3)})
    fitter.fit_nevergrad(
        budget=16, optimizer_str="OnePlusOne", num_workers=2, executor=local_ex, seed=1
    )
    contexts = fitter.contexts
    assert len(contexts) == 2 and all(isinstance(c, FitterEvaluateContext) for c in contexts)
    assert sum(c.n_evals for c in contexts) == 16
    best = min((c for c in contexts if c.opt_loss is not None), key=lambda c: c.opt_loss)
    history_best = min(record.loss for record in fitter.result.history)
    assert best.opt_loss == fitter.result.best_loss == history_best
    assert best.opt_meta["pid"] in local_ex.engine_pids
    assert fitter.result.best_meta["pid"] in local_ex.engine_pids
    assert fitter.result.n_evals == 16


@pytest.mark.timeout(180)
def test_connecting_checks_what_it_finds(local_ex):
    with pytest.raises(ValueError, match="no running ipyparallel cluster found"):
        IPyParallelExecutor(
            cluster_id="no-such-cluster", profile_dir=local_ex.profile_dir, timeout=0.5
        )
    with pytest.raises(ValueError, match="do not form one MPI world"):
        IPyParallelExecutor(
            cluster_id=local_ex.cluster_id, profile_dir=local_ex.profile_dir, mpi=True
        )
    # make_executor connects the same way; disconnecting leaves the cluster alone.
    with make_executor(
        "ipyparallel", cluster_id=local_ex.cluster_id, profile_dir=local_ex.profile_dir
    ) as connected:
        assert isinstance(connected, IPyParallelExecutor) and not connected.owns_cluster
        assert connected.cluster_id == local_ex.cluster_id
        assert sorted(connected.map(abs, [-1, -2, -3])) == [1, 2, 3]
    # None of this disturbed the cluster.
    assert local_ex.n_engines == 2
    assert local_ex.submit(abs, -2).result(timeout=60) == 2


@pytest.mark.timeout(180)
def test_errors_outside_the_call_arrive_with_the_remote_traceback(local_ex, monkeypatch):
    """An engine that cannot even unpickle a call: ipyparallel's RemoteError becomes a
    RemoteEvaluationError naming the engine, its text holding the remote traceback."""
    import types

    module = types.ModuleType("only_in_this_process")
    exec("def task():\n    return 1\n", module.__dict__)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    with pytest.raises(RemoteEvaluationError, match="only_in_this_process") as info:
        local_ex.submit(module.task).result(timeout=60)
    error = info.value
    assert error.type_name == "ModuleNotFoundError"
    assert error.rank in local_ex.engines
    assert str(error).startswith(f"ModuleNotFoundError on ipyparallel engine {error.rank}: ")
    assert f"Remote traceback:\n{error.remote_traceback}" in str(error)
    assert "No module named 'only_in_this_process'" in error.remote_traceback
    assert "\x1b[" not in str(error), "IPython's colour codes in the message"
    assert type(error.__cause__).__name__ == "RemoteError"  # ipyparallel's, kept as the cause


@pytest.mark.timeout(180)
def test_a_call_cancelled_before_it_starts_never_runs(local_ex, tmp_path):
    marker = tmp_path / "ran"
    busy = [local_ex.submit(time.sleep, 1.5) for _ in range(local_ex.n_engines)]
    waiting = local_ex.submit(lambda: marker.write_text("ran"))
    assert waiting.cancel() and waiting.cancelled()
    with pytest.raises(CancelledError):
        waiting.result(timeout=1)
    assert [future.result(timeout=60) for future in busy] == [None] * len(busy)
    time.sleep(0.5)
    assert not marker.exists(), "the cancelled call ran on an engine"
    assert local_ex.submit(abs, -4).result(timeout=60) == 4


@pytest.mark.timeout(180)
def test_dead_engine_raises_worker_lost_error(local_ex):
    """R19; this kills one of the two local engines, so it runs last on this cluster."""
    params = [{"x": 1.0}, {"x": -1.0}, {"x": 2.0}]
    ctxs = _ctxs(3)
    t0 = time.monotonic()
    with pytest.raises(WorkerLostError) as info:
        map_with_context(local_ex, h.die_or_square, params, ctxs=ctxs, timeout=60)
    assert time.monotonic() - t0 < 60
    assert info.value.parameters == {"x": -1.0}
    assert ctxs[0].loss == 1.0 and ctxs[2].loss == 4.0  # completed calls were applied
    # The surviving engine keeps working.
    assert local_ex.submit(abs, -3).result(timeout=60) == 3
    assert local_ex.n_engines == 1


# -- MPI engines of a cluster started elsewhere ---------------------------------------------------


@pytest.mark.timeout(180)
def test_connect_by_cluster_id_to_mpi_engines(mpi_cluster, mpi_ex):
    assert mpi_ex.cluster is None and not mpi_ex.owns_cluster
    assert mpi_ex.n_engines == 2 and mpi_ex.mpi_size == 2
    assert sorted(info["mpi_rank"] for info in mpi_ex.engines.values()) == [0, 1]
    assert sorted(mpi_ex.map(abs, [-1, -2])) == [1, 2]

    # A second connection that is shut down leaves the cluster running.
    other = IPyParallelExecutor(
        cluster_id=mpi_cluster.cluster_id, profile_dir=mpi_cluster.profile_dir
    )
    assert other.n_engines == 2 and other.profile_dir == mpi_cluster.profile_dir
    other.shutdown()
    assert set(mpi_ex.engine_pids) <= set(_ps()), "disconnecting stopped the engines"
    assert Path(mpi_cluster.profile_dir).is_dir(), "disconnecting deleted the profile dir"
    assert mpi_ex.submit(os.getpid).result(timeout=60) in mpi_ex.engine_pids
    with pytest.raises(RuntimeError, match="shutdown"):
        other.submit(abs, 1)


@pytest.mark.timeout(180)
def test_mpi_engine_fit_streams_progress_while_it_runs(mpi_ex):
    arrivals: list[tuple[float, dict, str]] = []

    def on_record(record):
        arrivals.append((time.monotonic(), record, threading.current_thread().name))

    budget = 30
    fit = MPIEngineFit(
        h.build_slow_cob,
        {"x": 0.0},
        {"x": (-3.0, 3.0)},
        executor=mpi_ex,
        fit_kwargs={"budget": budget, "optimizer_str": "OnePlusOne", "seed": 0},
        stream_meta="full",
        on_record=on_record,
    )
    with fit:
        result = fit.wait(timeout=150)
    records = [record for _, record, _ in arrivals]
    assert len(records) == budget == result.n_evals == len(fit.records)
    assert [r["index"] for r in records] == list(range(budget))
    # Progress reached the notebook before the fit's end was noticed.
    assert arrivals[0][0] < fit.end_time - 0.2
    assert all(name == "chemfit-mpi-engine-job" for _, _, name in arrivals)
    # Every record carries the children's meta: the terms ran on both ranks.
    ranks = [child["meta"]["rank"] for child in records[0]["meta"]["children"]]
    assert ranks == [0, 0, 1, 1]
    assert result.best_loss == min(r["loss"] for r in records)
    assert (
        result.best_parameters
        == records[min(range(budget), key=lambda i: records[i]["loss"])]["parameters"]
    )
    assert len(fit.history) == budget
    # The engines were not ours to stop.
    assert mpi_ex.submit(os.getpid).result(timeout=60) in mpi_ex.engine_pids


@pytest.mark.timeout(180)
def test_mpi_engine_fit_records_validation_on_rank_0(mpi_ex):
    fit = MPIEngineFit(
        h.build_cob,
        {"x": 0.0},
        {"x": (-3.0, 3.0)},
        executor=mpi_ex,
        fit_kwargs={"budget": 30, "optimizer_str": "OnePlusOne", "seed": 0},
        fitter_kwargs={"validation": h.held_out_loss},
    )
    with fit:
        result = fit.wait(timeout=150)
    history = result.history
    improved = [history[position] for position in history.improvements()]
    assert len(improved) > 1
    assert [index for index, _ in result.validation] == [r.index for r in improved]
    for (_, loss), record in zip(result.validation, improved):
        assert loss == h.held_out_loss(record.parameters)
    # Streamed as they happen: the validation lines among the records rebuild the same history.
    assert sum("validation" in record for record in fit.records) == len(result.validation)
    assert fit.history.validation == result.validation and len(fit.history) == 30


@pytest.mark.timeout(180)
def test_mpi_engine_job_errors_reach_the_caller(mpi_ex):
    job = MPIEngineJob(h.build_cob, h.driver_raises, executor=mpi_ex).start()
    with pytest.raises(ValueError, match="driver failed on rank 0") as info:
        job.wait(timeout=60)
    assert isinstance(info.value.__cause__, RemoteEvaluationError)
    assert info.value.__cause__.rank == 0
    assert job.records == [{"step": 0}] and job.state == "failed"

    job = MPIEngineJob(h.build_fails_on_rank_1, h.driver_evaluate_three, executor=mpi_ex)
    with job, pytest.raises(RuntimeError, match="cannot build") as info:
        job.wait(timeout=60)
    assert info.value.__cause__.rank == 1

    # The workers were released each time: a new job runs normally.
    with MPIEngineJob(h.build_cob, h.driver_evaluate_three, executor=mpi_ex) as job:
        assert job.wait(timeout=60) == [7.5, 1.5, 3.5]
    assert [r["x"] for r in job.records] == [0.0, 1.0, 2.0]


@pytest.mark.timeout(180)
def test_mpi_engine_job_takes_its_executors_executor_info(mpi_ex):
    with pytest.raises(TypeError, match="must be an IPyParallelExecutor with MPI engines"):
        MPIEngineJob(h.build_cob, h.driver_evaluate_three, executor=executor_info(None))
    info = executor_info(mpi_ex)
    assert info.kind == "ipyparallel"
    with MPIEngineJob(h.build_cob, h.driver_evaluate_three, executor=info) as job:
        assert job.executor is mpi_ex
        assert job.wait(timeout=60) == [7.5, 1.5, 3.5]
    assert mpi_ex.submit(abs, -1).result(timeout=60) == 1  # the job did not stop the engines


@pytest.mark.timeout(180)
def test_stopping_a_job_on_a_cluster_it_did_not_start_interrupts_rank_0(mpi_ex):
    job = MPIEngineJob(h.build_cob, h.driver_endless, executor=mpi_ex).start()
    deadline = time.monotonic() + 60
    while len(job.records) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(job.records) >= 3
    job.stop(timeout=30)
    assert job.state == "stopped"
    with pytest.raises(CancelledError):
        job.wait(timeout=5)
    # Rank 0 was interrupted and released its worker; both engines serve the next job.
    with MPIEngineJob(h.build_cob, h.driver_evaluate_three, executor=mpi_ex) as job:
        assert job.wait(timeout=60) == [7.5, 1.5, 3.5]


# -- a cluster the job starts itself --------------------------------------------------------------


@pytest.mark.timeout(180)
def test_stopping_a_job_stops_the_cluster_it_started():
    before = set(cluster_processes())
    received = []
    job = MPIEngineJob(h.build_cob, h.driver_endless, n_engines=2, on_record=received.append)
    t0 = time.perf_counter()
    try:
        job.start()
        started = time.perf_counter() - t0
        assert job.executor.owns_cluster and job.executor.mpi_size == 2
        processes = {p: a for p, a in cluster_processes().items() if p not in before}
        assert any("mpiexec" in args for args in processes.values())
        deadline = time.monotonic() + 60
        while len(received) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(received) >= 3, "no progress arrived while the job ran"
    finally:
        t0 = time.perf_counter()
        job.stop()
        stopped = time.perf_counter() - t0
    print(f"\nMPI cluster (MPIEngineJob): start {started:.1f} s, stop {stopped:.1f} s")
    assert still_running(processes) == {}, "engines or mpiexec left after stop()"
    assert job.records[:3] == received[:3]
    with pytest.raises(CancelledError):
        job.wait(timeout=1)


@pytest.mark.timeout(180)
def test_a_rank_that_does_not_answer_ends_the_job_with_its_rank_timeout_error():
    before = set(cluster_processes())
    job = MPIEngineJob(
        h.build_hangs_on_rank_1, h.driver_evaluate_three, n_engines=2, rank_timeout=3
    )
    processes = {}
    try:
        job.start()
        processes = {p: a for p, a in cluster_processes().items() if p not in before}
        t0 = time.monotonic()
        with pytest.raises(RankTimeoutError, match=r"rank 1 \(terms 2\.\.3") as info:
            job.wait(timeout=90)
        waited = time.monotonic() - t0
    finally:
        job.stop()
    print(f"\nrank_timeout=3 s: wait() raised RankTimeoutError after {waited:.1f} s")
    assert waited < 30, f"the job ended {waited:.0f} s after a 3 s rank timeout"
    assert info.value.ranks == {1: (2, 4)} and info.value.timeout == 3.0
    assert isinstance(info.value.__cause__, RemoteEvaluationError)
    assert "MPI rank 0" in str(info.value.__cause__)
    assert [r["x"] for r in job.records] == [0.0], "the record before the hang was lost"
    assert job.state == "failed"
    assert still_running(processes, wait=10) == {}, "engines or mpiexec left after stop()"


# -- last: this kills the MPI world of mpi_cluster -------------------------------------------------


@pytest.mark.timeout(180)
def test_dead_mpi_engine_raises_worker_lost_error_and_keeps_records(mpi_ex):
    job = MPIEngineJob(h.build_cob, h.driver_dies, executor=mpi_ex).start()
    t0 = time.monotonic()
    with pytest.raises(WorkerLostError, match="MPI rank 0") as info:
        job.wait(timeout=90)
    assert time.monotonic() - t0 < 90
    assert "2 records" in str(info.value)
    assert [r["step"] for r in job.records] == [0, 1]
    assert job.state == "failed"
