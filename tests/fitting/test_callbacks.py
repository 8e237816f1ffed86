"""Tests of chemfit.fitter_callbacks (fitting/callbacks.py)."""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from chemfit.core.context import EvaluateContext
from chemfit.fitting.callbacks import (
    CheckpointBestParameters,
    JSONLinesHistory,
    NumpyEncoder,
    SaveMetaData,
    load_observations,
    log_progress,
)
from chemfit.fitting.results import EvaluationRecord

CALLBACKS_LOGGER = "chemfit.fitting.callbacks"


class StepContext(EvaluateContext):
    """Stand-in for FitterEvaluateContext: an EvaluateContext with the best-so-far fields."""

    def __init__(self, opt_loss=None, opt_params=None, opt_meta=None, n_evals=0):
        super().__init__()
        self.opt_loss = opt_loss
        self.opt_params = opt_params
        self.opt_meta = opt_meta
        self.n_evals = n_evals


def _record(index, params, loss, meta=None, **kw):
    fields = dict(
        index=index,
        step=kw.pop("step", index),
        worker=kw.pop("worker", 0),
        parameters=params,
        loss=loss,
        raw_loss=kw.pop("raw_loss", loss),
        penalised=kw.pop("penalised", False),
        error=kw.pop("error", None),
        meta=meta,
        time=kw.pop("time", 0.01 * index),
    )
    assert not kw
    return EvaluationRecord(**fields)


# -- log_progress -----------------------------------------------------------------------------


def test_log_progress_logs_contexts_and_overall_best(caplog):
    ctxs = [
        StepContext(opt_loss=3.0, opt_params={"a": 3.0}, n_evals=2),
        StepContext(opt_loss=1.0, opt_params={"a": 1.0}, n_evals=5),
        StepContext(),  # not evaluated yet
    ]
    ctxs[0].loss, ctxs[0].parameters = 4.0, {"a": 4.0}
    with caplog.at_level(logging.INFO, logger=CALLBACKS_LOGGER):
        log_progress(7, ctxs)
    text = caplog.text
    assert all(r.levelno == logging.INFO for r in caplog.records)
    assert "Step = 7" in text
    assert "Context 2" in text
    assert "Opt loss (all contexts)   = 1.0" in text
    assert "Opt params (all contexts) = {'a': 1.0}" in text
    assert "Cur params = {'a': 4.0}" in text


def test_log_progress_without_any_best(caplog):
    with caplog.at_level(logging.INFO, logger=CALLBACKS_LOGGER):
        log_progress(0, [StepContext()])
    assert "Opt loss (all contexts)   = None" in caplog.text


# -- NumpyEncoder -----------------------------------------------------------------------------


def test_numpy_encoder_arrays_scalars_and_fallback_repr():
    class Custom:
        def __repr__(self):
            return "Custom()"

    data = {
        "arr": np.arange(6, dtype=np.int32).reshape(2, 3),
        "f32": np.float32(1.5),
        "i64": np.int64(-2),
        "bool": np.bool_(False),
        "nested": [{"x": np.ones(2)}, (np.float64(2.0),)],
        "obj": Custom(),
        "cplx": np.complex128(1 + 2j),
        "path": Path("a") / "b",
        "set": {3},
    }
    out = json.loads(json.dumps(data, cls=NumpyEncoder))
    assert out["arr"] == [[0, 1, 2], [3, 4, 5]]
    assert out["f32"] == 1.5 and out["i64"] == -2 and out["bool"] is False
    assert out["nested"] == [{"x": [1.0, 1.0]}, [2.0]]
    assert out["obj"] == "Custom()"
    assert out["cplx"] == "(1+2j)"
    assert out["path"] == str(Path("a") / "b")
    assert out["set"] == "{3}"


def test_numpy_encoder_fixes_keys_json_cannot_hold():
    data = {np.int64(1): "a", (1, 2): "b", "ok": {np.float32(0.5): [{np.str_("s"): 1}]}}
    out = json.loads(json.dumps(data, cls=NumpyEncoder))
    assert out == {"1": "a", "(1, 2)": "b", "ok": {"0.5": [{"s": 1}]}}
    assert data[np.int64(1)] == "a"  # the input is not modified


