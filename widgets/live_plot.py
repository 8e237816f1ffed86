"""A live matplotlib plot of a fit's objective values, fed by the fitter's callbacks.

:class:`LivePlot` shows every evaluation's loss, the best loss so far, optionally the parameter
values (with the best-so-far parameters) and the per-term losses of a combined objective (for
the best evaluation so far). It never evaluates anything: it is fed

* by :class:`~chemfit.fitting.results.EvaluationRecord` objects, as a fitter evaluation
  callback (``fitter.register_evaluation_callback(plot)``, every told evaluation);
* by the contexts that come back from ``map_with_context``, as a step callback
  (``fitter.register_callback(plot.on_step)``, each context's latest evaluation per step);
* by the record dicts that MPI engines stream back
  (``MPIEngineFit(..., on_record=plot.on_evaluation)``);
* or it reads a running fit's ``fitter.history`` itself (:meth:`LivePlot.follow`, as the
  dashboard does).

The records go into a :class:`~chemfit.fitting.results.FitHistory` (or are read from the fit's),
whose ``best()`` and improvements give the best-so-far line; callbacks only append, and the data
are turned into artists when a frame is drawn. The figure is an interactive ipympl canvas when
ipympl is installed (its front-end extension ships with it), otherwise a PNG re-drawn into an
``ipywidgets.Image``.

The parts: :mod:`~chemfit_widgets.plot_series` (records to columns, thinning),
:mod:`~chemfit_widgets.plot_figure` (the matplotlib drawing), :mod:`~chemfit_widgets.plot_cadence`
(when frames are drawn: the first evaluation after :meth:`LivePlot.reset` at once, then paced so
that drawing takes about ``max_cost`` of the fit's time, at least every ``max_interval``) and
:mod:`~chemfit_widgets.plot_labels` (words). This module is the widget that ties them together.
"""

from __future__ import annotations

import dataclasses
import difflib
import io
import math
import os
import threading
import warnings
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import numpy as np

from chemfit.core.labels import term_labels as _labels_of_terms
from chemfit.fitting.results import EvaluationRecord, FitHistory
from chemfit.fitting.validation import is_validation_line, parse_history_line, renumbered

from ._jupyter import close_children, has_ipympl, require_ipywidgets, require_matplotlib
from .plot_cadence import PENDING_TIMEOUT, Cadence, Frame, clocks
from .plot_figure import PlotFigure, View
from .plot_labels import caption_text, combined_objective, title_text
from .plot_series import TAIL, PlotSeries, as_float, flat_values, thin_indices

widgets = require_ipywidgets()

import traitlets  # noqa: E402  (ipywidgets depends on it)

__all__ = ["Frame", "LivePlot", "thin_indices"]

Backend = Literal["auto", "ipympl", "png"]
_CADENCE_OPTIONS = ("min_interval", "max_interval", "max_cost", "max_points")


def _record(
    index: int, loss: float, penalised: bool, parameters: Any, meta: Any, status: str = "ok"
) -> Any:
    """An ``EvaluationRecord`` for an evaluation that came without one (a dict, a context)."""
    if status not in ("failed", "lost"):
        status = "ok"
    return EvaluationRecord(
        index, 0, 0, parameters, loss, loss, penalised, None, meta, 0.0, status=status
    )


