"""Ready-made callbacks for the Fitter: progress logging, meta-data dumps, checkpoints and a
JSON-lines history from which an interrupted fit can be resumed.

Two kinds of callbacks exist:

* **step callbacks**, registered with ``Fitter.register_callback``, are called as
  ``func(step, contexts)`` with the fitter's contexts (objects with ``opt_loss``,
  ``opt_params``, ``opt_meta``, ``n_evals`` besides the ``EvaluateContext`` fields):
  :func:`log_progress`, :class:`SaveMetaData`, :class:`CheckpointBestParameters`;
* **evaluation callbacks**, registered with ``Fitter.register_evaluation_callback``, are called
  once per told evaluation with an ``EvaluationRecord``: :class:`JSONLinesHistory`.

:func:`load_observations` reads a history file back as ``initial_observations`` for a new fit.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from numbers import Real
from pathlib import Path
from typing import Any

import numpy as np

from chemfit.core.utils import PicklesWithoutLock, atomic_write_text

__all__ = [
    "CheckpointBestParameters",
    "JSONLinesHistory",
    "NumpyEncoder",
    "SaveMetaData",
    "load_observations",
    "log_progress",
]

logger = logging.getLogger(__name__)


def _usable_loss(value: Any) -> float | None:
    """``value`` as a float if it is a real, non-NaN number; otherwise ``None``."""
    if value is None or isinstance(value, bool):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def _best_context(ctxs: Sequence[Any]) -> tuple[int | None, float | None]:
    """Index and loss of the context with the lowest usable ``opt_loss``."""
    best_idx: int | None = None
    best_loss: float | None = None
    for idx, ctx in enumerate(ctxs):
        loss = _usable_loss(getattr(ctx, "opt_loss", None))
        if loss is not None and (best_loss is None or loss < best_loss):
            best_idx, best_loss = idx, loss
    return best_idx, best_loss


# -- progress ---------------------------------------------------------------------------------


def log_progress(step: int, ctxs: Sequence[Any]) -> None:
    """Log the current and best loss and parameters of each context, and the overall best.

    Everything is logged at INFO through the ``chemfit.fitting.callbacks`` logger.

    Parameters
    ----------
    step : int
        The completed optimizer step.
    ctxs : sequence of FitterEvaluateContext
        The fitter's contexts.

    Examples
    --------
    >>> from types import SimpleNamespace
    >>> ctx = SimpleNamespace(loss=2.0, parameters={"a": 1.0}, opt_loss=1.0,
    ...                       opt_params={"a": 0.5}, n_evals=3)
    >>> log_progress(0, [ctx])  # silent unless INFO logging is enabled
    """
    logger.info("=" * 40)
    logger.info("Step = %s", step)
    for idx, ctx in enumerate(ctxs):
        logger.info("  Context %d (n_evals = %s)", idx, getattr(ctx, "n_evals", "?"))
        logger.info("    Opt loss   = %s", getattr(ctx, "opt_loss", None))
        logger.info("    Opt params = %s", getattr(ctx, "opt_params", None))
        logger.info("    Cur loss   = %s", getattr(ctx, "loss", None))
        logger.info("    Cur params = %s", getattr(ctx, "parameters", None))
    best_idx, best_loss = _best_context(ctxs)
    best_params = None if best_idx is None else ctxs[best_idx].opt_params
    logger.info("  Opt loss (all contexts)   = %s", best_loss)
    logger.info("  Opt params (all contexts) = %s", best_params)
    logger.info("-" * 40)


# -- JSON encoding ----------------------------------------------------------------------------

_PLAIN_KEY_TYPES = (str, int, float, bool, type(None))


def _json_key(key: Any) -> Any:
    """A dict key JSON accepts: numpy scalars become Python scalars, anything else its repr."""
    if isinstance(key, np.generic):
        key = key.item()
    return key if isinstance(key, _PLAIN_KEY_TYPES) else repr(key)


def _fix_keys(obj: Any, path_ids: set[int]) -> Any:
    """Copy ``obj`` where needed so that every dict key is one JSON accepts.

    Containers are only rebuilt when something inside them changed. A reference cycle raises
    ``ValueError``, as ``json`` itself does.
    """
    if isinstance(obj, dict):
        container_items: Iterator = iter(obj.items())
    elif isinstance(obj, (list, tuple)):
        container_items = iter(enumerate(obj))
    else:
        return obj
    if id(obj) in path_ids:
        raise ValueError("Circular reference detected")
    path_ids.add(id(obj))
    try:
        changed = False
        fixed_items = []
        for key, value in container_items:
            new_value = _fix_keys(value, path_ids)
            new_key = _json_key(key) if isinstance(obj, dict) else key
            changed = changed or new_value is not value or new_key is not key
            fixed_items.append((new_key, new_value))
    finally:
        path_ids.discard(id(obj))
    if not changed:
        return obj
    if isinstance(obj, dict):
        return dict(fixed_items)
    return [value for _, value in fixed_items]


class NumpyEncoder(json.JSONEncoder):
    """JSON encoder for meta data: it writes anything.

    numpy arrays become (nested) lists, numpy scalars become Python numbers, paths become
    strings, dict keys JSON cannot hold become their ``repr``, and any other object is written
    as its ``repr`` instead of raising ``TypeError``.

    Examples
    --------
    >>> json.dumps({"x": np.arange(3), "e": np.float32(0.5), np.int64(7): {1, 2}},
    ...            cls=NumpyEncoder)
    '{"x": [0, 1, 2], "e": 0.5, "7": "{1, 2}"}'
    """

    def default(self, o: Any) -> Any:
        if isinstance(o, np.ndarray):
            return _fix_keys(o.tolist(), set())  # object arrays may hold dicts
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, os.PathLike):
            return os.fspath(o)
        return repr(o)

    def iterencode(self, o: Any, _one_shot: bool = False) -> Iterator[str]:
        return super().iterencode(_fix_keys(o, set()), _one_shot)


# -- step callbacks ---------------------------------------------------------------------------


class SaveMetaData:
    """Step callback writing ``ctx.to_meta_data()`` of each context to a JSON file.

    The files are ``<output_folder>/step_{step}_ctx_{i}.json`` (indent 4, :class:`NumpyEncoder`).
    The folder and its missing parents are created. A file that cannot be written is logged at
    ERROR and skipped; the fit continues.

    Parameters
    ----------
    output_folder : str or os.PathLike
        Where the files go.

    Examples
    --------
    >>> import tempfile
    >>> from chemfit.core.context import EvaluateContext
    >>> folder = Path(tempfile.mkdtemp()) / "a" / "b"
    >>> ctx = EvaluateContext()
    >>> ctx.parameters, ctx.loss, ctx.meta["x"] = {"a": 1.0}, 0.5, np.zeros(2)
    >>> SaveMetaData(folder)(3, [ctx])
    >>> json.loads((folder / "step_3_ctx_0.json").read_text())["meta"]
    {'x': [0.0, 0.0]}
    """

    def __init__(self, output_folder: str | os.PathLike) -> None:
        self.output_folder = Path(output_folder)
        self.output_folder.mkdir(parents=True, exist_ok=True)

    def __call__(self, step: int, ctxs: Sequence[Any]) -> None:
        for idx, ctx in enumerate(ctxs):
            target = self.output_folder / f"step_{step}_ctx_{idx}.json"
            try:
                text = json.dumps(ctx.to_meta_data(), indent=4, cls=NumpyEncoder)
                self.output_folder.mkdir(parents=True, exist_ok=True)
                target.write_text(text, encoding="utf-8")
            except Exception:
                logger.error(
                    "Could not save the meta data of context %d to %s", idx, target, exc_info=True
                )


class CheckpointBestParameters:
    """Step callback that saves the best parameters whenever they improve.

    After each step it looks at every context's ``opt_loss``. When the lowest one beats
    ``best_loss`` (the best written so far), it writes
    ``{"step", "loss", "parameters", "meta"}`` of that context as JSON, atomically (a
    temporary file in the same folder is moved over the target, R15) and with
    :class:`NumpyEncoder`, so arrays anywhere in the meta data are fine. A failed write is
    logged at ERROR and retried at the next step.

    Parameters
    ----------
    path : str or os.PathLike
        The checkpoint file; missing parent folders are created.
    dont_overwrite : bool
        Keep every checkpoint: write ``<stem>_0<suffix>``, ``<stem>_1<suffix>``, ... (skipping
        names that exist) instead of replacing ``path``.

    Attributes
    ----------
    best_loss : float or None
        The loss of the last checkpoint written.
    last_path : Path or None
        The file of the last checkpoint written.

    Examples
    --------
    >>> import tempfile
    >>> from types import SimpleNamespace
    >>> path = Path(tempfile.mkdtemp()) / "best.json"
    >>> checkpoint = CheckpointBestParameters(path)
    >>> ctx = SimpleNamespace(opt_loss=2.0, opt_params={"a": 1.0}, opt_meta={"f": np.ones(2)})
    >>> checkpoint(0, [ctx])
    >>> json.loads(path.read_text())
    {'step': 0, 'loss': 2.0, 'parameters': {'a': 1.0}, 'meta': {'f': [1.0, 1.0]}}
    """

    def __init__(self, path: str | os.PathLike, *, dont_overwrite: bool = False) -> None:
        self.path = Path(path)
        self.dont_overwrite = bool(dont_overwrite)
        self.best_loss: float | None = None
        self.last_path: Path | None = None
        self._counter = 0

    def _next_numbered_path(self) -> Path:
        while True:
            candidate = self.path.with_name(f"{self.path.stem}_{self._counter}{self.path.suffix}")
            if not candidate.exists():
                return candidate
            self._counter += 1

    def __call__(self, step: int, ctxs: Sequence[Any]) -> None:
        best_idx, loss = _best_context(ctxs)
        if best_idx is None or (self.best_loss is not None and not loss < self.best_loss):
            return
        ctx = ctxs[best_idx]
        data = {
            "step": step,
            "loss": loss,
            "parameters": ctx.opt_params,
            "meta": getattr(ctx, "opt_meta", None),
        }
        target = self._next_numbered_path() if self.dont_overwrite else self.path
        try:
            atomic_write_text(target, json.dumps(data, indent=4, cls=NumpyEncoder))
        except Exception:
            logger.error(
                "Could not write the checkpoint %s; will retry at the next improvement",
                target,
                exc_info=True,
            )
            return
        if self.dont_overwrite:
            self._counter += 1
        self.best_loss = loss
        self.last_path = target
        logger.info("New best loss %s (step %s) written to %s", loss, step, target)


# -- evaluation history -----------------------------------------------------------------------


def _repair_tail(path: Path) -> None:
    """Make an existing history file end with a newline, dropping a truncated last line."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    if not data or data.endswith(b"\n"):
        return
    cut = data.rfind(b"\n") + 1
    tail = data[cut:]
    try:
        json.loads(tail)
    except ValueError:
        logger.warning("%s: dropping the truncated last line %r before appending", path, tail[:80])
        with path.open("r+b") as fh:
            fh.truncate(cut)
        return
    with path.open("ab") as fh:
        fh.write(b"\n")


