"""MPIWrapperCOB: real ``mpiexec`` runs (2 and 3 ranks) plus in-process unit tests.

The MPI scenarios live in ``tests/execution/mpi_scripts/mpi_wrapper_scenarios.py``; rank 0
prints one JSON line that the tests below assert on. Each run has a hard timeout that kills its whole process
group, so a hang fails the test instead of leaving ranks behind.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import chemfit
from chemfit.core.combined import CombinedObjectiveFunction
from chemfit.core.context import EvaluateContext
from chemfit.execution.mpi_wrapper_cob import (
    _ROOT_WAIT,
    _WORKER_WAIT,
    MPIWrapperCOB,
    Signal,
    _a_core_for_each_rank,
    _missing_mpi_message,
    _WaitPolicy,
    _workers_can_spawn,
    slice_up_range,
)

MPI = pytest.importorskip("mpi4py.MPI")

MPIEXEC = Path(sys.executable).parent / "mpiexec"
SCRIPT = Path(__file__).parent / "mpi_scripts" / "mpi_wrapper_scenarios.py"
REPO = Path(__file__).resolve().parents[2]
# The ranks import the same chemfit as this test process.
CHEMFIT_ROOT = Path(chemfit.__file__).parent.parent

pytestmark = pytest.mark.skipif(not MPIEXEC.exists(), reason="the venv has no mpiexec")


def run_scenario(name: str, n_ranks: int, timeout: float = 30.0) -> dict:
    """Run a scenario under ``mpiexec -n n_ranks``; return rank 0's JSON result."""
    env = dict(
        os.environ, PYTHONPATH=str(CHEMFIT_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    )
    proc = subprocess.Popen(
        [str(MPIEXEC), "-n", str(n_ranks), sys.executable, str(SCRIPT), name],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
        start_new_session=True,  # its own process group, so a timeout can kill every rank
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"mpiexec -n {n_ranks} {name} hung for {timeout} s\n{stdout}\n{stderr}")
    assert proc.returncode == 0, f"rc={proc.returncode}\n{stdout}\n{stderr}"
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, f"expected one RESULT line\n{stdout}\n{stderr}"
    return json.loads(lines[0][len("RESULT ") :])


def assert_serial(check: dict, n_terms: int, skipped: list[int] | None = None) -> None:
    assert check["value_mpi"] == check["value_serial"]  # float.hex: bitwise equal
    assert check["meta_equal"], (check["meta_serial"], check["meta_mpi"])
    assert check["loss_equal"]
    assert check["n_terms"] == n_terms
    assert check["skipped"] == (skipped or [])


def assert_remote(info: dict, exc_type: str, rank: int, term: int) -> None:
    assert info["type"] == exc_type, info
    assert info["rank"] == rank
    assert info["term_index"] == term
    assert info["has_traceback"]
    assert info["seconds"] < 5


# -- real MPI runs --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_ranks() -> dict:
    return run_scenario("two_ranks", 2)


@pytest.fixture(scope="module")
def three_ranks() -> dict:
    return run_scenario("three_ranks", 3)


@pytest.fixture(scope="module", params=[2, 3], ids=["2ranks", "3ranks"])
def spawning(request) -> dict:
    return run_scenario("spawning", request.param)


@pytest.mark.mpi
@pytest.mark.timeout(60)
def test_two_ranks_value_and_meta_equal_serial(two_ranks):
    assert two_ranks["size"] == 2
    for check in two_ranks["equal"]:
        assert_serial(check, 6)
    assert_serial(two_ranks["skip"], 6, skipped=[4])  # skipped on rank 1, by rank 1's handler


@pytest.mark.mpi
@pytest.mark.timeout(60)
def test_two_ranks_remote_exceptions_reach_rank_0(two_ranks):
    picklable = two_ranks["raise_rank1"]
    assert_remote(picklable, "TermFailure", rank=1, term=4)
    assert picklable["cause_type"] == "RemoteEvaluationError"
    assert picklable["message"] == "term 4 failed on purpose"

    unpicklable = two_ranks["unpicklable_rank1"]
    assert_remote(unpicklable, "RemoteEvaluationError", rank=1, term=5)
    assert unpicklable["type_name"].endswith("UnpicklableFailure")
    assert unpicklable["remote_message"] == "term 5 raised an unpicklable error"

    meta = two_ranks["meta_rank1"]
    assert meta["type"] == "NotPicklableError" and meta["is_not_picklable"]
    assert "term 3 on rank 1" in meta["message"]

    assert_serial(two_ranks["after_raise"], 6)

    # a request rank 1 cannot load, a reply rank 0 cannot load
    request = two_ranks["request_unloadable"]
    assert request["type"] == "NotPicklableError" and request["rank"] == 1
    assert "could not be unpickled on rank 1" in request["message"]
    reply = two_ranks["reply_unloadable"]
    assert reply["type"] == "NotPicklableError" and reply["rank"] == 1
    assert "could not be unpickled on rank 0" in reply["message"]


@pytest.mark.mpi
@pytest.mark.timeout(60)
def test_two_ranks_rank_0_failures_keep_ranks_in_step(two_ranks):
    assert two_ranks["raise_rank0"]["type"] == "TermFailure"
    assert two_ranks["raise_rank0"]["cause_type"] is None  # local errors are raised as they are
    assert two_ranks["configurator"]["message"] == "the configurator failed on purpose"
    assert two_ranks["reduction"]["message"] == "the reduction failed on purpose"
    assert_serial(two_ranks["after_rank0_failures"], 6)
    # rank 0 interrupted while waiting: the next call drains the late reply first
    assert two_ranks["interrupted"] == "interrupted while waiting"
    assert_serial(two_ranks["after_interrupt"], 6)


@pytest.mark.mpi
@pytest.mark.timeout(60)
def test_two_ranks_traffic_threads_release_and_mismatch(two_ranks):
    sizes = two_ranks["bytes_per_call"]
    assert len(set(sizes)) == 1 and sizes[0] > 0, sizes  # R21: a reused ctx does not grow it
    assert two_ranks["threads_equal"]
    assert two_ranks["serialises_calls"] is True
    assert two_ranks["released"]
    assert "release_workers" in two_ranks["after_release"]
    mismatch = two_ranks["mismatch"]
    assert mismatch["type"] == "ValueError"
    assert "build the same objective on every rank" in mismatch["message"]
    assert "rank 1 has a combined objective with 5 terms" in mismatch["message"]
    assert two_ranks["debug_log"] and all(m.startswith("[Rank 0]") for m in two_ranks["debug_log"])


@pytest.mark.mpi
@pytest.mark.timeout(60)
def test_idle_worker_does_not_burn_a_core(two_ranks):
    idle = two_ranks["idle"]
    assert idle["pid_differs"]
    assert idle["cpu_fraction"] < 0.1, idle  # CPU seconds of the worker over 1 s of waiting


@pytest.mark.mpi
@pytest.mark.timeout(60)
def test_idle_worker_cpu_right_after_a_call(two_ranks):
    # A worker polls without sleeping for a short while after each reply (the next call of a
    # running fit comes soon), then sleeps. Measured over the first 2 s after a call, with a
    # generous bound (the benchmark reports the figure; about 3 % on a quiet machine).
    assert two_ranks["idle"]["cpu_fraction_2s"] < 0.3, two_ranks["idle"]


@pytest.mark.mpi
@pytest.mark.timeout(60)
def test_workers_spawn_children_without_configurator(spawning):
    size = spawning["size"]
    for check in spawning["equal"]:
        assert_serial(check, 6)
    assert_serial(spawning["skip"], 6, skipped=[5])
    assert_serial(spawning["after_failures"], 6)
    # a recipe step overridden by a subclass: rank 0 sends the children it spawned
    assert_serial(spawning["offset_equal"], 6)
    assert_serial(spawning["big_equal"], 40)
    assert_serial(spawning["few_equal"], 2)
    # the requests carry no per-term data: as large for 40 terms as for 6, and constant (R21)
    assert len(set(spawning["bytes_6"])) == 1 and spawning["bytes_6"][0] > 0
    assert spawning["bytes_40"] == spawning["bytes_6"]
    assert spawning["bytes_configured"][0] > spawning["bytes_6"][0]
    # 2 terms: only rank 1 gets a request, also with 3 ranks
    assert spawning["few_bytes"] * (size - 1) == spawning["bytes_6"][0]


@pytest.mark.mpi
@pytest.mark.timeout(60)
def test_workers_spawn_children_errors(spawning):
    last = spawning["size"] - 1  # term 5 runs on the last rank
    assert_remote(spawning["raise_worker"], "TermFailure", rank=last, term=5)
    assert_remote(spawning["unpicklable_worker"], "RemoteEvaluationError", rank=last, term=5)
    meta = spawning["meta_worker"]
    assert meta["type"] == "NotPicklableError" and meta["rank"] == last
    first = spawning["raise_rank0_and_worker"]
    assert first["type"] == "TermFailure" and first["message"] == "term 0 failed on purpose"
    assert spawning["reduction"]["message"] == "the reduction failed on purpose"
    # the recipe failed after the requests went out: rank 0 took the answers first (R9)
    prepare = spawning["prepare_fails"]
    assert prepare["type"] == "ValueError" and "weights has 7 entries" in prepare["message"]
    shared = spawning["unpicklable_shared"]
    assert shared["type"] == "NotPicklableError" and "cannot be pickled" in shared["message"]
    assert spawning["interrupted"] == "interrupted while waiting"


@pytest.mark.mpi
@pytest.mark.timeout(60)
def test_three_ranks_more_ranks_than_terms(three_ranks):
    assert three_ranks["size"] == 3
    for check in three_ranks["few_equal"]:
        assert_serial(check, 2)
    # 2 terms on 3 ranks: only rank 1 gets a request, rank 2 stays idle
    assert three_ranks["few_idle_rank2"] > 0


@pytest.mark.mpi
@pytest.mark.timeout(60)
def test_three_ranks_errors(three_ranks):
    for check in three_ranks["equal"]:
        assert_serial(check, 5)
    assert_remote(three_ranks["raise_rank2"], "TermFailure", rank=2, term=4)
    assert_remote(three_ranks["unpicklable_rank2"], "RemoteEvaluationError", rank=2, term=4)
    assert_remote(three_ranks["raise_rank1"], "TermFailure", rank=1, term=3)
    # several failures: the first in term order wins
    assert_remote(three_ranks["raise_rank1_and_rank2"], "TermFailure", rank=1, term=2)
    first = three_ranks["raise_rank0_and_rank2"]
    assert first["type"] == "TermFailure" and first["message"] == "term 0 failed on purpose"
    meta = three_ranks["meta_rank2"]
    assert meta["type"] == "NotPicklableError" and meta["rank"] == 2 and meta["term_index"] == 4
    assert_serial(three_ranks["after_failures"], 5)
    for key in ("raise_rank0", "configurator", "reduction"):
        assert three_ranks[key]["type"] == "TermFailure", key
    assert_serial(three_ranks["after_rank0_failures"], 5)
    assert_serial(three_ranks["skip_rank2"], 5, skipped=[4])


@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.timeout(60)
def test_fitter_on_rank_0():
    pytest.importorskip("chemfit.fitting.fitter")
    result = run_scenario("fitter", 2, timeout=50.0)  # importing nevergrad takes most of it
    assert result["finite"]
    assert set(result["fitted"]) == {"x"}
    assert result["value_equal"]
    # R10: a threaded fit (num_workers=2) on the wrapper works and says it is serialised
    assert result["threads_finite"]
    assert result["threads_best_equal"]
    assert result["threads_n_evals"] == 20
    assert result["serialised_info"]


# -- in-process unit tests ------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 2, 5, 7, 10, 100])
@pytest.mark.parametrize("n_ranks", [1, 2, 3, 4, 8])
def test_slice_up_range_is_balanced_and_contiguous(n, n_ranks):
    slices = list(slice_up_range(n, n_ranks))
    assert len(slices) == n_ranks
    assert slices[0][0] == 0 and slices[-1][1] == n
    assert all(a[1] == b[0] for a, b in itertools.pairwise(slices))
    sizes = [end - start for start, end in slices]
    assert min(sizes) >= 0 and max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)
    assert all(isinstance(s, tuple) for s in slices)