def test_numpy_encoder_object_array_with_dicts():
    arr = np.array([{np.int64(3): 1}, None], dtype=object)
    assert json.loads(json.dumps({"a": arr}, cls=NumpyEncoder)) == {"a": [{"3": 1}, None]}


def test_numpy_encoder_detects_cycles():
    loop = {}
    loop["self"] = loop
    with pytest.raises(ValueError, match="Circular"):
        json.dumps(loop, cls=NumpyEncoder)


# -- SaveMetaData -----------------------------------------------------------------------------


def _evaluated_context(i):
    ctx = StepContext(opt_loss=float(i), opt_params={"a": float(i)})
    ctx.parameters = {"a": float(i), "b": {"c": np.float32(2.0)}}
    ctx.loss = np.float64(i)
    ctx.quantities = {"forces": np.zeros((2, 3))}
    ctx.meta = {"energies": np.arange(3.0), "tag": f"ctx{i}"}
    return ctx


def test_save_meta_data_creates_nested_folders_and_writes_each_context(tmp_path):
    folder = tmp_path / "a" / "b" / "c"
    callback = SaveMetaData(folder)
    assert folder.is_dir()
    ctxs = [_evaluated_context(0), _evaluated_context(1)]
    callback(4, ctxs)
    assert sorted(p.name for p in folder.iterdir()) == ["step_4_ctx_0.json", "step_4_ctx_1.json"]
    text = (folder / "step_4_ctx_1.json").read_text()
    assert text.startswith('{\n    "quantities"')  # indent 4
    data = json.loads(text)
    assert data == {
        "quantities": {"forces": [[0.0] * 3] * 2},
        "parameters": {"a": 1.0, "b": {"c": 2.0}},
        "loss": 1.0,
        "meta": {"energies": [0.0, 1.0, 2.0], "tag": "ctx1"},
    }


def test_save_meta_data_accepts_str_and_existing_folder(tmp_path):
    SaveMetaData(str(tmp_path))(0, [_evaluated_context(0)])
    assert (tmp_path / "step_0_ctx_0.json").is_file()


def test_save_meta_data_write_error_is_logged_and_fit_continues(tmp_path, caplog):
    folder = tmp_path / "out"
    callback = SaveMetaData(folder)
    # a directory where the file should go makes that one write fail
    (folder / "step_1_ctx_0.json").mkdir()
    with caplog.at_level(logging.ERROR, logger=CALLBACKS_LOGGER):
        callback(1, [_evaluated_context(0), _evaluated_context(1)])  # must not raise
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "step_1_ctx_0.json" in errors[0].getMessage()
    assert errors[0].exc_info is not None
    # the other context was still written
    assert json.loads((folder / "step_1_ctx_1.json").read_text())["meta"]["tag"] == "ctx1"


def test_save_meta_data_unserialisable_meta_still_written(tmp_path):
    ctx = _evaluated_context(0)
    ctx.meta["weird"] = object()
    SaveMetaData(tmp_path)(0, [ctx])
    meta = json.loads((tmp_path / "step_0_ctx_0.json").read_text())["meta"]
    assert meta["weird"].startswith("<object object")


# -- CheckpointBestParameters -----------------------------------------------------------------


def test_checkpoint_writes_only_on_improvement(tmp_path, caplog):
    path = tmp_path / "ckpt" / "best.json"
    checkpoint = CheckpointBestParameters(path)
    ctxs = [
        StepContext(opt_loss=5.0, opt_params={"a": 5.0}, opt_meta={"m": 5}),
        StepContext(opt_loss=3.0, opt_params={"a": 3.0}, opt_meta={"m": 3}),
    ]
    with caplog.at_level(logging.INFO, logger=CALLBACKS_LOGGER):
        checkpoint(0, ctxs)
    assert checkpoint.best_loss == 3.0
    assert json.loads(path.read_text()) == {
        "step": 0,
        "loss": 3.0,
        "parameters": {"a": 3.0},
        "meta": {"m": 3},
    }
    assert "New best loss 3.0" in caplog.text

    mtime = path.stat().st_mtime_ns
    checkpoint(1, ctxs)  # nothing improved: no write
    assert path.stat().st_mtime_ns == mtime
    assert json.loads(path.read_text())["step"] == 0

    ctxs[0].opt_loss, ctxs[0].opt_params, ctxs[0].opt_meta = 1.0, {"a": 1.0}, {"m": 1}
    checkpoint(2, ctxs)
    assert json.loads(path.read_text()) == {
        "step": 2,
        "loss": 1.0,
        "parameters": {"a": 1.0},
        "meta": {"m": 1},
    }
    assert checkpoint.best_loss == 1.0