class JSONLinesHistory(PicklesWithoutLock):
    """Evaluation callback appending one JSON line per told evaluation.

    Each call writes ``json.dumps(record.to_dict())`` (with :class:`NumpyEncoder`) and a newline
    in a single write, then flushes, so a crash loses at most the line being written.
    :func:`load_observations` reads the file back for ``initial_observations``.

    Parameters
    ----------
    path : str or os.PathLike
        The ``.jsonl`` file; missing parent folders are created.
    append : bool
        Append to an existing file (the default, for resuming), or start it empty. When
        appending, a truncated last line left by a killed process is dropped with a WARNING.

    Examples
    --------
    >>> import tempfile
    >>> from chemfit.fitting.results import EvaluationRecord
    >>> path = Path(tempfile.mkdtemp()) / "fit.jsonl"
    >>> history = JSONLinesHistory(path)
    >>> history(EvaluationRecord(0, 0, 0, {"a": 1.0}, 2.5, 2.5, False, None, {}, 0.1))
    >>> load_observations(path)
    [({'a': 1.0}, 2.5)]
    """

    def __init__(self, path: str | os.PathLike, *, append: bool = True) -> None:
        self.path = Path(path)
        self.append = bool(append)
        self.n_written = 0
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.append:
            _repair_tail(self.path)
        else:
            self.path.write_bytes(b"")

    def __call__(self, record: Any) -> None:
        if hasattr(record, "to_dict"):
            data = record.to_dict()
        elif isinstance(record, Mapping):
            data = record
        else:
            raise TypeError(
                f"JSONLinesHistory expects an EvaluationRecord, got {type(record).__name__}: "
                f"{record!r}; register it with Fitter.register_evaluation_callback"
            )
        line = json.dumps(data, cls=NumpyEncoder) + "\n"
        with self._lock, self.path.open("a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            self.n_written += 1

    def __repr__(self) -> str:
        return f"JSONLinesHistory({str(self.path)!r}, append={self.append})"


_NON_FINITE = {"nan": math.nan, "inf": math.inf, "+inf": math.inf, "-inf": -math.inf}


def _number(value: Any, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lower() in _NON_FINITE:
        return _NON_FINITE[value.strip().lower()]
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{what} must be a number or null, got {value!r}")
    return float(value)


def _parameters(value: Any, what: str) -> dict:
    if not isinstance(value, Mapping):
        raise ValueError(f"{what} must be an object of parameter values, got {value!r}")
    nested = {}
    for key, leaf in value.items():
        where = f"{what}.{key}"
        nested[key] = (
            _parameters(leaf, where) if isinstance(leaf, Mapping) else _number(leaf, where)
        )
    return nested


def load_observations(path: str | os.PathLike) -> list[tuple[dict, float | None]]:
    """Read a :class:`JSONLinesHistory` file as ``(parameters, loss)`` pairs, in file order.

    The result can be passed as ``initial_observations`` to ``Fitter.fit_nevergrad`` to resume
    a fit. Blank lines are ignored. A truncated last line (a process killed while writing) is
    skipped with a WARNING; any other bad line raises ``ValueError`` naming the file and line.

    Parameters
    ----------
    path : str or os.PathLike
        The history file.

    Returns
    -------
    list of (dict, float)
        Nested parameters (leaves as floats) and the loss told for them.

    Examples
    --------
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "fit.jsonl"
    >>> _ = path.write_text('{"parameters": {"a": {"b": 1}}, "loss": 0.5}\\n{"parame')
    >>> load_observations(path)
    [({'a': {'b': 1.0}}, 0.5)]
    """
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    observations: list[tuple[dict, float | None]] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        lineno = i + 1
        try:
            data = json.loads(line)
        except ValueError as exc:
            if i == last:
                logger.warning("%s: skipping the truncated last line %d (%s)", path, lineno, exc)
                continue
            raise ValueError(
                f"{path}, line {lineno}: not valid JSON ({exc}); each line must hold one "
                "evaluation record"
            ) from exc
        try:
            if not isinstance(data, Mapping) or "parameters" not in data or "loss" not in data:
                raise ValueError(
                    f"expected an object with the keys 'parameters' and 'loss', got {line[:80]!r}"
                )
            observations.append(
                (_parameters(data["parameters"], "parameters"), _number(data["loss"], "loss"))
            )
        except ValueError as exc:
            raise ValueError(f"{path}, line {lineno}: {exc}") from exc
    return observations
