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
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, overload

from chemfit.core.flatdict import flatten_dict
from chemfit.fitting.jsonl import float_from_json, json_float, read_jsonl, to_jsonable
from chemfit.fitting.validation import (
    best_validation_loss,
    parse_history_line,
    validation_from_json,
    validation_to_json,
)

if TYPE_CHECKING:
    import pandas

__all__ = ["EvaluationRecord", "FitHistory", "FitResult"]


def _params_from_json(obj: Any) -> Any:
    """Nested parameters read from JSON, with leaves as floats."""
    if isinstance(obj, Mapping):
        return {key: _params_from_json(value) for key, value in obj.items()}
    return float_from_json(obj, "a parameter value")


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
    status : str
        ``"ok"``: the objective returned (its value may still be penalised); ``"failed"``: it
        raised (``error`` names the exception, ``traceback`` holds its text when known);
        ``"lost"``: its worker, engine or process died, or it ran past
        ``evaluation_timeout``, on every try. A failed or lost evaluation was told
        ``value_bad_params`` (``penalised``) and is never the best.
    tries : int
        How many times the evaluation was submitted (``retries`` + 1 at most).
    traceback : str or None
        The objective's traceback as text (the remote one from another process or engine).

    Examples
    --------
    >>> record = EvaluationRecord(0, 0, 0, {"a": 1.0}, 2.0, 2.0, False, None, {}, 0.1)
    >>> EvaluationRecord.from_dict(record.to_dict()) == record
    True
    >>> record.status, record.tries, record.traceback
    ('ok', 1, None)
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
    status: str = "ok"
    tries: int = 1
    traceback: str | None = None

    @property
    def failed(self) -> bool:
        """Whether the objective raised: status ``"failed"``, or an exception swallowed by
        ``swallow_exceptions`` (status ``"ok"`` with an ``error``)."""
        return self.status == "failed" or (self.status == "ok" and self.error is not None)

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
            "loss": json_float(self.loss),
            "raw_loss": json_float(self.raw_loss),
            "penalised": bool(self.penalised),
            "error": self.error,
            "meta": None if self.meta is None else to_jsonable(self.meta),
            "time": float(self.time),
            "status": self.status,
            "tries": int(self.tries),
            "traceback": self.traceback,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EvaluationRecord:
        """Rebuild a record from :meth:`to_dict` output (for example one JSON line).

        Examples
        --------
        >>> record = EvaluationRecord.from_dict({"index": 0, "step": 0, "worker": 0,
        ...     "parameters": {"a": 1}, "loss": 2, "time": 0.0})
        >>> record.parameters, record.status, record.tries
        ({'a': 1.0}, 'ok', 1)
        """
        if not isinstance(d, Mapping):
            raise TypeError(f"from_dict expects a mapping, got {type(d).__name__}: {d!r}")
        missing = [key for key in ("index", "parameters", "loss") if key not in d]
        if missing:
            raise ValueError(
                f"an evaluation record needs the keys {missing}; got keys {sorted(d)}. "
                "Pass the output of EvaluationRecord.to_dict()"
            )
        loss = float_from_json(d["loss"])
        return cls(
            index=int(d["index"]),
            step=int(d.get("step", 0)),
            worker=int(d.get("worker", 0)),
            parameters=_params_from_json(d["parameters"]),
            loss=math.nan if loss is None else loss,
            raw_loss=float_from_json(d.get("raw_loss", loss)),
            penalised=bool(d.get("penalised", False)),
            error=d.get("error"),
            meta=d.get("meta"),
            time=float(d.get("time", 0.0)),
            status=_status(d.get("status", "ok")),
            tries=int(d.get("tries", 1)),
            traceback=d.get("traceback"),
        )


#: The statuses of an evaluation record.
STATUSES = ("ok", "failed", "lost")