def test_slice_up_range_examples_and_errors():
    assert list(slice_up_range(10, 4)) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert list(slice_up_range(2, 3)) == [(0, 1), (1, 2), (2, 2)]
    with pytest.raises(ValueError, match="n_ranks"):
        list(slice_up_range(3, 0))
    with pytest.raises(ValueError, match="n must be"):
        list(slice_up_range(-1, 2))


def test_missing_mpi_message_names_the_extra():
    message = _missing_mpi_message(ImportError("No module named 'mpi4py'"))
    assert "chemfit[mpi]" in message and "mpi4py" in message


def test_signal_abort_is_minus_one():
    assert Signal.ABORT.value == -1
    assert len({s.tag for s in Signal}) == len(Signal)
    assert all(s.tag >= 0 for s in Signal)


@pytest.mark.timeout(30)
def test_single_rank_equals_serial_and_rejects_worker_loop():
    def configurator(idx_child_ctx, child_ctx, num_children, parent_ctx):
        child_ctx.config.idx = idx_child_ctx

    def term(k):
        return lambda p: (p["x"] - k) ** 2 / 3.0

    def build():
        return CombinedObjectiveFunction(
            [term(k) for k in range(4)],
            weights=[0.1, 0.2, 0.3, 0.4],
            child_context_configurator=configurator,
        )

    ctx_serial, ctx_mpi = EvaluateContext(), EvaluateContext()
    expected = build()({"x": 0.7}, ctx_serial)
    with MPIWrapperCOB(build(), comm=MPI.COMM_SELF) as mpi:
        assert (mpi.rank, mpi.size) == (0, 1)
        assert mpi({"x": 0.7}, ctx_mpi) == expected
        assert repr(ctx_mpi.meta) == repr(ctx_serial.meta)
        with pytest.raises(RuntimeError, match="worker_loop"):
            mpi.worker_loop()
        mpi.release_workers()
        mpi.release_workers()
    mpi.close()  # closing twice is harmless


