"""Executors chemfit does not know: learning that one runs its tasks in this process (issue 14).

An executor of kind ``"other"`` gets the wire form of the contexts until one of chemfit's tasks
runs on the caller's own objects in this process; from then on its calls get the caller's
contexts, written in place, as on a thread pool. One that pickles its tasks (it runs them in
another process, or could) never does. The script test defines the executors in ``__main__``,
as a user's script or notebook does.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from pathlib import Path

import pytest

import chemfit
from chemfit.core.context import EvaluateContext
from chemfit.execution.context_tasks import ContextTask, SentCalls
from chemfit.execution.executor_info import executor_info, note_ran_in_place
from chemfit.execution.executor_utils import as_completed_with_context, map_with_context
from chemfit.execution.worker_marks import current_task_executor
from tests.helpers import executor_task_functions as h

ROOT = Path(__file__).resolve().parents[2]
CHEMFIT_ROOT = Path(chemfit.__file__).resolve().parent.parent


class RunsAtOnce(Executor):
    """Runs each call at once in the caller's thread (an executor chemfit does not know)."""

    def __init__(self) -> None:
        self.submitted = 0

    def submit(self, fn, /, *args, **kwargs):
        self.submitted += 1
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:
            future.set_exception(exc)
        return future


class CopiesArguments(RunsAtOnce):
    """Runs each call here, on deep copies of its arguments (the function itself uncopied)."""

    def submit(self, fn, /, *args, **kwargs):
        return super().submit(fn, *copy.deepcopy(args), **copy.deepcopy(kwargs))


class PicklesEachTask(RunsAtOnce):
    """Runs each call here, but on a pickled copy of the task, as a remote executor must."""

    def submit(self, fn, /, *args, **kwargs):
        fn, args, kwargs = pickle.loads(pickle.dumps((fn, args, kwargs)))
        return super().submit(fn, *args, **kwargs)


def seen_in_place(x, ctx):
    """Writes ``temp`` (never sent back: visible only when written into the caller's context)."""
    ctx.temp.in_place = True
    ctx.loss = x * x
    ctx.meta["marked"] = current_task_executor() is not None
    return ctx.loss


def contexts(n: int) -> list[EvaluateContext]:
    return [EvaluateContext() for _ in range(n)]


def in_place(ctxs: list[EvaluateContext]) -> list[bool]:
    return [getattr(ctx.temp, "in_place", False) for ctx in ctxs]


def test_an_unknown_executor_that_runs_tasks_in_place_is_learned_after_its_first_task():
    executor = RunsAtOnce()
    assert not executor_info(executor).in_process  # unknown: it might run elsewhere
    first = contexts(3)
    assert map_with_context(executor, seen_in_place, [1, 2, 3], ctxs=first) == [1, 4, 9]
    assert [ctx.loss for ctx in first] == [1, 4, 9]  # the wire form's states, applied
    assert in_place(first) == [False] * 3
    info = executor_info(executor)
    assert (info.kind, info.in_process, info.main_reachable) == ("other", True, True)
    for chunksize in (1, 2):
        later = contexts(3)
        result = map_with_context(
            executor, seen_in_place, [1, 2, 3], ctxs=later, chunksize=chunksize
        )
        assert result == [1, 4, 9] and [ctx.loss for ctx in later] == [1, 4, 9]
        assert in_place(later) == [True] * 3, chunksize  # the caller's own contexts
        assert all(ctx.meta["marked"] for ctx in later)


@pytest.mark.parametrize("executor_class", [PicklesEachTask, CopiesArguments])
def test_an_unknown_executor_that_copies_what_it_runs_is_never_learned(executor_class):
    executor = executor_class()
    for _ in range(3):
        ctxs = contexts(3)
        assert map_with_context(executor, seen_in_place, [1, 2, 3], ctxs=ctxs) == [1, 4, 9]
        assert [ctx.loss for ctx in ctxs] == [1, 4, 9]
        assert in_place(ctxs) == [False] * 3
        assert not executor_info(executor).in_process


def test_known_kinds_and_unreferable_executors_are_left_alone(executors):
    for kind in ("process-pool", "loky"):
        note_ran_in_place(executors[kind])
        info = executor_info(executors[kind])
        assert info.kind == kind and not info.in_process
    note_ran_in_place("not an executor")  # neither weakly referable nor resolved: ignored
    note_ran_in_place(None)


def test_only_a_task_that_was_not_copied_on_calls_that_were_not_copied_teaches():
    executor = RunsAtOnce()
    info = executor_info(executor)
    task = ContextTask(seen_in_place, info)

    def calls():
        return SentCalls([((2,), EvaluateContext().to_wire())])

    pickle.loads(pickle.dumps(task))(calls())  # the task as another process runs it
    task(copy.deepcopy(calls()))  # calls copied on their way
    task(list(calls()))  # calls that did not come from chemfit's submitter
    assert not executor_info(executor).in_process
    values, states, _, failures = task(calls())
    assert (values, states[0]["loss"], failures) == ([4], 4, None)
    assert executor_info(executor).in_process


@pytest.mark.timeout(30)
def test_a_learned_executor_with_foreign_futures_raises_the_first_failure():
    with ThreadPoolExecutor(2) as pool:
        executor = h.ForeignExecutor(pool)  # its futures have result and cancel only
        map_with_context(executor, h.record_square, [1], ctxs=contexts(1))
        assert executor_info(executor).in_process
        ctxs = contexts(4)
        with pytest.raises(ValueError, match="odd input 1"):
            map_with_context(executor, h.fail_on_odd, [0, 1, 2, 3], ctxs=ctxs)
        assert [ctx.loss for ctx in ctxs] == [0, None, 4, None]
        done = dict(as_completed_with_context(executor, h.record_square, [2, 3], ctxs=ctxs[:2]))
        assert done == {0: 4, 1: 9} and ctxs[1].loss == 9


