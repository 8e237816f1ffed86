"""What a fit leaves behind: one record per told evaluation, the history, and the result.

* :class:`EvaluationRecord` describes one told evaluation (parameters, loss, meta, timing);
* :class:`FitHistory` is the read-only sequence of records of one fit, with a pandas view and a
  reader for the JSON-lines files written by
  :class:`~chemfit.fitting.callbacks.JSONLinesHistory`;
* :class:`FitResult` summarises a fit and is stored in ``Fitter.result``.

Nothing here imports pandas or any Jupyter package at import time.
"""

from __future__ import annotations

import html
import json
import logging
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

from chemfit.core.flatdict import flatten_dict

if TYPE_CHECKING:
    import pandas

__all__ = ["EvaluationRecord", "FitHistory", "FitResult"]

logger = logging.getLogger(__name__)

_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _json_float(value: float | None) -> float | str | None:
    """A float as JSON-safe data: non-finite values become ``"nan"``, ``"inf"`` or ``"-inf"``."""
    if value is None:
        return None
    value = float(value)
    if math.isfinite(value):
        return value
    if math.isnan(value):
        return "nan"
    return "inf" if value > 0 else "-inf"


def _from_json_float(value: Any) -> float | None:
    """Inverse of :func:`_json_float`."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return _NON_FINITE[value.lower()]
        except KeyError:
            raise ValueError(
                f"expected a number, null, 'nan', 'inf' or '-inf', got {value!r}"
            ) from None
    return float(value)


def to_jsonable(obj: Any) -> Any:
    """Convert ``obj`` into data that :func:`json.dumps` writes as strict JSON.

    Mappings become dicts with ``str`` keys, sequences and sets become lists, numpy arrays and
    scalars become lists and Python numbers, non-finite floats become ``"nan"``/``"inf"``/
    ``"-inf"``, paths become strings, and anything else becomes its ``repr``.

    Examples
    --------
    >>> import numpy as np
    >>> to_jsonable({"a": np.arange(2), 1: (np.float32(0.5), float("nan"))})
    {'a': [0, 1], '1': [0.5, 'nan']}
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return _json_float(obj)
    if isinstance(obj, Mapping):
        return {str(key): to_jsonable(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(value) for value in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    # numpy without importing it: arrays and numpy scalars both have ``tolist``/``item``.
    tolist = getattr(obj, "tolist", None)
    if callable(tolist) and type(obj).__module__ == "numpy":
        return to_jsonable(tolist())
    return repr(obj)


def _params_from_json(obj: Any) -> Any:
    """Nested parameters read from JSON, with leaves as floats."""
    if isinstance(obj, Mapping):
        return {key: _params_from_json(value) for key, value in obj.items()}
    return _from_json_float(obj)


@dataclass(frozen=True)
class EvaluationRecord:
    """One told evaluation of a fit.

    Parameters
    ----------
    index : int
        Position in tell order within the fit (0-based).
    step : int
        The optimizer step the evaluation belongs to (see ``Fitter.register_callback``).
    worker : int
        Index into ``fitter.contexts`` of the context that evaluated it.
    parameters : dict
        Nested parameters as plain floats.
    loss : float
        The value told to the optimizer, after any penalty.
    raw_loss : float or None
        The objective's own value when it was a number, else ``None``.
    penalised : bool
        Whether ``loss`` is the fitter's ``value_bad_params`` instead of the objective's value.
    error : str or None
        ``"ExcType: message"`` of a swallowed exception.
    meta : dict or None
        A deep copy of the context's meta (``None`` with ``record_meta=False``).
    time : float
        Seconds since the start of the fit, at tell time.

    Examples
    --------
    >>> record = EvaluationRecord(0, 0, 0, {"a": 1.0}, 2.0, 2.0, False, None, {}, 0.1)
    >>> EvaluationRecord.from_dict(record.to_dict()) == record
    True
    """

    index: int
    step: int
    worker: int
    parameters: dict
    loss: float
    raw_loss: float | None
    penalised: bool
    error: str | None
    meta: dict | None
    time: float

    def to_dict(self) -> dict:
        """The record as JSON-safe data (see :func:`to_jsonable` for the conversions).

        Examples
        --------
        >>> import json
        >>> rec = EvaluationRecord(3, 1, 0, {"lj": {"eps": 0.5}}, 1e5, float("nan"), True,
        ...                        None, None, 0.25)
        >>> json.dumps(rec.to_dict(), allow_nan=False)[:60]
        '{"index": 3, "step": 1, "worker": 0, "parameters": {"lj": {"'
        """
        return {
            "index": int(self.index),
            "step": int(self.step),
            "worker": int(self.worker),
            "parameters": to_jsonable(self.parameters),
            "loss": _json_float(self.loss),
            "raw_loss": _json_float(self.raw_loss),
            "penalised": bool(self.penalised),
            "error": self.error,
            "meta": None if self.meta is None else to_jsonable(self.meta),
            "time": float(self.time),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EvaluationRecord:
        """Rebuild a record from :meth:`to_dict` output (for example one JSON line).

        Examples
        --------
        >>> EvaluationRecord.from_dict({"index": 0, "step": 0, "worker": 0,
        ...     "parameters": {"a": 1}, "loss": 2, "time": 0.0}).parameters
        {'a': 1.0}
        """
        if not isinstance(d, Mapping):
            raise TypeError(f"from_dict expects a mapping, got {type(d).__name__}: {d!r}")
        missing = [key for key in ("index", "parameters", "loss") if key not in d]
        if missing:
            raise ValueError(
                f"an evaluation record needs the keys {missing}; got keys {sorted(d)}. "
                "Pass the output of EvaluationRecord.to_dict()"
            )
        loss = _from_json_float(d["loss"])
        return cls(
            index=int(d["index"]),
            step=int(d.get("step", 0)),
            worker=int(d.get("worker", 0)),
            parameters=_params_from_json(d["parameters"]),
            loss=math.nan if loss is None else loss,
            raw_loss=_from_json_float(d.get("raw_loss", loss)),
            penalised=bool(d.get("penalised", False)),
            error=d.get("error"),
            meta=d.get("meta"),
            time=float(d.get("time", 0.0)),
        )


def _require_pandas() -> Any:
    try:
        import pandas
    except ImportError as exc:
        raise ImportError(
            "to_dataframe needs pandas, which is not installed; install the `pandas` extra: "
            "pip install 'chemfit[pandas]'"
        ) from exc
    return pandas


class FitHistory(Sequence[EvaluationRecord]):
    """The evaluation records of one fit, in tell order.

    Parameters
    ----------
    records : iterable of EvaluationRecord, optional
        The records.

    Examples
    --------
    >>> history = FitHistory([EvaluationRecord(0, 0, 0, {"a": 1.0}, 2.0, 2.0, False, None,
    ...                                         None, 0.0)])
    >>> len(history), history[0].loss, history[-1:].__class__.__name__
    (1, 2.0, 'FitHistory')
    """

    def __init__(self, records: Iterable[EvaluationRecord] | None = None) -> None:
        self._records: list[EvaluationRecord] = list(records) if records is not None else []

    def _append(self, record: EvaluationRecord) -> None:
        self._records.append(record)

    @overload
    def __getitem__(self, index: int) -> EvaluationRecord: ...

    @overload
    def __getitem__(self, index: slice) -> FitHistory: ...

    def __getitem__(self, index: int | slice) -> EvaluationRecord | FitHistory:
        if isinstance(index, slice):
            return FitHistory(self._records[index])
        return self._records[index]

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[EvaluationRecord]:
        return iter(self._records)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, FitHistory):
            return self._records == other._records
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        if not self._records:
            return "FitHistory([])"
        best = min(self._records, key=lambda r: r.loss)
        return f"FitHistory({len(self._records)} records, best loss {best.loss:.6g})"

    def to_dataframe(self, include_meta: bool = False) -> pandas.DataFrame:
        """One row per record; parameters as one column per flat key ``"a.b"``.

        Columns: ``index``, ``step``, ``worker``, ``loss``, ``raw_loss``, ``penalised``,
        ``error``, ``time``, the parameter columns, and ``meta`` with ``include_meta``.
        Needs the ``pandas`` extra.

        Examples
        --------
        >>> rec = EvaluationRecord(0, 0, 1, {"lj": {"eps": 0.5}}, 2.0, 2.0, False, None, {}, 0.0)
        >>> FitHistory([rec]).to_dataframe()["lj.eps"].tolist()
        [0.5]
        """
        pandas = _require_pandas()
        columns = ["index", "step", "worker", "loss", "raw_loss", "penalised", "error", "time"]
        rows = []
        param_keys: dict[str, None] = {}
        for record in self._records:
            flat = flatten_dict(record.parameters)
            param_keys.update(dict.fromkeys(flat))
            row = {name: getattr(record, name) for name in columns}
            row.update(flat)
            if include_meta:
                row["meta"] = record.meta
            rows.append(row)
        all_columns = columns + list(param_keys) + (["meta"] if include_meta else [])
        return pandas.DataFrame(rows, columns=all_columns)

    def to_list(self) -> list[dict]:
        """The records as a list of JSON-safe dicts."""
        return [record.to_dict() for record in self._records]

    @classmethod
    def from_jsonl(cls, path: str | os.PathLike) -> FitHistory:
        """Read the JSON-lines file of a ``JSONLinesHistory`` (one ``to_dict()`` per line).

        Blank lines are ignored. A truncated last line (a fit killed while writing) is skipped
        with a WARNING; any other bad line raises ``ValueError`` naming the file and the line.

        Examples
        --------
        >>> import tempfile, json, pathlib
        >>> rec = EvaluationRecord(0, 0, 0, {"a": 1.0}, 2.0, 2.0, False, None, None, 0.0)
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "fit.jsonl"
        >>> _ = path.write_text(json.dumps(rec.to_dict()) + "\\n")
        >>> FitHistory.from_jsonl(path)[0] == rec
        True
        """
        path = Path(path)
        lines = path.read_text(encoding="utf-8").splitlines()
        last_nonblank = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
        records = []
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                if lineno - 1 == last_nonblank:
                    logger.warning(
                        "%s: skipping the truncated last line %d (%s)", path, lineno, exc
                    )
                    continue
                raise ValueError(
                    f"{path}, line {lineno}: not valid JSON ({exc}); each line must hold one "
                    "EvaluationRecord.to_dict()"
                ) from exc
            try:
                records.append(EvaluationRecord.from_dict(data))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{path}, line {lineno}: not an evaluation record: {exc}") from exc
        return cls(records)


@dataclass
class FitResult:
    """The summary of a fit, stored in ``Fitter.result``.

    Attributes
    ----------
    parameters : dict
        What the fit returned (the recommendation, scipy's ``x``, or ``finish``'s argument);
        the best parameters so far when the fit ended with an exception.
    best_parameters, best_loss, best_meta
        The best told evaluation or observation (``best_loss`` is ``inf`` if there was none).
    n_evals : int
        Objective calls of this fit, one per history record (observations excluded).
    n_observations : int
        Initial observations told before the budget.
    wall_time : float
        Seconds from the start to the end of the fit.
    history : FitHistory
        The evaluation records.

    After ``fit_nevergrad(resume=True)`` the history, counts, wall time and best cover the
    whole session (every part); the other fields describe its last part.
    backend : str
        ``"nevergrad"``, ``"scipy"`` or ``"ask-tell"``.
    optimizer : str
        The nevergrad optimizer name or the scipy method.
    mode : str or None
        ``"batch"`` or ``"async"`` for nevergrad, else ``None``.
    seed : int or None
        The nevergrad seed.
    converged : bool or None
        scipy's ``success``; ``None`` for the other backends.
    interrupted : bool
        Whether a ``KeyboardInterrupt`` ended the fit.
    error : str or None
        ``"ExcType: message"`` of the exception that ended the fit.
    problematic_params : list
        ``(flat_key, value, lower, upper)`` of parameters near their bounds.
    stopped : bool
        Whether :meth:`~chemfit.fitting.fitter.Fitter.request_stop` ended the fit early; the
        evaluations started before the request were all told and recorded.

    Examples
    --------
    >>> result = FitResult({"a": 1.0}, {"a": 1.0}, 0.5, {}, n_evals=3)
    >>> result
    FitResult(best_loss=0.5, n_evals=3, backend='ask-tell', wall_time=0.000s, best_parameters={'a': 1.0})
    >>> result.to_dict()["best_loss"]
    0.5
    """

    parameters: dict
    best_parameters: dict
    best_loss: float
    best_meta: dict
    n_evals: int = 0
    n_observations: int = 0
    wall_time: float = 0.0
    history: FitHistory = field(default_factory=FitHistory)
    backend: str = "ask-tell"
    optimizer: str = ""
    mode: str | None = None
    seed: int | None = None
    converged: bool | None = None
    interrupted: bool = False
    error: str | None = None
    problematic_params: list = field(default_factory=list)
    stopped: bool = False

    def to_dataframe(self, include_meta: bool = False) -> pandas.DataFrame:
        """The history as a DataFrame (see :meth:`FitHistory.to_dataframe`); needs pandas.

        Examples
        --------
        >>> FitResult({}, {}, 0.0, {}).to_dataframe().shape[0]
        0
        """
        return self.history.to_dataframe(include_meta=include_meta)

    def to_dict(self) -> dict:
        """All fields as JSON-safe data; the history as a list of record dicts.

        Examples
        --------
        >>> sorted(FitResult({}, {}, 1.0, {}).to_dict())[:4]
        ['backend', 'best_loss', 'best_meta', 'best_parameters']
        """
        return {
            "parameters": to_jsonable(self.parameters),
            "best_parameters": to_jsonable(self.best_parameters),
            "best_loss": _json_float(self.best_loss),
            "best_meta": to_jsonable(self.best_meta),
            "n_evals": int(self.n_evals),
            "n_observations": int(self.n_observations),
            "wall_time": float(self.wall_time),
            "history": self.history.to_list(),
            "backend": self.backend,
            "optimizer": self.optimizer,
            "mode": self.mode,
            "seed": self.seed,
            "converged": self.converged,
            "interrupted": bool(self.interrupted),
            "error": self.error,
            "problematic_params": to_jsonable(self.problematic_params),
            "stopped": bool(self.stopped),
        }

    def _warnings(self) -> list[str]:
        notes = []
        if self.interrupted:
            notes.append("interrupted (KeyboardInterrupt)")
        if self.stopped:
            notes.append("stopped early by request_stop()")
        if self.error:
            notes.append(f"ended by {self.error}")
        if self.converged is False:
            notes.append("did not converge")
        for key, value, lower, upper in self.problematic_params:
            notes.append(f"{key} = {value:.6g} is near its bounds [{lower}, {upper}]")
        if not math.isfinite(self.best_loss):
            notes.append("no evaluation gave a finite, unpenalised loss")
        return notes

    def __repr__(self) -> str:
        parts = [
            f"best_loss={self.best_loss:.6g}",
            f"n_evals={self.n_evals}",
            f"backend={self.backend!r}",
        ]
        if self.optimizer:
            parts.append(f"optimizer={self.optimizer!r}")
        if self.interrupted:
            parts.append("interrupted=True")
        if self.stopped:
            parts.append("stopped=True")
        if self.error:
            parts.append(f"error={self.error!r}")
        parts.append(f"wall_time={self.wall_time:.3f}s")
        parts.append(f"best_parameters={flatten_dict(self.best_parameters)!r}")
        return f"FitResult({', '.join(parts)})"

    def _repr_html_(self) -> str:
        """A compact HTML table for notebooks (no Jupyter import needed).

        Examples
        --------
        >>> "<table" in FitResult({"a": 1.0}, {"a": 1.0}, 0.5, {})._repr_html_()
        True
        """
        esc = html.escape
        optimizer = f" / {esc(self.optimizer)}" if self.optimizer else ""
        mode = f" ({esc(self.mode)})" if self.mode else ""
        rows = [
            ("best loss", f"{self.best_loss:.6g}"),
            ("evaluations", f"{self.n_evals}"),
            ("observations", f"{self.n_observations}"),
            ("wall time", f"{self.wall_time:.3f} s"),
            ("backend", f"{esc(self.backend)}{optimizer}{mode}"),
        ]
        body = "".join(
            f"<tr><th style='text-align:left'>{name}</th><td>{value}</td></tr>"
            for name, value in rows
        )
        params = "".join(
            f"<tr><td><code>{esc(str(key))}</code></td><td>{esc(_fmt(value))}</td></tr>"
            for key, value in flatten_dict(self.best_parameters).items()
        )
        warnings = "".join(f"<li>{esc(note)}</li>" for note in self._warnings())
        parts = [
            "<div class='chemfit-fit-result'>",
            f"<table>{body}</table>",
            "<table><tr><th style='text-align:left'>parameter</th>"
            f"<th style='text-align:left'>best value</th></tr>{params}</table>",
        ]
        if warnings:
            parts.append(f"<p><b>Warnings</b></p><ul>{warnings}</ul>")
        parts.append("</div>")
        return "".join(parts)


def _fmt(value: Any) -> str:
    return f"{value:.8g}" if isinstance(value, float) else repr(value)