def test_empty_cob_raises_value_error():
    cob = CombinedObjectiveFunction([])
    with MPIWrapperCOB(cob, comm=MPI.COMM_SELF) as mpi, pytest.raises(ValueError, match="no terms"):
        mpi({"x": 1.0})


def test_wait_policy_spins_then_sleeps_a_growing_fraction():
    policy = _WaitPolicy(spin=0.02, fraction=0.01, min_sleep=50e-6, max_sleep=0.01)
    assert policy.sleep_after(0.0) == 0.0 and policy.sleep_after(0.0199) == 0.0
    assert policy.sleep_after(0.0201) == 50e-6  # the shortest sleep first
    assert policy.sleep_after(0.52) == pytest.approx(0.005)  # 1 % of the time beyond the spin
    assert policy.sleep_after(100.0) == 0.01  # then at most the cap
    # rank 0 waits only within a call: it spins longer and sleeps less than an idle worker
    assert _ROOT_WAIT.spin >= _WORKER_WAIT.spin and _ROOT_WAIT.max_sleep <= _WORKER_WAIT.max_sleep


def test_a_single_rank_has_a_core_to_spin_on():
    assert _a_core_for_each_rank(MPI.COMM_SELF)


def test_workers_can_spawn_only_for_the_stock_recipe_without_configurator():
    from chemfit.fitting.fitter_context import FitterEvaluateContext

    terms = [lambda p: p["x"], lambda p: 2 * p["x"]]
    plain = CombinedObjectiveFunction(terms)
    assert _workers_can_spawn(plain, EvaluateContext())
    assert _workers_can_spawn(plain, FitterEvaluateContext())  # spawns as the base class

    def configurator(idx_child_ctx, child_ctx, num_children, parent_ctx):
        child_ctx.config.idx = idx_child_ctx

    configured = CombinedObjectiveFunction(terms, child_context_configurator=configurator)
    assert not _workers_can_spawn(configured, EvaluateContext())

    class Prepared(CombinedObjectiveFunction):
        def prepare_context(self, parameters, ctx=None):
            return super().prepare_context(parameters, ctx)

    class OwnChildren(EvaluateContext):
        def spawn_children(self, n_children, configurator=None):
            return super().spawn_children(n_children, configurator)

    assert not _workers_can_spawn(Prepared(terms), EvaluateContext())
    assert not _workers_can_spawn(plain, OwnChildren())


def test_contract_path_reexports():
    import chemfit.mpi_wrapper_cob as shim

    assert shim.MPIWrapperCOB is MPIWrapperCOB
    assert shim.slice_up_range is slice_up_range
    assert shim.Signal is Signal