class LivePlot(widgets.VBox):
    """Live plot of a fit's losses, best-so-far, parameters and per-term losses.

    Parameters
    ----------
    backend : {"auto", "ipympl", "png"}
        ``"auto"`` uses the ipympl canvas when ipympl is installed, else a re-drawn PNG.
    parameters : bool or list of str
        Plot parameter traces: ``True`` for the first ``max_parameters`` parameters, or a list
        of flat keys (``"a.b"``); ``False`` for none. (The traitlet ``show_parameters``.)
    terms : bool
        Plot the per-term losses of a combined objective (from the records' meta): those of
        the best evaluation so far, as steps; :meth:`data` has them for every evaluation.
        (The traitlet ``show_terms``.)
    figsize : tuple of float
        Figure size in inches.
    dpi : float
        Figure resolution.
    **kwargs
        Initial values of the traitlets below (e.g. ``loss_unit="meV²"``), and ipywidgets
        ``Box`` options (``layout``).

    Attributes
    ----------
    title : str
        Prefix of the figure title (traitlet).
    loss_unit : str
        Unit of the loss, shown in the loss axis label: ``loss [meV²]`` (traitlet).
    parameter_units : dict
        Unit per parameter (flat ``"a.b"`` or nested keys), shown in the panel titles:
        ``{"epsilon": "eV", "sigma": "Å"}`` (traitlet).
    term_labels : list of str
        Legend labels of the terms of a combined objective, in term order (traitlet). Set by
        :meth:`label_terms` (also called by :meth:`attach` and ``reset(objective=...)``);
        without it the terms' ``name``/``tag`` in the records' meta, else ``term <i>``.
    expected : int or None
        The number of evaluations to come: the x axis spans it from the start (traitlet; raise
        it to continue a fit).
    min_interval, max_interval : float
        Seconds between frames, at least and at most (traitlets; 0.3 and 2.0). The first
        frame after :meth:`reset` comes at once.
    max_cost : float
        Fraction of the fit's time that drawing may take, e.g. 0.03 for 3 % (traitlet).
    max_points : int
        Loss and parameter points drawn per series, at most (traitlet); fewer when frames are
        slow. Longer histories are thinned for display, and the caption says so.
    max_parameters, max_terms : int
        Caps on the parameter panels and term lines (traitlets).
    max_legend_rows : int
        Legend rows above the loss axes (traitlet). Terms that do not fit are summed up in one
        entry, ``+ 8 more terms``.
    figure : matplotlib.figure.Figure
    backend : str
        ``"ipympl"`` or ``"png"``.
    caption : ipywidgets.HTML
        Under the figure: how many evaluations the last frame showed, and whether it thinned.
    n_records : int
        Evaluations received.
    draw_count, draw_seconds, draw_wall_seconds : int, float, float
        Frames drawn since the last :meth:`reset`, the time the throttle books for them (wall
        time for PNG frames, drawn in the fit's thread; CPU time for ipympl frames, drawn in
        the kernel's main thread) and their wall time.
    first_frame_latency : float or None
        Seconds from the first evaluation after :meth:`reset` to the end of the first frame
        that showed it.
    frames : list of Frame
        The last 1000 frames since :meth:`reset`: when, how many evaluations and points, their
        cost (a copy).

    Examples
    --------
    >>> from chemfit import Fitter
    >>> plot = LivePlot(backend="png", loss_unit="eV²", parameter_units={"x": "Å"})
    >>> fitter = Fitter(lambda p: (p["x"] - 1.0) ** 2, {"x": 0.0}, bounds={"x": (-2, 2)})
    >>> handle = fitter.register_evaluation_callback(plot)  # fed by EvaluationRecords
    >>> _ = fitter.fit_nevergrad(budget=20, optimizer_str="OnePlusOne", seed=0)
    >>> plot.finish()
    >>> plot.n_records, float(plot.data()["best"][-1]) == fitter.result.best_loss
    (20, True)
    >>> plot.first_frame_latency < 1.0, plot.caption.value
    (True, '20 evaluations plotted')
    >>> plot.close()
    """

    title = traitlets.Unicode("Fit progress")
    loss_unit = traitlets.Unicode("")
    parameter_units = traitlets.Dict()
    term_labels = traitlets.List(traitlets.Unicode())
    expected = traitlets.CInt(None, allow_none=True)
    show_parameters = traitlets.Union(
        [traitlets.Bool(), traitlets.List(traitlets.Unicode())], default_value=True
    )
    show_terms = traitlets.Bool(True)
    max_parameters = traitlets.CInt(4)
    max_terms = traitlets.CInt(8)
    max_legend_rows = traitlets.CInt(2)
    min_interval = traitlets.CFloat(0.3)
    max_interval = traitlets.CFloat(2.0)
    max_cost = traitlets.CFloat(0.03)
    max_points = traitlets.CInt(1500)

    _initialised = False

    def __init__(
        self,
        *,
        backend: Backend = "auto",
        parameters: bool | list[str] = True,
        terms: bool = True,
        figsize: tuple[float, float] = (7.2, 3.4),
        dpi: float = 90,
        **kwargs: Any,
    ) -> None:
        self._check_options(backend, kwargs)
        require_matplotlib()
        self.backend = (
            "ipympl" if backend == "ipympl" or (backend == "auto" and has_ipympl()) else "png"
        )
        self.dpi = dpi
        self._draw_lock = threading.RLock()  # held while artists are updated and drawn
        self._cadence = Cadence(self._request_frame, self._has_news, self.backend == "png")
        self._handles: list[tuple[Any, Any, Any]] = []  # (fitter, handle, callback) of attach
        view = self._make_canvas(figsize, dpi)
        self._start_data()
        self.caption = widgets.HTML(
            layout=widgets.Layout(margin="0 0 0 60px"), style={"font_size": "0.85em"}
        )
        self.caption.add_class("chemfit-plot-caption")
        kwargs.setdefault("show_parameters", parameters)
        kwargs.setdefault("show_terms", terms)
        super().__init__(children=[view, self.caption], **kwargs)
        self.add_class("chemfit-live-plot")
        self._initialised = True
        self._cadence.uncounted = True  # the empty frame is not part of a fit's drawing
        self.sync()
        if self.backend == "png":
            self._render_png()

    def _check_options(self, backend: str, kwargs: dict) -> None:
        if backend not in ("auto", "ipympl", "png"):
            raise ValueError(f"backend must be 'auto', 'ipympl' or 'png', got {backend!r}")
        if backend == "ipympl" and not has_ipympl():
            raise ImportError(
                "backend='ipympl' needs ipympl; install it with: pip install 'chemfit[jupyter]', "
                "or use backend='png'"
            )
        known = set(self.class_trait_names())
        for key in kwargs:
            if key not in known:
                close = difflib.get_close_matches(key, sorted(known), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise TypeError(f"LivePlot got an unknown option {key!r}{hint}")

    def _make_canvas(self, figsize: tuple[float, float], dpi: float) -> Any:
        """Create the figure, its canvas and its drawing; return the widget that shows it."""
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=figsize, dpi=dpi)
        self._figure = PlotFigure(self.figure)
        if self.backend == "png":
            from matplotlib.backends.backend_agg import FigureCanvasAgg

            FigureCanvasAgg(self.figure)
            width = round(figsize[0] * dpi)
            self._image = widgets.Image(
                format="png", layout=widgets.Layout(width=f"{width}px", max_width="100%")
            )
            return self._image
        from ipympl.backend_nbagg import Canvas, FigureManager

        self._canvas = canvas = Canvas(self.figure)
        with warnings.catch_warnings():  # ipympl's Toolbar passes traitlets a stray argument
            warnings.simplefilter("ignore", DeprecationWarning)
            self._manager = FigureManager(canvas, 0)
        canvas.header_visible = False
        canvas.footer_visible = False
        canvas.toolbar_position = "right"

        def draw(*args: Any, **kwargs: Any) -> None:
            # Runs when the front end asks for a frame (in the kernel's main thread); what
            # FigureCanvasWebAggCore.draw does, with the cached background of the drawing.
            with self._draw_lock:
                start = clocks()
                canvas._png_is_old = True
                try:
                    info = self._frame()
                finally:
                    canvas.manager.refresh_all()
                self._cadence.account(start, *info)

        canvas.draw = draw
        return canvas

    # -- validation and observers -------------------------------------------------------------

    @traitlets.validate("max_cost")
    def _valid_max_cost(self, proposal: Any) -> float:
        value = proposal["value"]
        if not 0 < value <= 1:
            raise ValueError(f"max_cost must be a fraction in (0, 1], got {value!r}")
        return value

    @traitlets.validate("min_interval", "max_interval")
    def _valid_interval(self, proposal: Any) -> float:
        value = proposal["value"]
        if not value >= 0:
            raise ValueError(f"{proposal['trait'].name} must be >= 0 seconds, got {value!r}")
        return value

    @traitlets.validate("max_points")
    def _valid_max_points(self, proposal: Any) -> int:
        return max(10, int(proposal["value"]))

    @traitlets.validate("max_parameters", "max_terms", "max_legend_rows")
    def _valid_count(self, proposal: Any) -> int:
        value = proposal["value"]
        if value < 0:
            raise ValueError(f"{proposal['trait'].name} must be >= 0, got {value!r}")
        return value

    @traitlets.observe("title")
    def _on_title(self, change: Any) -> None:
        self._changed()  # the title is drawn in every frame

    @traitlets.observe("loss_unit", "parameter_units")
    def _on_units(self, change: Any) -> None:
        with self._draw_lock:
            if self._figure.layout is not None:
                self._figure.label_axes(self._view())
        self._changed()

    @traitlets.observe("term_labels", "max_legend_rows")
    def _on_legend(self, change: Any) -> None:
        with self._draw_lock:
            self._figure.legend_key = None  # made again at the next frame
        self._changed()

    @traitlets.observe("show_parameters", "max_parameters", "show_terms", "max_terms")
    def _on_data_options(self, change: Any) -> None:
        with self._draw_lock:
            self._series = self._new_series()  # converted again from the records
            self._figure.layout = None
            self._drawn = -1
        self._changed()

    @traitlets.observe("expected")
    def _on_expected(self, change: Any) -> None:
        with self._draw_lock:
            self._figure.limits.pop("evaluations", None)
        self._changed()

    @traitlets.observe(*_CADENCE_OPTIONS)
    def _on_cadence_option(self, change: Any) -> None:
        setattr(self._cadence, change["name"], change["new"])
        if change["name"] == "max_points":
            self._cadence.point_budget = change["new"]
        self._changed()

    def _changed(self) -> None:
        """An option changed: draw it soon (throttled), unless reset() is under way."""
        if self._initialised and not self._holding:
            self._cadence.maybe_redraw()

    # -- data ---------------------------------------------------------------------------------

    def _new_series(self) -> PlotSeries:
        return PlotSeries(
            self.show_parameters, self.max_parameters, self.show_terms, self.max_terms
        )

    def _start_data(self) -> None:
        """No records yet: a history of the plot's own, nothing converted or drawn."""
        self._history = FitHistory()
        self._following = False  # reading a fit's history instead of appending to its own
        self._seen: dict[int, int] = {}
        self._index_offset = 0  # plot position - fit's index of the last record (on_validation)
        self._holding = False
        self._series = self._new_series()
        self._figure.forget()
        self._drawn = -1

    def reset(
        self,
        expected: int | None = None,
        names: Iterable[str] | None = None,
        bounds: Mapping | None = None,
        objective: Any = None,
    ) -> None:
        """Forget all data (e.g. before a new fit) and restart the drawing-cost clock.

        Parameters
        ----------
        expected : int, optional
            The number of evaluations to come (the budget): the x axis spans it from the start.
        names : iterable of str, optional
            The flat parameter keys, so that the panels exist before the first evaluation.
        bounds : dict, optional
            ``(lower, upper)`` per parameter (nested or flat keys); a parameter with both
            bounds keeps them as its axis limits, which saves redrawing the axes.
        objective : Fitter or CombinedObjectiveFunction, optional
            Whose terms the legend names (see :meth:`label_terms`); by default the term
            labels are kept.

        Notes
        -----
        The empty frame drawn now does not count against the next fit's drawing budget. A
        fit that goes on (records arriving after :meth:`finish`) needs no reset: its records
        are appended; raise ``expected`` to widen the x axis.

        Examples
        --------
        >>> plot = LivePlot(backend="png")
        >>> plot.reset(expected=100, names=["a.b", "c"], bounds={"a": {"b": (0, 1)}})
        >>> plot.data()["parameters"]
        {'a.b': array([], dtype=float64), 'c': array([], dtype=float64)}
        >>> plot.close()
        """
        self._cadence.cancel()
        with self._draw_lock, self._cadence.lock:
            self._start_data()
            self._cadence.restart()
            self._holding = True
            try:
                self.expected = expected
                if objective is not None:
                    self.label_terms(objective)
            finally:
                self._holding = False
            self._figure.bounds = _finite_bounds(bounds)
            if names is not None:
                self._series.set_parameter_keys(list(names))
            self._cadence.uncounted = True
        self.redraw()

    def follow(self, history: FitHistory) -> None:
        """Show the records of ``history`` (a running fit's ``fitter.history``), not a copy.

        Records the fit appends are drawn at the next frame; feeding the same records to
        :meth:`on_evaluation` (as an evaluation callback does) only schedules that frame. A
        history that continues the one shown (a resumed fit) keeps what was drawn.

        Examples
        --------
        >>> from chemfit import Fitter
        >>> fitter = Fitter(lambda p: (p["x"] - 1.0) ** 2, {"x": 0.0})
        >>> _ = fitter.fit_nevergrad(budget=10, optimizer_str="OnePlusOne", progress=False)
        >>> plot = LivePlot(backend="png")
        >>> plot.follow(fitter.result.history)
        >>> plot.n_records, float(plot.data()["best"][-1]) == fitter.result.best_loss
        (10, True)
        >>> plot.close()
        """
        with self._draw_lock:
            if history is not self._history and len(history) < len(self._history):
                self._series = self._new_series()  # not a continuation: converted anew
                self._drawn = -1
            self._history, self._following = history, True
        self._cadence.maybe_redraw()

    def label_terms(self, objective: Any) -> list[str]:
        """Name the legend's term lines after the terms of ``objective``.

        Parameters
        ----------
        objective : Fitter, CombinedObjectiveFunction or wrapper
            A fitter, a combined objective, or a wrapper around one (``ExecutorWrapperCOB``,
            ``MPIWrapperCOB``). Each term is labelled by its name or tag, else by its function
            and the arguments that tell it apart (``r=3.2``); see
            :func:`chemfit.core.labels.term_labels`.

        Returns
        -------
        list of str
            The labels (also in :attr:`term_labels`); empty when ``objective`` has no terms.

        Examples
        --------
        >>> from chemfit.core.combined import CombinedObjectiveFunction
        >>> from chemfit.core.wrapping import WrappedObjectiveFunctor
        >>> def pair(parameters, r):
        ...     return (parameters["eps"] / r - 1.0) ** 2
        >>> term = WrappedObjectiveFunctor(pair)
        >>> plot = LivePlot(backend="png")
        >>> plot.label_terms(CombinedObjectiveFunction([term.bind(r=3.2), term.bind(r=3.6)]))
        ['r=3.2', 'r=3.6']
        >>> plot.close()
        """
        combined = combined_objective(objective)
        labels = _labels_of_terms(combined) if combined is not None else []
        self.term_labels = labels
        return labels

    @property
    def n_records(self) -> int:
        """The number of evaluations received (the length of the history shown)."""
        return len(self._history)

    def on_evaluation(self, record: Any) -> None:
        """Add one evaluation: an ``EvaluationRecord`` or its ``to_dict()`` form (or a
        validation line ``{"index": i, "validation": loss}``, passed to :meth:`on_validation`).

        This is the evaluation callback (``fitter.register_evaluation_callback(plot)`` calls
        it, as does ``MPIEngineFit(on_record=plot.on_evaluation)``). While the plot
        :meth:`follow` s a fit's history, the record is already there: a frame is scheduled.
        """
        if is_validation_line(record):
            index, loss = parse_history_line(record)
            self.on_validation(index, loss)
            return
        if self._following:
            self._cadence.record_arrived()
        else:
            self._append(self._item(record))
        self._cadence.maybe_redraw()

    __call__ = on_evaluation

    def on_validation(self, index: int, loss: float) -> None:
        """Add the validation loss of the fit's record ``index`` (``Fitter(validation=...)``
        tells it to the evaluation callbacks that have this method): the "validation" line.
        While the plot :meth:`follow` s a fit's history, the history has it already.

        Examples
        --------
        >>> from chemfit import Fitter
        >>> fitter = Fitter(lambda p: (p["x"] - 1.0) ** 2, {"x": 0.0},
        ...                 validation=lambda p: (p["x"] - 0.8) ** 2)
        >>> plot = LivePlot(backend="png")
        >>> plot.attach(fitter)
        >>> _ = fitter.fit_nevergrad(budget=20, optimizer_str="OnePlusOne", progress=False)
        >>> plot.data()["validation"].tolist() == [v for _, v in fitter.result.validation]
        True
        >>> plot.close()
        """
        if not self._following:
            self._history.validation.append((index + self._index_offset, float(loss)))
        self._cadence.maybe_redraw()

    def _item(self, record: Any) -> EvaluationRecord:
        if isinstance(record, EvaluationRecord):
            return record
        index = len(self._history)
        if isinstance(record, Mapping):
            loss, penalised = as_float(record.get("loss")), bool(record.get("penalised", False))
            status = record.get("status", "ok")
            return _record(
                index, loss, penalised, record.get("parameters"), record.get("meta"), status
            )
        loss, penalised = float(record.loss), bool(record.penalised)
        status = getattr(record, "status", "ok")
        return _record(index, loss, penalised, record.parameters, record.meta, status)

    def _append(self, item: EvaluationRecord | tuple) -> None:
        """Add a record, or a ``(loss, penalised, parameters, meta)`` tuple, to the history."""
        position = len(self._history)
        if isinstance(item, EvaluationRecord):
            self._index_offset = position - item.index
        if isinstance(item, tuple):
            item = _record(position, *item)
        elif item.index != position:  # records of several fits: numbered in the plot's order
            item = dataclasses.replace(item, index=position)
        self._cadence.record_arrived()
        # The plot is the one writer of its own history (records fed to it by callbacks); a
        # list append, the heavy work waits for a frame.
        self._history.append(item)

    def on_step(self, step: int, contexts: Iterable[Any]) -> None:
        """Add each context's latest evaluation: a step callback, ``func(step, contexts)``.

        A context counts as evaluated when its ``n_evals`` grew since the last step; its
        ``loss``, ``parameters``, ``meta`` and ``last_evaluation`` (penalty flag) are read.
        In batch mode every evaluation is seen; in async mode a context that evaluated twice
        within one step shows only its latest evaluation (use the records for all of them).
        """
        for ctx in contexts:
            n_evals = getattr(ctx, "n_evals", None)
            key = id(ctx)
            if n_evals is not None:
                if n_evals <= self._seen.get(key, 0):
                    continue
                self._seen[key] = n_evals
            last = getattr(ctx, "last_evaluation", None) or {}
            penalised = bool(last.get("penalised", False))
            loss = as_float(ctx.loss) if not penalised else math.nan
            self._append((loss, penalised, ctx.parameters, ctx.meta))
        self._cadence.maybe_redraw()

    def attach(self, fitter: Any, source: Literal["records", "contexts"] = "records") -> None:
        """Register this plot with ``fitter``: as evaluation callback or as step callback.

        When :attr:`term_labels` is empty, the legend names the terms of the fitter's combined
        objective (:meth:`label_terms`). A plot without data gets its parameter panels now,
        with the fitter's bounds as their limits, so that the first frame only adds the data.
        :meth:`detach` removes the callback again.
        """
        if source == "records":
            func = self.on_evaluation
            handle = fitter.register_evaluation_callback(func)
        elif source == "contexts":
            func = self.on_step
            handle = fitter.register_callback(func, 1)
        else:
            raise ValueError(f"source must be 'records' or 'contexts', got {source!r}")
        self._handles.append((fitter, handle, func))
        objective = None if self.term_labels else fitter
        initial = getattr(fitter, "initial_parameters", None)
        if not self.n_records and isinstance(initial, Mapping):
            bounds = getattr(fitter, "bounds", None)
            self.reset(self.expected, list(flat_values(initial)), bounds, objective)
        elif objective is not None:
            self.label_terms(objective)

    def detach(self, fitter: Any) -> None:
        """Remove this plot's callbacks from ``fitter``."""
        mine = [entry for entry in self._handles if entry[0] is fitter]
        self._handles = [entry for entry in self._handles if entry[0] is not fitter]
        for _fitter, handle, _func in mine:
            fitter.remove_callback(handle)
        fitter.remove_callback(self)  # registered itself: register_evaluation_callback(plot)

    def show_history(self, source: Any) -> None:
        """Show a finished fit: a ``FitResult``, a ``FitHistory`` or a list of records."""
        history = getattr(source, "history", source)
        self.reset()
        for record in history:
            self._append(self._item(record))
        self._history.validation = renumbered(history)  # numbered as the records, from 0
        self.finish()

    def data(self) -> dict:
        """The plotted data as numpy arrays (after bringing them up to date).

        Returns
        -------
        dict
            ``index`` (1-based evaluation number), ``loss`` (NaN for penalised ones),
            ``best`` (best loss so far, per evaluation), ``parameters`` (flat key -> values),
            ``terms`` (list of per-term loss arrays, at most ``max_terms``),
            ``n_penalised``, and ``validation`` with ``validation_index`` (the validation
            losses of ``Fitter(validation=...)`` and their evaluation numbers).
        """
        with self._draw_lock:
            self._series.convert(self._history)
            return self._series.data()

    # -- frames -------------------------------------------------------------------------------

    def _term_label(self, number: int) -> str:
        if number < len(self.term_labels):
            return self.term_labels[number]
        meta = self._series.meta_labels
        if meta is not None and number < len(meta) and meta[number]:
            return str(meta[number])
        return f"term {number}"

    def _view(self) -> View:
        """What a frame shows besides the data, from the traitlets."""
        return View(
            budget=self._cadence.budget,
            expected=self.expected,
            loss_unit=self.loss_unit,
            parameter_units=self.parameter_units,
            term_label=self._term_label,
            n_term_labels=len(self.term_labels),
            show_terms=self.show_terms,
            max_terms=self.max_terms,
            max_legend_rows=self.max_legend_rows,
        )

    def _sync(self) -> tuple[int, int, int]:
        """Bring the artists up to date with the data (call with ``_draw_lock`` held).

        Returns (evaluations shown, loss points drawn, stride of the thinning).
        """
        series = self._series
        series.convert(self._history)
        self._drawn = series.converted  # records that came in meanwhile wait for the next frame
        n = series.loss.size
        title = title_text(
            self.title,
            n,
            series.best_loss,
            self.loss_unit,
            series.n_penalised,
            n_failed=series.n_failed,
            n_lost=series.n_lost,
        )
        return self._figure.show(series, self._view(), title)

    def _frame(self) -> tuple[int, int, bool]:
        """Render the current data into the Agg buffer (call with ``_draw_lock`` held).

        Returns (evaluations shown, points drawn, whether the axes were redrawn).
        """
        n, points, stride = self._sync()
        redrawn = self._figure.render()
        tail = max(1, min(TAIL, self._cadence.budget // 10))
        terms = bool(self._figure.term_lines)
        self.caption.value = caption_text(n, points, stride, tail, terms)
        return n, points, redrawn

    def _render_png(self) -> None:
        from PIL import Image

        with self._draw_lock:
            start = clocks()
            info = self._frame()
            pixels = np.asarray(self.figure.canvas.buffer_rgba())
            buffer = io.BytesIO()
            Image.fromarray(pixels).convert("RGB").save(buffer, format="png", compress_level=1)
            self._image.value = buffer.getvalue()
            self._cadence.account(start, *info)

    def _request_frame(self) -> None:
        if self.backend == "png":
            self._render_png()
        else:
            self._canvas.draw_idle()  # the front end asks back for the frame

    def _has_news(self) -> bool:
        return len(self._history) != self._drawn

    # -- public drawing -----------------------------------------------------------------------

    def redraw(self) -> None:
        """Draw the current data now (not throttled)."""
        self._cadence.asked()
        self._request_frame()

    def finish(self) -> None:
        """Draw the final state once the fit ended (cancels a pending throttled frame).

        Records may still arrive afterwards (a fit that goes on): they are appended and drawn
        as before. With ipympl and no front end connected (a notebook run headless), the frame
        is drawn at once, so that the saved notebook shows it.
        """
        self._cadence.cancel()
        if self.backend == "ipympl" and getattr(self._canvas, "syncing_data_url", False):
            self._cadence.asked()
            with self._cadence.lock:
                # The front end ignores a request while it waits for the previous image: ask
                # again until the final records are drawn.
                self._cadence.schedule(PENDING_TIMEOUT)
            self._canvas.draw()
            return
        self.redraw()

    def sync(self) -> None:
        """Update the artists from the data without drawing (e.g. before inspecting them)."""
        with self._draw_lock:
            self._sync()

    def save_png(self, path: str | os.PathLike | io.IOBase, dpi: float | None = None) -> None:
        """Save the current figure as a PNG file (a path or a binary file object)."""
        with self._draw_lock:
            self._sync()
            target = path if isinstance(path, io.IOBase) else os.fspath(path)
            self._figure.save(target, dpi or self.dpi)

    def to_png(self) -> bytes:
        """The current figure as PNG bytes."""
        buffer = io.BytesIO()
        self.save_png(buffer)
        return buffer.getvalue()

    # -- what the frames cost -------------------------------------------------------------------

    @property
    def frames(self) -> list[Frame]:
        """The last 1000 frames since :meth:`reset` (a copy)."""
        with self._cadence.lock:
            return list(self._cadence.frames)

    @property
    def first_frame_latency(self) -> float | None:
        """Seconds from the first evaluation after :meth:`reset` to the first frame showing it."""
        return self._cadence.first_frame_latency

    @property
    def draw_count(self) -> int:
        """Frames drawn since the last :meth:`reset`."""
        return self._cadence.draw_count

    @property
    def draw_seconds(self) -> float:
        """The time the throttle booked for those frames (see the class docstring)."""
        return self._cadence.draw_seconds

    @property
    def draw_wall_seconds(self) -> float:
        """The wall time of those frames."""
        return self._cadence.draw_wall_seconds

    def close(self) -> None:
        """Stop pending redraws and close the widget (and the ipympl canvas)."""
        if not self._initialised:  # __init__ failed; ipywidgets still calls close()
            super().close()
            return
        self._cadence.close()
        if self.backend == "ipympl":
            self._canvas.close()
        close_children(self)
        super().close()

    def __repr__(self) -> str:
        return f"LivePlot(backend={self.backend!r}, n_records={self.n_records})"


def _finite_bounds(bounds: Mapping | None) -> dict[str, tuple[float, float]]:
    """``(lower, upper)`` per flat key, for the parameters with two finite bounds."""
    kept = {}
    for key, pair in flat_values(dict(bounds or {})).items():
        try:
            lower, upper = (as_float(v) for v in pair)
        except (TypeError, ValueError):
            continue
        if math.isfinite(lower) and math.isfinite(upper) and lower < upper:
            kept[key] = (lower, upper)
    return kept
