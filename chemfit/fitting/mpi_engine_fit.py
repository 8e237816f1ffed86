"""Fit on ipyparallel MPI engines from a notebook, with live progress.

:class:`MPIEngineFit` starts (or connects to) an ipyparallel cluster whose engines form one MPI
world, builds the same combined objective on every engine, wraps it in
:class:`~chemfit.execution.mpi_wrapper_cob.MPIWrapperCOB` and runs a :class:`Fitter` on the
engine of rank 0 while the other ranks evaluate their share of the terms. Every told evaluation
is streamed back to the notebook as a record dict (index, step, loss, parameters, a summary of
the meta data, time) while the fit runs, so a live plot can follow it::

    def build():                                  # runs on every engine
        return CombinedObjectiveFunction([...])

    losses = []
    fit = MPIEngineFit(build, {"eps": 1.0}, {"eps": (0.1, 5.0)}, n_engines=2,
                       fit_kwargs={"budget": 100}, on_record=lambda r: losses.append(r["loss"]))
    fit.start()            # returns once the engines run the fit
    ...                    # plot `losses`, or fit.poll() in a loop with background=False
    result = fit.wait()    # a FitResult
    fit.stop()             # stops the cluster it started; nothing is left running

The generic machinery (engines, record streaming, stopping) is
:class:`~chemfit.execution.mpi_engines.MPIEngineJob`; this module adds the fit.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

from chemfit.execution.ipyparallel_executor import IPyParallelExecutor
from chemfit.execution.mpi_engines import MPIEngineJob, RecordCallback
from chemfit.fitting.fitter import Fitter
from chemfit.fitting.results import EvaluationRecord, FitHistory, FitResult
from chemfit.fitting.validation import validation_line

__all__ = ["FitDriver", "MPIEngineFit", "run_fit_on_mpi_engines"]

StreamMeta = Literal["summary", "full", "none"]
_METHODS = ("nevergrad", "scipy")
_FORBIDDEN_FIT_KWARGS = {"executor", "contexts", "ctx"}


def summarise_meta(meta: Mapping | None) -> dict | None:
    """A small summary of an evaluation's meta: its own keys, and for children only their
    number and losses.

    Examples
    --------
    >>> summarise_meta({"n_terms": 2, "children": [{"loss": 1.0, "meta": {}}, {"loss": 2.0}]})
    {'n_terms': 2, 'n_children': 2, 'children_losses': [1.0, 2.0]}
    """
    if meta is None:
        return None
    summary = {key: value for key, value in meta.items() if key != "children"}
    children = meta.get("children")
    if isinstance(children, list):
        summary["n_children"] = len(children)
        summary["children_losses"] = [
            child.get("loss") if isinstance(child, Mapping) else None for child in children
        ]
    return summary


class _RecordStreamer:
    """Evaluation callback on rank 0: publish each record as a dict."""

    def __init__(self, publish: Callable[[dict], None], stream_meta: StreamMeta) -> None:
        self.publish = publish
        self.stream_meta = stream_meta

    def __call__(self, record: EvaluationRecord) -> None:
        data = record.to_dict()
        if self.stream_meta == "none":
            data["meta"] = None
        elif self.stream_meta == "summary":
            data["meta"] = summarise_meta(data["meta"])
        self.publish(data)

    def on_validation(self, index: int, loss: float) -> None:
        """``Fitter(validation=...)`` tells each validation loss: published as its line."""
        self.publish(validation_line(index, loss))


class FitDriver:
    """Runs a :class:`Fitter` on rank 0 of an :class:`MPIEngineJob` (engine side).

    Parameters
    ----------
    initial_params, bounds : dict
        As for :class:`Fitter`.
    method : {"nevergrad", "scipy"}
        Which ``fit_*`` method to run.
    fit_kwargs : dict, optional
        Keyword arguments of that method (e.g. ``budget``, ``optimizer_str``, ``seed``).
    fitter_kwargs : dict, optional
        Further keyword arguments of :class:`Fitter` (``value_bad_params``, ...).
    stream_meta : {"summary", "full", "none"}
        How much of each evaluation's meta to stream: :func:`summarise_meta`, all of it, or
        nothing.

    Returns
    -------
    dict
        Calling it returns ``fitter.result.to_dict()`` (plain, JSON-safe data).

    Examples
    --------
    Any objective works outside MPI too; records go to ``publish``:

    >>> records = []
    >>> driver = FitDriver({"x": 0.0}, {"x": (-2.0, 2.0)}, method="scipy")
    >>> result = driver(lambda p: (p["x"] - 1.0) ** 2, records.append)
    >>> len(records) == result["n_evals"] > 0, round(result["best_parameters"]["x"], 3)
    (True, 1.0)
    >>> sorted(records[0])[:3]
    ['error', 'index', 'loss']
    """

    def __init__(
        self,
        initial_params: dict,
        bounds: dict | None = None,
        *,
        method: Literal["nevergrad", "scipy"] = "nevergrad",
        fit_kwargs: dict | None = None,
        fitter_kwargs: dict | None = None,
        stream_meta: StreamMeta = "summary",
    ) -> None:
        if method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
        if stream_meta not in ("summary", "full", "none"):
            raise ValueError(
                f"stream_meta must be 'summary', 'full' or 'none', got {stream_meta!r}"
            )
        fit_kwargs = dict(fit_kwargs or {})
        forbidden = sorted(_FORBIDDEN_FIT_KWARGS & set(fit_kwargs))
        if forbidden:
            raise ValueError(
                f"fit_kwargs may not contain {forbidden}: on the engines the fit runs on rank 0 "
                "and the other MPI ranks evaluate the terms; remove them"
            )
        if method == "nevergrad" and "budget" not in fit_kwargs:
            raise ValueError("fit_kwargs needs a 'budget' for method='nevergrad', e.g. 100")
        self.initial_params = copy.deepcopy(initial_params)
        self.bounds = copy.deepcopy(bounds)
        self.method = method
        self.fit_kwargs = fit_kwargs
        self.fitter_kwargs = dict(fitter_kwargs or {})
        self.stream_meta = stream_meta

    def make_fitter(self, objective: Any) -> Fitter:
        """The fitter, before any callback is registered (validates the parameters)."""
        return Fitter(objective, self.initial_params, self.bounds, **self.fitter_kwargs)

    def __call__(self, objective: Any, publish: Callable[[dict], None]) -> dict:
        fitter = self.make_fitter(objective)
        fitter.register_evaluation_callback(_RecordStreamer(publish, self.stream_meta))
        if self.method == "nevergrad":
            fitter.fit_nevergrad(**self.fit_kwargs)
        else:
            fitter.fit_scipy(**self.fit_kwargs)
        return fitter.result.to_dict()  # type: ignore[union-attr]


class MPIEngineFit(MPIEngineJob):
    """Run a fit on ipyparallel MPI engines and stream its evaluations back.

    Parameters
    ----------
    build_objective : callable
        ``build_objective() -> CombinedObjectiveFunction``, run on every engine.
    initial_params, bounds : dict
        As for :class:`Fitter`; checked here before any engine starts.
    n_engines : int
        MPI world size when the fit starts its own cluster.
    method : {"nevergrad", "scipy"}
        ``Fitter.fit_nevergrad`` or ``Fitter.fit_scipy``.
    fit_kwargs : dict
        Their keyword arguments (``budget`` is required for nevergrad).
    fitter_kwargs : dict, optional
        Further :class:`Fitter` keyword arguments. ``{"validation": objective}`` is evaluated
        on rank 0 for each improvement; each loss is streamed as a record
        ``{"index": i, "validation": loss}`` (the line a ``JSONLinesHistory`` writes, which
        :meth:`FitHistory.from_lines` and ``LivePlot.on_evaluation`` understand).
    stream_meta : {"summary", "full", "none"}
        How much meta each streamed record carries (see :func:`summarise_meta`).
    on_record : callable or list of callables, optional
        ``on_record(record_dict)`` for every evaluation, in tell order. The dict is
        ``EvaluationRecord.to_dict()`` with the meta as chosen by ``stream_meta`` (or, with a
        validation objective, a validation line ``{"index": i, "validation": loss}``).
    executor, profile, cluster_id, profile_dir, background, poll_interval
        As for :class:`~chemfit.execution.mpi_engines.MPIEngineJob`.
    timeout, rank_timeout, mpi_debug_log
        As for :class:`~chemfit.execution.mpi_engines.MPIEngineJob`; with ``rank_timeout`` a
        rank that does not answer ends the fit with ``RankTimeoutError``; the records streamed
        so far stay in :attr:`records`.

    Attributes
    ----------
    records : list[dict]
        The records received so far.
    result_dict : dict or None
        Rank 0's ``fitter.result.to_dict()`` once the fit finished.

    Examples
    --------
    The engines take seconds to start, so this is not run as a doctest::

        with MPIEngineFit(build, {"x": 0.0}, {"x": (-1, 1)}, n_engines=2,
                          fit_kwargs={"budget": 50}, on_record=print) as fit:
            result = fit.wait()
        result.best_parameters

    >>> MPIEngineFit(dict, {"x": 0.0}, fit_kwargs={"budget": 5}).state
    'created'
    """

    def __init__(
        self,
        build_objective: Callable[[], Any],
        initial_params: dict,
        bounds: dict | None = None,
        *,
        n_engines: int = 2,
        method: Literal["nevergrad", "scipy"] = "nevergrad",
        fit_kwargs: dict | None = None,
        fitter_kwargs: dict | None = None,
        stream_meta: StreamMeta = "summary",
        on_record: RecordCallback | Iterable[RecordCallback] | None = None,
        executor: IPyParallelExecutor | None = None,
        profile: str | None = None,
        cluster_id: str | None = None,
        profile_dir: str | os.PathLike | None = None,
        background: bool = True,
        poll_interval: float = 0.1,
        timeout: float = 60,
        rank_timeout: float | None = None,
        mpi_debug_log: bool = False,
    ) -> None:
        driver = FitDriver(
            initial_params,
            bounds,
            method=method,
            fit_kwargs=fit_kwargs,
            fitter_kwargs=fitter_kwargs,
            stream_meta=stream_meta,
        )
        driver.make_fitter(lambda parameters: 0.0)  # fail here on bad parameters or bounds
        super().__init__(
            build_objective,
            driver,
            n_engines=n_engines,
            executor=executor,
            profile=profile,
            cluster_id=cluster_id,
            profile_dir=profile_dir,
            on_record=on_record,
            background=background,
            poll_interval=poll_interval,
            timeout=timeout,
            rank_timeout=rank_timeout,
            mpi_debug_log=mpi_debug_log,
        )
        self.result_dict: dict | None = None

    def wait(self, timeout: float | None = None) -> FitResult:
        """Wait for the fit and return its :class:`FitResult` (see ``MPIEngineJob.wait``)."""
        self.result_dict = super().wait(timeout)
        return FitResult.from_dict(self.result_dict)

    result = wait

    @property
    def history(self) -> FitHistory:
        """The records received so far, as a :class:`FitHistory` (with the validation losses)."""
        return FitHistory.from_lines(self.records)


def run_fit_on_mpi_engines(
    build_objective: Callable[[], Any],
    initial_params: dict,
    bounds: dict | None = None,
    *,
    timeout: float | None = None,
    **kwargs: Any,
) -> FitResult:
    """Run :class:`MPIEngineFit` to the end and return its result; the cluster is stopped.

    ``timeout`` bounds the wait for the fit; ``kwargs`` go to :class:`MPIEngineFit`.

    Examples
    --------
    Not run as a doctest (it starts engines)::

        result = run_fit_on_mpi_engines(build, {"x": 0.0}, fit_kwargs={"budget": 40})
    """
    with MPIEngineFit(build_objective, initial_params, bounds, **kwargs) as fit:
        return fit.wait(timeout)