def test_checkpoint_ignores_contexts_without_a_best(tmp_path):
    path = tmp_path / "best.json"
    checkpoint = CheckpointBestParameters(path)
    checkpoint(0, [StepContext(), StepContext(opt_loss=float("nan"), opt_params={"a": 0.0})])
    assert not path.exists() and checkpoint.best_loss is None


def test_checkpoint_valid_json_with_arrays_anywhere_in_meta(tmp_path):
    path = tmp_path / "best.json"
    meta = {
        "children": [
            {"quantities": {"energy": np.float64(-1.0), "forces": np.ones((2, 3))}},
            {"meta": {"deep": [np.arange(3), {np.int64(4): np.float32(0.5)}]}},
        ],
        "array": np.eye(2),
        "obj": object(),
    }
    ctx = StepContext(opt_loss=np.float64(0.5), opt_params={"a": np.float32(1.0)}, opt_meta=meta)
    CheckpointBestParameters(path)(3, [ctx])
    data = json.loads(path.read_text())  # valid JSON
    assert data["loss"] == 0.5 and data["parameters"] == {"a": 1.0}
    assert data["meta"]["children"][0]["quantities"]["forces"] == [[1.0] * 3] * 2
    assert data["meta"]["children"][1]["meta"]["deep"] == [[0, 1, 2], {"4": 0.5}]
    assert data["meta"]["array"] == [[1.0, 0.0], [0.0, 1.0]]


def test_checkpoint_is_atomic_replace_with_no_temp_files(tmp_path):
    path = tmp_path / "best.json"
    path.write_text("old checkpoint")
    # The open handle keeps the old inode alive, so the filesystem cannot reuse its number.
    with path.open() as old_file:
        inode = os.fstat(old_file.fileno()).st_ino
        checkpoint = CheckpointBestParameters(path)
        for step, loss in enumerate([3.0, 2.0, 1.0]):
            checkpoint(step, [StepContext(opt_loss=loss, opt_params={"a": loss}, opt_meta={})])
        assert json.loads(path.read_text())["loss"] == 1.0
        assert os.stat(path).st_ino != inode  # replaced, not rewritten in place
        assert old_file.read() == "old checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["best.json"]


def test_checkpoint_dont_overwrite_writes_numbered_files(tmp_path):
    path = tmp_path / "best.json"
    (tmp_path / "best_1.json").write_text("someone else's")
    checkpoint = CheckpointBestParameters(path, dont_overwrite=True)
    for step, loss in enumerate([3.0, 2.0, 2.5, 1.0]):
        checkpoint(step, [StepContext(opt_loss=loss, opt_params={"a": loss}, opt_meta=None)])
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["best_0.json", "best_1.json", "best_2.json", "best_3.json"]
    assert not path.exists()
    assert (tmp_path / "best_1.json").read_text() == "someone else's"
    losses = [json.loads((tmp_path / f"best_{i}.json").read_text())["loss"] for i in (0, 2, 3)]
    assert losses == [3.0, 2.0, 1.0]
    assert checkpoint.last_path == tmp_path / "best_3.json"


def test_checkpoint_write_error_is_logged_and_retried(tmp_path, caplog):
    path = tmp_path / "best.json"
    path.mkdir()
    (path / "blocker").write_text("x")  # os.replace cannot put a file over it
    checkpoint = CheckpointBestParameters(path)
    ctx = StepContext(opt_loss=1.0, opt_params={"a": 1.0}, opt_meta={})
    with caplog.at_level(logging.ERROR, logger=CALLBACKS_LOGGER):
        checkpoint(0, [ctx])
    assert any(r.levelno == logging.ERROR for r in caplog.records)
    assert checkpoint.best_loss is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.json"]  # no temp file left
    (path / "blocker").unlink()
    path.rmdir()
    checkpoint(1, [ctx])  # same loss, written now
    assert json.loads(path.read_text())["step"] == 1