def _status(value: Any) -> str:
    if value not in STATUSES:
        raise ValueError(f"an evaluation record's status must be one of {STATUSES}, got {value!r}")
    return value


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
    """The evaluation records of one fit, in tell order: the one source of a fit's progress.

    ``len(history)`` is the number of records, :meth:`best` the best unpenalised one (kept as
    records are appended, O(1) each), :meth:`records_since` what an incremental reader has not
    seen yet. A running fit's history (``Fitter.history``) grows while it is read; records are
    only ever appended. Initial observations told to a fit are no records, but they count for
    :meth:`best` (as a record with ``index == -1``) and in :attr:`n_observations`.
    ``validation`` holds ``(record index, validation loss)`` per improvement of a fit with
    ``Fitter(validation=...)``, and ``diagnostics`` what ``Fitter.covariance()``,
    ``bootstrap()`` and ``profile()`` returned (both copied when ``records`` is a
    ``FitHistory``, as a resumed fit does).

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
    >>> history.best().loss, history.n_penalised, [r.index for r in history.records_since(1)]
    (2.0, 0, [])
    """

    def __init__(self, records: Iterable[EvaluationRecord] | None = None) -> None:
        self._records: list[EvaluationRecord] = []
        self._best: EvaluationRecord | None = None
        # per worker: [evaluations and observations counted, its best record]
        self._workers: dict[int, list] = {}
        self._improvements: list[int] = []  # positions of the records that became best()
        self.n_penalised = 0
        self.n_failed = 0  # the objective raised (recorded as failed, or swallowed)
        self.n_lost = 0  # lost after every try (dead worker, timeout)
        self.n_observations = 0
        # (record index, validation loss) per improvement: Fitter(validation=...)
        self.validation: list[tuple[int, float]] = (
            list(records.validation) if isinstance(records, FitHistory) else []
        )
        # "covariance", "bootstrap", "profile": see chemfit.fitting.diagnostics.store
        self.diagnostics: dict[str, Any] = (
            dict(records.diagnostics) if isinstance(records, FitHistory) else {}
        )
        for record in records if records is not None else ():
            self.append(record)

    def _count(self, record: EvaluationRecord, *, count: bool = True) -> None:
        """Count ``record`` for its worker and for the best (ties keep the earlier one)."""
        tally = self._workers.get(record.worker)
        if tally is None:
            tally = self._workers[record.worker] = [0, None]
        tally[0] += count
        if record.penalised:
            return
        if tally[1] is None or record.loss < tally[1].loss:
            tally[1] = record
        if self._best is None or record.loss < self._best.loss:
            self._best = record

    def append(self, record: EvaluationRecord) -> None:
        """Add a record: for a history one fills oneself (a fit appends to its own history).

        Examples
        --------
        >>> history = FitHistory()
        >>> history.append(EvaluationRecord(0, 0, 0, {"a": 1.0}, 2.0, 2.0, False, None, None, 0))
        >>> len(history), history.best().loss, history.improvements()
        (1, 2.0, [0])
        """
        self._count(record)
        if self._best is record:
            self._improvements.append(len(self._records))
        self.n_penalised += record.penalised
        self.n_failed += record.failed
        self.n_lost += record.status == "lost"
        self._records.append(record)  # last: a reader that sees the record sees its counts

    _append = append

    def improvements(self) -> list[int]:
        """The positions (0-based, into the history) of the records that became :meth:`best`,
        in order: the steps of a "best so far" line. Initial observations are no records, so
        an observation that is ``best()`` is not among them.

        Examples
        --------
        >>> history = FitHistory(
        ...     EvaluationRecord(i, 0, 0, {"a": 1.0}, loss, loss, False, None, None, 0.0)
        ...     for i, loss in enumerate([3.0, 4.0, 1.0, 1.0]))
        >>> history.improvements()
        [0, 2]
        """
        return list(self._improvements)

    def _observe(
        self, parameters: dict, loss: float, meta: dict | None = None, *, count: bool = True
    ) -> EvaluationRecord:
        """Count an initial observation (worker 0, ``index -1``) for the best; no record.

        With ``count=False`` it only competes for the best (a resumed fit's earlier best).
        """
        observation = EvaluationRecord(
            index=-1,
            step=-1,
            worker=0,
            parameters=parameters,
            loss=float(loss),
            raw_loss=float(loss),
            penalised=False,
            error=None,
            meta={} if meta is None else meta,
            time=0.0,
        )
        self._count(observation, count=count)
        self.n_observations += count
        return observation

    def _count_penalised_observation(self) -> None:
        """A penalised initial observation: counted for worker 0, never the best."""
        self._workers.setdefault(0, [0, None])[0] += 1
        self.n_observations += 1

    def best(self, worker: int | None = None) -> EvaluationRecord | None:
        """The record (or initial observation) with the lowest unpenalised loss, or ``None``.

        Ties keep the earlier one. ``worker`` restricts it to the evaluations of
        ``fitter.contexts[worker]`` (observations count for worker 0). An initial observation
        is returned as a record with ``index == -1`` and ``step == -1``.

        Examples
        --------
        >>> history = FitHistory(
        ...     EvaluationRecord(i, 0, i % 2, {"a": 1.0}, loss, loss, False, None, None, 0.0)
        ...     for i, loss in enumerate([3.0, 2.0, 1.0]))
        >>> history.best().index, history.best(worker=1).index, history.best(worker=5)
        (2, 1, None)
        """
        if worker is None:
            return self._best
        tally = self._workers.get(worker)
        return None if tally is None else tally[1]

    def count(self, worker: int) -> int:
        """Evaluations of ``fitter.contexts[worker]`` (worker 0 also counts the observations).

        Examples
        --------
        >>> FitHistory().count(0)
        0
        """
        tally = self._workers.get(worker)
        return 0 if tally is None else tally[0]

    def records_since(self, index: int) -> list[EvaluationRecord]:
        """The records whose ``index`` is ``index`` or later, in tell order.

        An incremental reader keeps the index after the last record it handled and asks for
        the records since; record indices are consecutive (also across a resumed fit).

        Examples
        --------
        >>> history = FitHistory(
        ...     EvaluationRecord(i, 0, 0, {"a": 1.0}, 1.0, 1.0, False, None, None, 0.0)
        ...     for i in range(5))
        >>> [record.index for record in history.records_since(3)]
        [3, 4]
        """
        records = self._records
        if not records:
            return []
        first = records[0].index
        if records[-1].index - first == len(records) - 1:  # consecutive: a slice
            return records[max(0, index - first) :]
        return [record for record in records if record.index >= index]

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
        n = len(self._records)
        if not n:
            return "FitHistory([])"
        best = self._best
        text = "no unpenalised loss" if best is None else f"best loss {best.loss:.6g}"
        return f"FitHistory({n} records, {text})"

    def to_dataframe(self, include_meta: bool = False) -> pandas.DataFrame:
        """One row per record; parameters as one column per flat key ``"a.b"``.

        Columns: ``index``, ``step``, ``worker``, ``loss``, ``raw_loss``, ``penalised``,
        ``error``, ``time`` (then ``status`` and ``tries`` when an evaluation failed, was
        lost or was retried), the parameter columns, and ``meta`` with ``include_meta``.
        Needs the ``pandas`` extra.

        Examples
        --------
        >>> rec = EvaluationRecord(0, 0, 1, {"lj": {"eps": 0.5}}, 2.0, 2.0, False, None, {}, 0.0)
        >>> FitHistory([rec]).to_dataframe()["lj.eps"].tolist()
        [0.5]
        """
        pandas = _require_pandas()
        columns = ["index", "step", "worker", "loss", "raw_loss", "penalised", "error", "time"]
        if self.n_lost or any(r.status != "ok" or r.tries != 1 for r in self._records):
            columns += ["status", "tries"]
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
        return cls._from_items(read_jsonl(path, parse_history_line))

    @classmethod
    def from_lines(cls, lines: Iterable[Mapping[str, Any]]) -> FitHistory:
        """Build from the lines of a JSON-lines history, as dicts: records (``to_dict()``) and
        validation losses (``{"index": i, "validation": loss}``), e.g. ``MPIEngineFit.records``.

        Examples
        --------
        >>> rec = EvaluationRecord(0, 0, 0, {"a": 1.0}, 2.0, 2.0, False, None, None, 0.0)
        >>> history = FitHistory.from_lines([rec.to_dict(), {"index": 0, "validation": 3.0}])
        >>> len(history), history.validation
        (1, [(0, 3.0)])
        """
        return cls._from_items([parse_history_line(line) for line in lines])

    @classmethod
    def _from_items(cls, items: list[EvaluationRecord | tuple[int, float]]) -> FitHistory:
        history = cls(item for item in items if isinstance(item, EvaluationRecord))
        history.validation = [item for item in items if not isinstance(item, EvaluationRecord)]
        return history


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
    n_ok, n_failed, n_lost : int
        Records by status (read from ``history``): the objective returned; it raised (status
        ``"failed"``, or swallowed by ``swallow_exceptions``); the evaluation was lost after
        every try (see ``fit_nevergrad(retries=..., evaluation_timeout=...)``).
    validation, best_validation_loss
        ``(record index, validation loss)`` per improvement of the training loss, and the
        lowest (``Fitter(validation=...)``; from ``history.validation``).
    diagnostics
        What ``Fitter.covariance()``, ``bootstrap()`` and ``profile()`` returned (from
        ``history.diagnostics``; kept by ``fit_nevergrad(resume=True)``).

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

    @property
    def n_failed(self) -> int:
        """Evaluations whose objective raised (see :attr:`EvaluationRecord.failed`)."""
        return self.history.n_failed

    @property
    def n_lost(self) -> int:
        """Evaluations lost after every try (a dead worker, engine or process; a timeout)."""
        return self.history.n_lost

    @property
    def validation(self) -> list[tuple[int, float]]:
        """``(record index, validation loss)`` for each improvement of the training loss
        (``Fitter(validation=...)``; empty without a validation objective).

        Examples
        --------
        >>> result = FitResult({"a": 1.0}, {"a": 1.0}, 2.0, {})
        >>> result.history.validation = [(0, 3.0), (4, 2.5)]
        >>> result.validation, result.best_validation_loss
        ([(0, 3.0), (4, 2.5)], 2.5)
        """
        return list(self.history.validation)

    @property
    def diagnostics(self) -> dict[str, Any]:
        """What ``Fitter.covariance()``, ``bootstrap()`` and ``profile()`` returned for this
        result: ``"covariance"`` -> ``Covariance``, ``"bootstrap"`` -> ``BootstrapResult``,
        ``"profile"`` -> ``{flat name: DataFrame}`` (see :mod:`chemfit.fitting.diagnostics.store`).

        Held by the history (the dict itself, not a copy): a fit resumed with
        ``fit_nevergrad(resume=True)`` keeps it, a new fit starts without. :meth:`to_dict`
        writes it as JSON-safe data and :meth:`from_dict` reads the same objects back.

        Examples
        --------
        >>> from chemfit.fitting.fitter import Fitter
        >>> fitter = Fitter(lambda p: (p["x"] - 1.0) ** 2, {"x": 0.0})
        >>> _ = fitter.fit_scipy()
        >>> _ = fitter.profile(points=3)
        >>> again = FitResult.from_dict(fitter.result.to_dict())
        >>> list(again.diagnostics), again.diagnostics["profile"]["x"]["value"].round(3).tolist()
        (['profile'], [0.9, 1.0, 1.1])
        """
        return self.history.diagnostics

    @property
    def best_validation_loss(self) -> float | None:
        """The lowest finite validation loss, or ``None`` (no validation objective)."""
        return best_validation_loss(self.history.validation)

    @property
    def n_ok(self) -> int:
        """Evaluations whose objective returned a value (penalised ones included).

        Examples
        --------
        >>> history = FitHistory([
        ...     EvaluationRecord(0, 0, 0, {"a": 1.0}, 2.0, 2.0, False, None, None, 0.0),
        ...     EvaluationRecord(1, 0, 1, {"a": 2.0}, 1e5, None, True, "ValueError: x", None,
        ...                      0.0, status="failed", tries=1),
        ...     EvaluationRecord(2, 1, 0, {"a": 3.0}, 1e5, None, True, "WorkerLostError: y",
        ...                      None, 0.0, status="lost", tries=3)])
        >>> result = FitResult({"a": 1.0}, {"a": 1.0}, 2.0, {}, n_evals=3, history=history)
        >>> result.n_ok, result.n_failed, result.n_lost
        (1, 1, 1)
        """
        return len(self.history) - self.history.n_failed - self.history.n_lost

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
            "best_loss": json_float(self.best_loss),
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
            "n_ok": self.n_ok,  # derived from the history; from_dict recounts them
            "n_failed": self.n_failed,
            "n_lost": self.n_lost,
            "validation": validation_to_json(self.history.validation),
            "diagnostics": _diagnostics_to_json(self.history.diagnostics),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FitResult:
        """Rebuild a result from :meth:`to_dict` output (for example read back from JSON).

        Examples
        --------
        >>> result = FitResult({"a": 1.0}, {"a": 1.0}, float("inf"), {}, n_evals=2)
        >>> again = FitResult.from_dict(result.to_dict())
        >>> again.best_loss, again.n_evals, again.parameters, again == result
        (inf, 2, {'a': 1.0}, True)
        """
        if not isinstance(data, Mapping):
            raise TypeError(f"from_dict expects a mapping, got {type(data).__name__}")
        best_loss = float_from_json(data["best_loss"], "best_loss")
        history = FitHistory(EvaluationRecord.from_dict(record) for record in data["history"])
        history.validation = validation_from_json(data.get("validation"))
        history.diagnostics = _diagnostics_from_json(data.get("diagnostics"))
        return cls(
            parameters=_params_from_json(data["parameters"]),
            best_parameters=_params_from_json(data["best_parameters"]),
            best_loss=math.inf if best_loss is None else best_loss,
            best_meta=data["best_meta"],
            n_evals=int(data["n_evals"]),
            n_observations=int(data["n_observations"]),
            wall_time=float(data["wall_time"]),
            history=history,
            backend=data["backend"],
            optimizer=data["optimizer"],
            mode=data["mode"],
            seed=data["seed"],
            converged=data["converged"],
            interrupted=bool(data["interrupted"]),
            error=data["error"],
            problematic_params=[tuple(p) for p in data["problematic_params"]],
            stopped=bool(data.get("stopped", False)),
        )

    def _warnings(self) -> list[str]:
        notes = []
        if self.interrupted:
            notes.append("interrupted (KeyboardInterrupt)")
        if self.stopped:
            notes.append("stopped early by request_stop()")
        if self.error:
            notes.append(f"ended by {self.error}")
        if self.n_failed:
            notes.append(f"{self.n_failed} evaluation(s) failed (the objective raised)")
        if self.n_lost:
            notes.append(f"{self.n_lost} evaluation(s) lost (a dead worker or a timeout)")
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
        if self.n_failed:
            parts.append(f"n_failed={self.n_failed}")
        if self.n_lost:
            parts.append(f"n_lost={self.n_lost}")
        parts.append(f"wall_time={self.wall_time:.3f}s")
        parts.append(f"best_parameters={flatten_dict(self.best_parameters)!r}")
        return f"FitResult({', '.join(parts)})"

    def _evaluations_text(self) -> str:
        faults = [
            f"{n} {what}" for n, what in ((self.n_failed, "failed"), (self.n_lost, "lost")) if n
        ]
        return f"{self.n_evals}" + (f" ({', '.join(faults)})" if faults else "")

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
            ("evaluations", self._evaluations_text()),
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


def _diagnostics_to_json(diagnostics: Mapping[str, Any]) -> dict:
    if not diagnostics:
        return {}
    # imported here: the diagnostics package imports the fitter, which imports this module
    from chemfit.fitting.diagnostics.store import diagnostics_to_json

    return diagnostics_to_json(diagnostics)


def _diagnostics_from_json(data: Mapping[str, Any] | None) -> dict:
    if not data:
        return {}
    from chemfit.fitting.diagnostics.store import diagnostics_from_json

    return diagnostics_from_json(data)


def _fmt(value: Any) -> str:
    return f"{value:.8g}" if isinstance(value, float) else repr(value)