SCRIPT = textwrap.dedent(
    """
    import json
    import os
    from concurrent.futures import Executor, Future, ProcessPoolExecutor

    from chemfit.core.combined import CombinedObjectiveFunction
    from chemfit.core.context import EvaluateContext
    from chemfit.core.objectives import ObjectiveFunctor
    from chemfit.execution.executor_info import executor_info
    from chemfit.execution.executor_utils import map_with_context
    from chemfit.execution.executor_wrapper_cob import ExecutorWrapperCOB


    class CallersOwnExecutor(Executor):
        def submit(self, fn, /, *args, **kwargs):
            future = Future()
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:
                future.set_exception(exc)
            return future


    class ElsewhereExecutor(Executor):
        '''Unknown to chemfit; runs each call in a worker process.'''

        def __init__(self):
            self._pool = ProcessPoolExecutor(1)

        def submit(self, fn, /, *args, **kwargs):
            return self._pool.submit(fn, *args, **kwargs)

        def shutdown(self, wait=True, **kwargs):
            self._pool.shutdown(wait=wait)


    class Term(ObjectiveFunctor):
        def __init__(self, k):
            self.k = k

        def __call__(self, parameters, ctx=None):
            value = (parameters["x"] - 0.01 * self.k) ** 2
            if ctx is not None:
                ctx.temp.in_place = True
                ctx.meta["pid"] = os.getpid()
                ctx.loss = value
            return value


    def square(x, ctx):
        ctx.temp.in_place = True
        ctx.meta["pid"] = os.getpid()
        ctx.loss = x * x
        return ctx.loss


    def maps(executor):
        rounds = []
        for _ in range(3):
            ctxs = [EvaluateContext() for _ in range(4)]
            values = map_with_context(executor, square, range(4), ctxs=ctxs)
            rounds.append({
                "values": values,
                "losses": [ctx.loss for ctx in ctxs],
                "in_place": [getattr(ctx.temp, "in_place", False) for ctx in ctxs],
                "here": [ctx.meta["pid"] == os.getpid() for ctx in ctxs],
                "in_process_after": executor_info(executor).in_process,
            })
        return rounds


    def wrapped(executor):
        cob = CombinedObjectiveFunction([Term(k) for k in range(100)])
        serial = cob({"x": 0.5})
        outcomes = []
        with ExecutorWrapperCOB(cob, executor) as wrapper:
            for _ in range(4):
                ctx = EvaluateContext()
                value = wrapper({"x": 0.5}, ctx)
                children = ctx.meta["children"]
                outcomes.append({
                    "same_value": value == serial,
                    "tasks": wrapper.last_tasks,
                    "here": all(c["meta"]["pid"] == os.getpid() for c in children),
                })
        return outcomes


    if __name__ == "__main__":
        result = {}
        own = CallersOwnExecutor()
        result["own"] = {"maps": maps(own), "wrapper": wrapped(CallersOwnExecutor())}
        elsewhere = ElsewhereExecutor()
        try:
            result["elsewhere"] = {"maps": maps(elsewhere), "wrapper": wrapped(elsewhere)}
        finally:
            elsewhere.shutdown()
        print("RESULT " + json.dumps(result))
    """
)


def run_script(path: Path, timeout: float = 120) -> dict:
    """Run ``path`` as ``__main__`` in its own process group; its RESULT line."""
    paths = [str(CHEMFIT_ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    proc = subprocess.Popen(
        [sys.executable, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(paths)},
        cwd=path.parent,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"{path} hung for {timeout} s\n{stdout}\n{stderr}")
    assert proc.returncode == 0, f"rc={proc.returncode}\n{stdout}\n{stderr[-6000:]}"
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, f"expected one RESULT line\n{stdout}\n{stderr[-6000:]}"
    return json.loads(lines[0][len("RESULT ") :])


@pytest.mark.timeout(150)
def test_executors_defined_in_a_script_run_as_main(tmp_path):
    script = tmp_path / "user_script.py"
    script.write_text(SCRIPT)
    result = run_script(script)

    own = result["own"]["maps"]
    assert all(r["values"] == [0, 1, 4, 9] and r["losses"] == [0, 1, 4, 9] for r in own)
    assert [r["in_place"] for r in own] == [[False] * 4] + [[True] * 4] * 2
    assert [r["in_process_after"] for r in own] == [True] * 3
    wrapper = result["own"]["wrapper"]
    assert all(call["same_value"] and call["here"] for call in wrapper)
    assert wrapper[0]["tasks"] == 100  # before the terms were timed: one task per term
    assert wrapper[-1]["tasks"] == 0  # then, on an in-process executor, in this thread

    elsewhere = result["elsewhere"]["maps"]
    for r in elsewhere:  # never learned: always the wire form, the states applied
        assert r["values"] == [0, 1, 4, 9] and r["losses"] == [0, 1, 4, 9]
        assert r["in_place"] == [False] * 4 and r["here"] == [False] * 4
        assert r["in_process_after"] is False
    remote = result["elsewhere"]["wrapper"]
    assert all(call["same_value"] and not call["here"] and call["tasks"] for call in remote)