# -- JSONLinesHistory and load_observations ---------------------------------------------------


def test_history_appends_one_line_per_record(tmp_path):
    path = tmp_path / "h" / "fit.jsonl"
    history = JSONLinesHistory(path)
    records = [
        _record(0, {"a": 1.0, "b": {"c": 2.0}}, 3.0, meta={"arr": np.arange(2)}),
        _record(1, {"a": 0.5, "b": {"c": 1.0}}, 1e5, penalised=True, raw_loss=float("nan")),
    ]
    for r in records:
        history(r)
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and history.n_written == 2
    assert [json.loads(line) for line in lines] == [r.to_dict() for r in records]
    assert EvaluationRecord.from_dict(json.loads(lines[0])).parameters == records[0].parameters
    assert load_observations(path) == [
        ({"a": 1.0, "b": {"c": 2.0}}, 3.0),
        ({"a": 0.5, "b": {"c": 1.0}}, 1e5),
    ]


def test_history_line_is_flushed_immediately(tmp_path):
    path = tmp_path / "fit.jsonl"
    history = JSONLinesHistory(path)
    history(_record(0, {"a": 1.0}, 2.0))
    # visible to an independent reader without closing or deleting the callback
    with open(path, encoding="utf-8") as fh:
        assert json.loads(fh.readline())["loss"] == 2.0


def test_history_append_and_overwrite(tmp_path):
    path = tmp_path / "fit.jsonl"
    JSONLinesHistory(path)(_record(0, {"a": 1.0}, 1.0))
    JSONLinesHistory(path, append=True)(_record(0, {"a": 2.0}, 2.0))
    assert [loss for _, loss in load_observations(path)] == [1.0, 2.0]
    fresh = JSONLinesHistory(path, append=False)
    assert path.read_text() == ""
    fresh(_record(0, {"a": 3.0}, 3.0))
    assert load_observations(path) == [({"a": 3.0}, 3.0)]


def test_history_arrays_in_meta_of_plain_mapping_records(tmp_path):
    # duck-typed records (mappings) with raw numpy values still give valid JSON lines
    path = tmp_path / "fit.jsonl"
    history = JSONLinesHistory(path)
    history({"parameters": {"a": np.float64(1.0)}, "loss": np.float32(0.5), "meta": np.ones(2)})
    assert json.loads(path.read_text()) == {
        "parameters": {"a": 1.0},
        "loss": 0.5,
        "meta": [1.0, 1.0],
    }
    with pytest.raises(TypeError, match="EvaluationRecord"):
        history(42)


def test_history_append_drops_truncated_tail_before_writing(tmp_path, caplog):
    path = tmp_path / "fit.jsonl"
    good = json.dumps(_record(0, {"a": 1.0}, 1.0).to_dict())
    path.write_text(good + "\n" + good[:25])  # killed while writing the second line
    with caplog.at_level(logging.WARNING, logger=CALLBACKS_LOGGER):
        history = JSONLinesHistory(path)
    assert "truncated" in caplog.text
    history(_record(1, {"a": 2.0}, 2.0))
    assert load_observations(path) == [({"a": 1.0}, 1.0), ({"a": 2.0}, 2.0)]


def test_history_append_completes_a_last_line_without_newline(tmp_path):
    path = tmp_path / "fit.jsonl"
    path.write_text(json.dumps({"parameters": {"a": 1.0}, "loss": 1.0}))
    JSONLinesHistory(path)(_record(1, {"a": 2.0}, 2.0))
    assert load_observations(path) == [({"a": 1.0}, 1.0), ({"a": 2.0}, 2.0)]


def test_history_is_picklable(tmp_path):
    history = JSONLinesHistory(tmp_path / "fit.jsonl")
    clone = pickle.loads(pickle.dumps(history))
    clone(_record(0, {"a": 1.0}, 1.0))
    assert load_observations(tmp_path / "fit.jsonl") == [({"a": 1.0}, 1.0)]


