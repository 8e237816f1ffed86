"""Tests of chemfit.results: EvaluationRecord, FitHistory and FitResult."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import subprocess
import sys
from collections.abc import Sequence

import numpy as np
import pytest

from chemfit.results import EvaluationRecord, FitHistory, FitResult


def make_record(index: int = 0, loss: float = 1.0, **changes) -> EvaluationRecord:
    fields = {
        "index": index,
        "step": index // 2,
        "worker": index % 2,
        "parameters": {"lj": {"eps": 0.5 + index, "sigma": 1.5}, "k": 2.0},
        "loss": loss,
        "raw_loss": loss,
        "penalised": False,
        "error": None,
        "meta": {"tag": f"r{index}"},
        "time": 0.1 * index,
    }
    fields.update(changes)
    return EvaluationRecord(**fields)


def test_record_is_frozen():
    record = make_record()
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.loss = 2.0


def test_record_round_trips_through_strict_json():
    record = make_record(
        3,
        loss=1e5,
        raw_loss=math.nan,
        penalised=True,
        error="ValueError: bad",
        meta={"array": np.arange(3), "nested": {1: np.float32(0.5)}, "inf": math.inf},
    )
    data = json.loads(json.dumps(record.to_dict(), allow_nan=False))
    assert data["raw_loss"] == "nan"
    assert data["meta"] == {"array": [0, 1, 2], "nested": {"1": 0.5}, "inf": "inf"}
    back = EvaluationRecord.from_dict(data)
    assert math.isnan(back.raw_loss)
    assert (back.index, back.step, back.worker, back.loss) == (3, 1, 1, 1e5)
    assert (
        back.parameters == record.parameters and back.penalised and back.error == "ValueError: bad"
    )
    plain = make_record(1)
    assert EvaluationRecord.from_dict(json.loads(json.dumps(plain.to_dict()))) == plain


def test_record_from_dict_errors():
    with pytest.raises(ValueError, match="loss"):
        EvaluationRecord.from_dict({"index": 0, "parameters": {}})
    with pytest.raises(TypeError, match="mapping"):
        EvaluationRecord.from_dict([1, 2])


def test_history_is_a_sequence():
    history = FitHistory(make_record(i, loss=10.0 - i) for i in range(4))
    assert isinstance(history, Sequence)
    assert len(history) == 4 and history[-1].index == 3
    assert [r.index for r in history] == [0, 1, 2, 3]
    assert isinstance(history[1:3], FitHistory) and len(history[1:3]) == 2
    assert make_record(2, loss=8.0) in history
    assert "best loss 7" in repr(history)
    assert repr(FitHistory()) == "FitHistory([])"


def test_history_to_dataframe():
    pytest.importorskip("pandas")
    history = FitHistory([make_record(0), make_record(1, loss=0.5)])
    frame = history.to_dataframe()
    assert list(frame.columns) == [
        "index",
        "step",
        "worker",
        "loss",
        "raw_loss",
        "penalised",
        "error",
        "time",
        "lj.eps",
        "lj.sigma",
        "k",
    ]
    assert frame["lj.eps"].tolist() == [0.5, 1.5]
    with_meta = history.to_dataframe(include_meta=True)
    assert with_meta["meta"].tolist() == [{"tag": "r0"}, {"tag": "r1"}]


def test_to_dataframe_without_pandas_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)  # makes `import pandas` fail
    with pytest.raises(ImportError, match="`pandas` extra"):
        FitHistory([make_record()]).to_dataframe()
    with pytest.raises(ImportError, match="pandas"):
        FitResult({}, {}, 0.0, {}).to_dataframe()


def test_history_from_jsonl(tmp_path, caplog):
    records = [make_record(i) for i in range(3)]
    path = tmp_path / "fit.jsonl"
    lines = [json.dumps(r.to_dict()) for r in records]
    path.write_text("\n".join(lines) + "\n\n" + lines[0][:25])  # a truncated last line
    with caplog.at_level(logging.WARNING):
        history = FitHistory.from_jsonl(path)
    assert list(history) == records
    assert any("truncated" in r.getMessage() for r in caplog.records)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(lines[0] + "\n{not json\n" + lines[1] + "\n")
    with pytest.raises(ValueError, match="line 2"):
        FitHistory.from_jsonl(bad)
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"index": 0}\n')
    with pytest.raises(ValueError, match="line 1"):
        FitHistory.from_jsonl(wrong)


def make_result(**changes) -> FitResult:
    fields = {
        "parameters": {"lj": {"eps": 0.5}},
        "best_parameters": {"lj": {"eps": 0.5}},
        "best_loss": 0.25,
        "best_meta": {"array": np.ones(2)},
        "n_evals": 2,
        "n_observations": 1,
        "wall_time": 1.5,
        "history": FitHistory([make_record(0), make_record(1)]),
        "backend": "nevergrad",
        "optimizer": "OnePlusOne",
        "mode": "batch",
        "seed": 3,
        "converged": None,
        "interrupted": False,
        "error": None,
        "problematic_params": [("lj.eps", 0.5, 0.49, 2.0)],
    }
    fields.update(changes)
    return FitResult(**fields)


def test_fit_result_has_the_contract_fields():
    names = [f.name for f in dataclasses.fields(FitResult)]
    assert names == [
        "parameters",
        "best_parameters",
        "best_loss",
        "best_meta",
        "n_evals",
        "n_observations",
        "wall_time",
        "history",
        "backend",
        "optimizer",
        "mode",
        "seed",
        "converged",
        "interrupted",
        "error",
        "problematic_params",
        "stopped",  # our addition (Fitter.request_stop), after the contract's fields
    ]


def test_fit_result_to_dict_is_json_safe():
    data = make_result(best_loss=math.inf).to_dict()
    text = json.dumps(data, allow_nan=False)
    back = json.loads(text)
    assert back["best_loss"] == "inf" and back["best_meta"] == {"array": [1.0, 1.0]}
    assert len(back["history"]) == 2 and back["history"][1]["index"] == 1
    assert back["problematic_params"] == [["lj.eps", 0.5, 0.49, 2.0]]


def test_fit_result_repr_and_html():
    result = make_result(error="RuntimeError: <boom>", interrupted=True)
    text = repr(result)
    assert text.startswith("FitResult(best_loss=0.25, n_evals=2")
    assert "'lj.eps': 0.5" in text and "interrupted=True" in text
    html = result._repr_html_()
    for fragment in ("best loss", "0.25", "evaluations", "wall time", "lj.eps", "Warnings"):
        assert fragment in html
    assert "&lt;boom&gt;" in html and "<boom>" not in html  # escaped
    assert "near its bounds" in html
    assert "Warnings" not in make_result(problematic_params=[])._repr_html_()


def test_fit_result_to_dataframe():
    pytest.importorskip("pandas")
    frame = make_result().to_dataframe(include_meta=True)
    assert len(frame) == 2 and "meta" in frame.columns


@pytest.mark.timeout(60)
def test_results_and_html_import_no_jupyter_package():
    code = (
        "import sys\n"
        "from chemfit.results import FitResult\n"
        "FitResult({'a': 1.0}, {'a': 1.0}, 0.5, {})._repr_html_()\n"
        "bad = [m for m in ('IPython', 'ipywidgets', 'jupyter_client', 'pandas') "
        "if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_history_keeps_best_and_counts_as_records_arrive():
    history = FitHistory()
    assert history.best() is None and history.records_since(0) == []
    losses = [5.0, 3.0, 1e5, 3.0, 4.0]
    for i, loss in enumerate(losses):
        error = "E: x" if i == 2 else None
        history.append(make_record(i, loss, penalised=loss == 1e5, error=error))
    assert history.best() is history[1]  # ties keep the earlier record
    assert history.improvements() == [0, 1]
    assert history.best(worker=0) is history[4] and history.best(worker=1) is history[1]
    assert (history.n_penalised, history.n_failed, history.count(0), history.count(1)) == (
        1,
        1,
        3,
        2,
    )
    assert [r.index for r in history.records_since(3)] == [3, 4]
    assert history.records_since(9) == [] and len(history.records_since(-1)) == 5
    assert "best loss 3" in repr(history)
    assert repr(FitHistory([make_record(0, 1e5, penalised=True)])).endswith("no unpenalised loss)")
    resumed = FitHistory(make_record(i) for i in range(10, 13))  # numbers from a resumed fit
    assert [r.index for r in resumed.records_since(11)] == [11, 12]
    observed = history._observe({"k": 1.0}, 0.5)
    assert history.best() is observed and (observed.index, observed.step) == (-1, -1)
    assert history.n_observations == 1 and len(history) == 5
    history.append(make_record(5, 0.25))
    assert history.improvements() == [0, 1, 5] and history.best() is history[5]


def test_fit_result_from_dict_round_trips_through_json():
    records = [make_record(i, loss=float(i)) for i in range(3)]
    result = FitResult(
        {"k": 2.0},
        {"k": 1.0},
        0.0,
        {"tag": "r0"},
        n_evals=3,
        n_observations=1,
        wall_time=1.5,
        history=FitHistory(records),
        backend="nevergrad",
        optimizer="OnePlusOne",
        mode="async",
        seed=4,
        problematic_params=[("k", 2.0, 0.0, 2.1)],
        stopped=True,
    )
    again = FitResult.from_dict(json.loads(json.dumps(result.to_dict(), allow_nan=False)))
    assert again == result
    empty = FitResult.from_dict(FitResult({}, {}, math.inf, {}).to_dict())
    assert empty.best_loss == math.inf and len(empty.history) == 0
    with pytest.raises(TypeError, match="mapping"):
        FitResult.from_dict([1])
