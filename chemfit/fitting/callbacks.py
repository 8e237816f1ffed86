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
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from chemfit.core.utils import PicklesWithoutLock, atomic_write_text
from chemfit.fitting.jsonl import NumpyEncoder, append_line, repair_tail
from chemfit.fitting.observations import load_observations
from chemfit.fitting.validation import validation_line

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


def _fit_history(ctxs: Sequence[Any]) -> Any:
    """The history a fit's contexts read their best from (``None`` for other contexts)."""
    fit = getattr(ctxs[0], "_fit", None) if ctxs else None
    return None if fit is None else fit[0]


def _best(ctxs: Sequence[Any]) -> tuple[float | None, Any]:
    """``(loss, holder)`` of the best so far, where ``holder.opt_params`` and
    ``holder.opt_meta`` describe it: ``history.best()`` for a fit's contexts, else the context
    with the lowest usable ``opt_loss``; ``(None, None)`` before any."""
    history = _fit_history(ctxs)
    if history is not None:
        record = history.best()
        if record is None:
            return None, None
        if 0 <= record.worker < len(ctxs):  # its context's best is this record
            return record.loss, ctxs[record.worker]
        holder = SimpleNamespace(opt_params=record.parameters, opt_meta=record.meta)
        return record.loss, holder  # a resumed fit's record from a worker gone since
    best_ctx, best_loss = None, None
    for ctx in ctxs:
        loss = _usable_loss(getattr(ctx, "opt_loss", None))
        if loss is not None and (best_loss is None or loss < best_loss):
            best_ctx, best_loss = ctx, loss
    return best_loss, best_ctx


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
    best_loss, holder = _best(ctxs)
    best_params = None if holder is None else holder.opt_params
    logger.info("  Opt loss (all contexts)   = %s", best_loss)
    logger.info("  Opt params (all contexts) = %s", best_params)
    logger.info("-" * 40)


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
    >>> import numpy as np
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
    >>> import numpy as np
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
        loss, holder = _best(ctxs)
        if holder is None or (self.best_loss is not None and not loss < self.best_loss):
            return
        data = {
            "step": step,
            "loss": loss,
            "parameters": holder.opt_params,
            "meta": getattr(holder, "opt_meta", None),
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
            repair_tail(self.path)
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
        with self._lock:
            append_line(self.path, data)
            self.n_written += 1

    def on_validation(self, index: int, loss: float) -> None:
        """Append the validation loss of record ``index`` (``Fitter(validation=...)``) as a
        line ``{"index": ..., "validation": ...}``; ``FitHistory.from_jsonl`` reads it back
        into ``history.validation`` and ``load_observations`` skips it.

        Examples
        --------
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "fit.jsonl"
        >>> JSONLinesHistory(path).on_validation(3, 0.5)
        >>> path.read_text()
        '{"index": 3, "validation": 0.5}\\n'
        """
        with self._lock:
            append_line(self.path, validation_line(index, loss))

    def __repr__(self) -> str:
        return f"JSONLinesHistory({str(self.path)!r}, append={self.append})"