def test_load_observations_truncated_last_line_skipped_with_warning(tmp_path, caplog):
    path = tmp_path / "fit.jsonl"
    lines = [json.dumps(_record(i, {"a": float(i)}, float(i)).to_dict()) for i in range(3)]
    path.write_text("\n".join(lines[:2]) + "\n" + lines[2][:30])
    with caplog.at_level(logging.WARNING, logger=CALLBACKS_LOGGER):
        obs = load_observations(path)
    assert obs == [({"a": 0.0}, 0.0), ({"a": 1.0}, 1.0)]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "line 3" in warnings[0].getMessage()


def test_load_observations_bad_line_raises_with_line_number(tmp_path):
    path = tmp_path / "fit.jsonl"
    good = json.dumps({"parameters": {"a": 1.0}, "loss": 1.0})
    path.write_text(f"{good}\n\n{{not json\n{good}\n")
    with pytest.raises(ValueError, match=r"fit\.jsonl, line 3"):
        load_observations(path)


@pytest.mark.parametrize(
    "bad",
    [
        '{"loss": 1.0}',
        '{"parameters": {"a": 1.0}}',
        "[1, 2]",
        '{"parameters": [1.0], "loss": 1.0}',
        '{"parameters": {"a": "x"}, "loss": 1.0}',
        '{"parameters": {"a": 1.0}, "loss": "one"}',
    ],
)
def test_load_observations_wrong_content_raises_even_on_last_line(tmp_path, bad):
    path = tmp_path / "fit.jsonl"
    path.write_text(json.dumps({"parameters": {"a": 1.0}, "loss": 1.0}) + "\n" + bad + "\n")
    with pytest.raises(ValueError, match="line 2"):
        load_observations(path)


def test_load_observations_non_finite_and_null_losses(tmp_path):
    path = tmp_path / "fit.jsonl"
    path.write_text(
        '{"parameters": {"a": 1}, "loss": null}\n'
        '{"parameters": {"a": 2}, "loss": "inf"}\n'
        '{"parameters": {"a": "nan"}, "loss": 3}\n'
    )
    obs = load_observations(path)
    assert obs[0] == ({"a": 1.0}, None)
    assert obs[1] == ({"a": 2.0}, math.inf)
    assert math.isnan(obs[2][0]["a"]) and obs[2][1] == 3.0


def test_load_observations_empty_file(tmp_path):
    path = tmp_path / "fit.jsonl"
    path.write_text("")
    assert load_observations(path) == []


def test_contract_module_path():
    import chemfit.fitter_callbacks as shim

    for name in shim.__all__:
        assert getattr(shim, name) is not None
    assert shim.JSONLinesHistory is JSONLinesHistory
    assert shim.load_observations is load_observations


# -- with the real Fitter ---------------------------------------------------------------------


class FailAfter:
    """A quadratic objective that raises once it has been called ``n_ok`` times."""

    def __init__(self, n_ok=None):
        self.n_ok = n_ok
        self.calls = 0

    def __call__(self, params):
        if self.n_ok is not None and self.calls >= self.n_ok:
            raise RuntimeError("cluster job killed")
        self.calls += 1
        return (params["x"] - 1.0) ** 2 + (params["lj"]["eps"] - 0.25) ** 2


INITIAL = {"x": -2.0, "lj": {"eps": 2.0}}
BOUNDS = {"x": (-3.0, 3.0), "lj": {"eps": (0.0, 3.0)}}


