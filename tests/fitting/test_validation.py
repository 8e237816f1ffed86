"""``Fitter(validation=...)``: a held-out objective at each new best, and the early stop.

The problem with a known answer is a polynomial over-fit: a degree-11 Legendre series fitted
to 12 noisy samples of ``sin(2t)`` (it can interpolate the noise), validated on the noise-free
curve. L-BFGS-B first fits the curve, then the noise: the validation loss falls to a minimum
and rises again while the training loss keeps falling, which is what the early stop is for.
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from chemfit import Fitter
from chemfit.fitting.callbacks import JSONLinesHistory
from chemfit.fitting.observations import load_observations
from chemfit.fitting.results import FitHistory, FitResult

DEGREE = 11
NAMES = [f"c{i}" for i in range(DEGREE + 1)]
_rng = np.random.default_rng(0)
T_TRAIN = np.linspace(-1, 1, DEGREE + 1)
Y_TRAIN = np.sin(2 * T_TRAIN) + _rng.normal(0, 0.3, T_TRAIN.size)
T_VALID = np.linspace(-1, 1, 101)
Y_VALID = np.sin(2 * T_VALID)
V_TRAIN = np.polynomial.legendre.legvander(T_TRAIN, DEGREE)
V_VALID = np.polynomial.legendre.legvander(T_VALID, DEGREE)


def _coefficients(p: dict) -> np.ndarray:
    return np.array([p[name] for name in NAMES])


def training_loss(p: dict) -> float:
    return float(np.mean((V_TRAIN @ _coefficients(p) - Y_TRAIN) ** 2))


def validation_loss(p: dict) -> float:
    return float(np.mean((V_VALID @ _coefficients(p) - Y_VALID) ** 2))


def _polynomial_fitter(**options) -> Fitter:
    return Fitter(training_loss, dict.fromkeys(NAMES, 0.0), validation=validation_loss, **options)


def _check_every_improvement(history: FitHistory) -> None:
    """One validation per improvement, in order, each the held-out loss at that record."""
    improved = [history[position] for position in history.improvements()]
    assert [index for index, _ in history.validation] == [r.index for r in improved]
    for (_, loss), record in zip(history.validation, improved):
        assert loss == validation_loss(record.parameters)


# -- recorded for every improvement ------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("mode", "workers"),
    [("batch", 1), ("batch", 2), ("async", 2)],
    ids=["serial", "batch", "async"],
)
def test_nevergrad_records_validation_for_every_improvement(mode, workers):
    fitter = _polynomial_fitter()
    with ThreadPoolExecutor(workers) as pool:
        fitter.fit_nevergrad(
            budget=120,
            optimizer_str="OnePlusOne",
            num_workers=workers,
            executor=pool if workers > 1 else None,
            mode=mode,
            seed=1,
            progress=False,
        )
    result = fitter.result
    assert result.n_evals == 120 and not result.stopped
    assert len(result.validation) == len(result.history.improvements()) > 3
    _check_every_improvement(result.history)
    assert result.best_validation_loss == min(loss for _, loss in result.validation)


@pytest.mark.timeout(60)
def test_scipy_records_validation_for_every_improvement():
    fitter = _polynomial_fitter()
    fitter.fit_scipy(options={"maxiter": 50})
    _check_every_improvement(fitter.result.history)
    assert len(fitter.result.validation) > 10


@pytest.mark.timeout(60)
def test_hand_driven_fit_validates_at_tell():
    fitter = Fitter(lambda p: (p["x"] - 1.0) ** 2, {"x": 0.0}, validation=lambda p: p["x"] ** 2)
    fitter.init(num_workers=2)
    fitter.ask([{"x": 3.0}, {"x": 2.0}])
    fitter.tell()
    fitter.ask([{"x": 5.0}, {"x": 1.5}])
    fitter.tell()
    fitter.finish()
    assert fitter.result.validation == [(0, 9.0), (1, 4.0), (3, 2.25)]
    assert fitter.result.best_validation_loss == 2.25


@pytest.mark.timeout(120)
def test_the_fit_loop_does_not_wait_for_the_validation():
    """A slow validation runs beside the fit: the loop's evaluations are not held up by it;
    the fit waits for the last ones when it finishes."""
    pause = 0.3
    told_at: list[float] = []

    def slow_validation(p):
        time.sleep(pause)
        return validation_loss(p)

    fitter = Fitter(training_loss, dict.fromkeys(NAMES, 0.0), validation=slow_validation)
    fitter.register_evaluation_callback(lambda record: told_at.append(time.perf_counter()))
    with ThreadPoolExecutor(8) as pool:
        start = time.perf_counter()
        fitter.fit_nevergrad(
            budget=60, optimizer_str="OnePlusOne", num_workers=2, executor=pool, seed=0,
            progress=False,
        )  # fmt: skip
        end = time.perf_counter()
    n = len(fitter.result.validation)
    assert n == len(fitter.result.history.improvements()) >= 6
    # waiting for each validation would take (n - 1) * pause between the first and last record
    assert told_at[-1] - told_at[0] < 0.4 * (n - 1) * pause
    assert end - start > pause  # the last validation was waited for
    _check_every_improvement(fitter.result.history)


# -- the early stop on an over-fit --------------------------------------------------------------


@pytest.mark.timeout(60)
def test_overfit_without_patience_runs_to_the_end():
    fitter = _polynomial_fitter()
    fitter.fit_scipy(options={"maxiter": 2000})
    result = fitter.result
    losses = [loss for _, loss in result.validation]
    best = int(np.argmin(losses))
    assert not result.stopped
    # the constructed over-fit: the validation loss has a minimum well before the end and
    # ends at least twice as high, while the training loss ends far below its value there
    assert 0 < best < len(losses) // 2
    assert losses[-1] > 2 * losses[best]
    record_at_best = next(r for r in result.history if r.index == result.validation[best][0])
    assert result.best_loss < record_at_best.loss / 100


@pytest.mark.timeout(60)
@pytest.mark.parametrize("patience", [1, 5])
def test_overfit_triggers_the_early_stop(patience, caplog):
    full = _polynomial_fitter()
    full.fit_scipy(options={"maxiter": 2000})
    fitter = _polynomial_fitter(validation_patience=patience)
    with caplog.at_level(logging.INFO, logger="chemfit"):
        fitter.fit_scipy(options={"maxiter": 2000})
    result = fitter.result
    assert result.stopped and result.converged is False
    assert result.n_evals < full.result.n_evals
    losses = [loss for _, loss in result.validation]
    # it stopped at the first run of `patience` validations without a new best
    expected = _first_stop(losses, patience)
    assert expected is not None and len(losses) == expected + 1
    assert losses == [loss for _, loss in full.result.validation][: len(losses)]
    assert result.best_validation_loss == min(losses)
    assert any(
        f"has not improved for {patience} improvements of the training loss" in message
        for message in caplog.messages
    ), caplog.messages
    assert "stopped early" in " ".join(result._warnings())


def _first_stop(losses: list[float], patience: int) -> int | None:
    """The position of the validation at which the early stop must come."""
    best, since = math.inf, 0
    for position, loss in enumerate(losses):
        best, since = (loss, 0) if loss < best else (best, since + 1)
        if since >= patience:
            return position
    return None


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["batch", "async"])
def test_nevergrad_early_stop(mode):
    fitter = _polynomial_fitter(validation_patience=4)
    with ThreadPoolExecutor(2) as pool:
        fitter.fit_nevergrad(
            budget=3000,
            optimizer_str="OnePlusOne",
            num_workers=2,
            executor=pool,
            mode=mode,
            seed=0,
            progress=False,
        )
    result = fitter.result
    assert result.stopped and result.n_evals < 3000
    losses = [loss for _, loss in result.validation]
    stop_at = _first_stop(losses, 4)
    assert stop_at is not None  # the evaluations in flight may add validations after it
    _check_every_improvement(result.history)
    assert fitter.stop_requested is False  # the fit consumed the request


# -- JSON, JSON lines, resume ---------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_validation_survives_to_dict_json_and_jsonl(tmp_path):
    path = tmp_path / "fit.jsonl"
    fitter = _polynomial_fitter()
    fitter.register_evaluation_callback(JSONLinesHistory(path, append=False))
    fitter.fit_scipy(options={"maxiter": 30})
    result = fitter.result
    assert len(result.validation) > 5

    text = json.dumps(result.to_dict(), allow_nan=False)
    again = FitResult.from_dict(json.loads(text))
    assert again.validation == result.validation
    assert again.best_validation_loss == result.best_validation_loss

    from_file = FitHistory.from_jsonl(path)
    assert list(from_file) == list(result.history)
    assert from_file.validation == result.validation
    observations = load_observations(path, fitter.initial_parameters)  # skips validation lines
    assert len(observations) == result.n_evals
    assert observations.next_index == result.n_evals


@pytest.mark.timeout(60)
def test_non_finite_validation_survives_json():
    fitter = Fitter(
        lambda p: (p["x"] - 1.0) ** 2, {"x": 0.0}, validation=lambda p: math.inf if p["x"] else 1.0
    )
    fitter.fit_scipy(options={"maxiter": 3})
    losses = [loss for _, loss in fitter.result.validation]
    assert losses[0] == 1.0 and math.inf in losses
    again = FitResult.from_dict(json.loads(json.dumps(fitter.result.to_dict(), allow_nan=False)))
    assert again.validation == fitter.result.validation


@pytest.mark.timeout(120)
def test_resume_keeps_and_continues_the_validation():
    fitter = _polynomial_fitter()
    fitter.fit_nevergrad(budget=40, optimizer_str="OnePlusOne", seed=0, progress=False)
    first = fitter.result.validation
    fitter.fit_nevergrad(budget=60, optimizer_str="OnePlusOne", resume=True, progress=False)
    result = fitter.result
    assert result.n_evals == 100
    assert result.validation[: len(first)] == first
    assert len(result.validation) > len(first)
    _check_every_improvement(result.history)
    again = FitResult.from_dict(result.to_dict())
    fitter.result = again  # resume from a result read back from JSON
    fitter.fit_nevergrad(budget=10, optimizer_str="OnePlusOne", resume=True, progress=False)
    assert fitter.result.validation[: len(result.validation)] == result.validation


# -- errors ---------------------------------------------------------------------------------------


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match="validation must be an objective evaluated on held-out"):
        Fitter(training_loss, {"x": 0.0}, validation=[1, 2])
    with pytest.raises(ValueError, match="validation_patience=3 needs a validation objective"):
        Fitter(training_loss, {"x": 0.0}, validation_patience=3)
    with pytest.raises(ValueError, match="validation_patience must be >= 1"):
        Fitter(training_loss, {"x": 0.0}, validation=validation_loss, validation_patience=0)
    with pytest.raises(TypeError, match="validation_patience must be an int"):
        Fitter(training_loss, {"x": 0.0}, validation=validation_loss, validation_patience=2.5)


def _broken_validation(p: dict) -> float:
    if p["x"] > 0.5:
        raise ArithmeticError("held-out data unreadable")
    return 1.0


@pytest.mark.timeout(60)
def test_a_raising_validation_ends_the_fit_with_its_error(caplog):
    fitter = Fitter(
        lambda p: (p["x"] - 1.0) ** 2,
        {"x": 0.0},
        bounds={"x": (0.0, 2.0)},
        validation=_broken_validation,
    )
    with pytest.raises(ArithmeticError, match="held-out data unreadable"):
        fitter.fit_scipy(method="Nelder-Mead")
    assert fitter.result.error.startswith("ArithmeticError")
    assert fitter.result.validation[0] == (0, 1.0)
    assert any("validation objective raised" in m for m in caplog.messages)


@pytest.mark.timeout(60)
def test_a_raising_validation_is_nan_with_swallow_exceptions(caplog):
    fitter = Fitter(
        lambda p: (p["x"] - 1.0) ** 2,
        {"x": 0.0},
        bounds={"x": (0.0, 2.0)},
        validation=_broken_validation,
        swallow_exceptions=True,
    )
    with caplog.at_level(logging.WARNING, logger="chemfit"):
        fitter.fit_scipy(method="Nelder-Mead")
    losses = [loss for _, loss in fitter.result.validation]
    assert losses[0] == 1.0 and any(math.isnan(loss) for loss in losses)
    assert fitter.result.error is None
    assert any("recorded as NaN" in m for m in caplog.messages)


# -- a process pool, objectives defined in __main__ ------------------------------------------------

SCRIPT = """
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor

import loky
import numpy as np

from chemfit import Fitter

t = np.linspace(-1, 1, 8)
y = np.sin(2 * t) + np.random.default_rng(0).normal(0, 0.3, t.size)
tv = np.linspace(-1, 1, 41)


class HeldOut:  # a class of __main__: it reaches the workers by value
    def __init__(self, t, y):
        self.t, self.y = t, y

    def __call__(self, p, ctx):
        with open("validated_in.txt", "a") as fh:  # which process evaluated it
            fh.write(f"{os.getpid()} ")
        return float(np.mean((model(p, self.t) - self.y) ** 2))


def model(p, t):
    return p["a"] + p["b"] * t + p["c"] * t**2 + p["d"] * t**3


def train(p):
    return float(np.mean((model(p, t) - y) ** 2))


validation = HeldOut(tv, np.sin(2 * tv))
out = {}
executors = {"process": ProcessPoolExecutor(2), "loky": loky.get_reusable_executor(max_workers=2)}
try:
    for name, executor in executors.items():
        fitter = Fitter(train, {"a": 0.0, "b": 0.0, "c": 0.0, "d": 0.0}, validation=validation)
        fitter.fit_nevergrad(budget=60, optimizer_str="OnePlusOne", num_workers=2,
                             executor=executor, mode=sys.argv[1], seed=0, progress=False)
        pids = set(open("validated_in.txt").read().split())
        os.remove("validated_in.txt")
        history = fitter.result.history
        records = {r.index: r for r in history}
        out[name] = {
            "stopped": fitter.result.stopped,
            "in_main_process": str(os.getpid()) in pids,
            "n_processes": len(pids),
            "improved": [history[i].index for i in history.improvements()],
            "validation": [[i, loss] for i, loss in fitter.result.validation],
            "expected": [
                float(np.mean((model(records[i].parameters, tv) - np.sin(2 * tv)) ** 2))
                for i, _ in fitter.result.validation
            ],
        }
finally:
    executors["process"].shutdown(wait=True)
    executors["loky"].shutdown(wait=True, kill_workers=True)
print(json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["batch", "async"])
def test_main_defined_validation_on_a_process_pool_and_loky(tmp_path, mode):
    script = tmp_path / "fit_with_validation.py"
    script.write_text(textwrap.dedent(SCRIPT))
    proc = subprocess.run(
        [sys.executable, str(script), mode],
        capture_output=True,
        text=True,
        timeout=280,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in ("process", "loky"):
        run = out[name]
        assert not run["stopped"]
        assert not run["in_main_process"] and run["n_processes"] >= 1, run
        assert [i for i, _ in run["validation"]] == run["improved"]
        np.testing.assert_allclose([v for _, v in run["validation"]], run["expected"], rtol=1e-12)