@pytest.mark.timeout(120)
def test_interrupted_fit_resumes_from_jsonl_history(tmp_path):
    from chemfit.fitting.fitter import Fitter

    path = tmp_path / "run" / "fit.jsonl"
    fitter = Fitter(FailAfter(n_ok=12), INITIAL, bounds=BOUNDS)
    history = JSONLinesHistory(path)
    fitter.register_evaluation_callback(history)
    with pytest.raises(RuntimeError, match="cluster job killed"):
        fitter.fit_nevergrad(budget=40, optimizer_str="OnePlusOne", seed=0)
    assert fitter.result.error.startswith("RuntimeError")

    observations = load_observations(path)
    assert len(observations) == 12
    assert observations[0] == (INITIAL, pytest.approx(9.0 + 1.75**2))  # initial params first
    first_best = min(loss for _, loss in observations)
    assert first_best == pytest.approx(fitter.result.best_loss)

    # resume as in the documentation: same callback, observations from the file
    resumed = Fitter(FailAfter(), INITIAL, bounds=BOUNDS)
    resumed.register_evaluation_callback(history)
    resumed.fit_nevergrad(
        budget=20, optimizer_str="OnePlusOne", seed=1, initial_observations=observations
    )
    result = resumed.result
    assert result.n_observations == 12
    assert result.n_evals == 20
    assert resumed.contexts[0].n_evals == 32  # observations count in contexts[0]
    assert result.best_loss <= first_best
    # the evaluation callback skips replayed observations: 12 old + 20 new lines
    assert len(load_observations(path)) == 32


@pytest.mark.timeout(120)
def test_resumed_fit_keeps_the_observed_best(tmp_path):
    from chemfit.fitting.fitter import Fitter

    path = tmp_path / "fit.jsonl"
    fitter = Fitter(FailAfter(n_ok=15), INITIAL, bounds=BOUNDS)
    fitter.register_evaluation_callback(JSONLinesHistory(path, append=False))
    with pytest.raises(RuntimeError):
        fitter.fit_nevergrad(budget=30, optimizer_str="OnePlusOne", seed=2)
    observations = load_observations(path)
    best_params, best_loss = min(observations, key=lambda o: o[1])
    assert best_loss < 9.0 + 1.75**2  # the first fit made progress

    # a one-evaluation resume only evaluates the (bad) initial parameters: its best must be
    # the best observation, which proves the observations were counted
    resumed = Fitter(FailAfter(), INITIAL, bounds=BOUNDS)
    resumed.fit_nevergrad(
        budget=1, optimizer_str="OnePlusOne", seed=0, initial_observations=observations
    )
    assert resumed.result.n_observations == 15 and resumed.result.n_evals == 1
    assert resumed.result.best_loss == pytest.approx(best_loss)
    assert resumed.result.best_parameters == best_params


@pytest.mark.timeout(120)
def test_step_callbacks_in_a_real_fit(tmp_path):
    from chemfit.fitting.fitter import Fitter

    def objective(params, ctx):
        ctx.meta["arrays"] = {"grid": np.linspace(0.0, 1.0, 3), "n": np.int64(3)}
        loss = (params["x"] - 1.0) ** 2 + (params["lj"]["eps"] - 0.25) ** 2
        ctx.loss = loss
        return loss

    fitter = Fitter(objective, INITIAL, bounds=BOUNDS)
    checkpoint = CheckpointBestParameters(tmp_path / "ckpt" / "best.json")
    fitter.register_callback(log_progress)
    fitter.register_callback(SaveMetaData(tmp_path / "meta" / "nested"), n_steps=3)
    fitter.register_callback(checkpoint)
    fitter.fit_nevergrad(budget=12, optimizer_str="OnePlusOne", num_workers=2, seed=0)

    data = json.loads((tmp_path / "ckpt" / "best.json").read_text())
    assert set(data) == {"step", "loss", "parameters", "meta"}
    assert data["loss"] == pytest.approx(fitter.result.best_loss)
    assert data["parameters"] == fitter.result.best_parameters
    assert data["meta"]["arrays"] == {"grid": [0.0, 0.5, 1.0], "n": 3}
    assert checkpoint.best_loss == pytest.approx(fitter.result.best_loss)

    # 12 evaluations in batches of 2 = steps 0..5; SaveMetaData fires at steps 0 and 3
    names = sorted(p.name for p in (tmp_path / "meta" / "nested").iterdir())
    assert names == [f"step_{s}_ctx_{i}.json" for s in (0, 3) for i in (0, 1)]
    saved = json.loads((tmp_path / "meta" / "nested" / "step_3_ctx_1.json").read_text())
    assert saved["meta"]["arrays"]["grid"] == [0.0, 0.5, 1.0]
    assert set(saved) == {"quantities", "parameters", "loss", "meta"}
