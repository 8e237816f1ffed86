"""A live matplotlib plot of a fit's objective values, fed by the fitter's callbacks.

:class:`LivePlot` shows every evaluation's loss, the best loss so far, optionally the parameter
values (with the best-so-far parameters) and the per-term losses of a combined objective (for
the best evaluation so far). It never evaluates anything: it is fed

* by :class:`~chemfit.fitting.results.EvaluationRecord` objects, as a fitter evaluation
  callback (``fitter.register_evaluation_callback(plot)``, every told evaluation);
* by the contexts that come back from ``map_with_context``, as a step callback
  (``fitter.register_callback(plot.on_step)``, each context's latest evaluation per step);
* by the record dicts that MPI engines stream back
  (``MPIEngineFit(..., on_record=plot.on_evaluation)``).

The figure is an interactive ipympl canvas when ipympl is installed (its front-end extension
ships with it), otherwise a PNG re-drawn into an ``ipywidgets.Image``.

When frames are drawn: the first evaluation after :meth:`LivePlot.reset` is drawn at once. Then
a frame comes every ``cost / max_cost`` seconds (``cost``: what the recent frames took), never
more often than ``min_interval`` and never less often than ``max_interval`` (2 s), so drawing
takes about ``max_cost`` of the fit's time. The cost of a frame is kept bounded by drawing fewer
points, never by waiting longer: a long history is thinned for display (every k-th evaluation,
every improvement of the best loss and the newest evaluations; the caption says so), and the
number of points shrinks when frames are slow. Axes, ticks and the legend are drawn only when
they change; other frames draw just the data over a cached background.
Callbacks only append to a list; the data are turned into artists when a frame is drawn.
"""

from __future__ import annotations

import difflib
import html
import io
import logging
import math
import os
import threading
import time
import warnings
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any, Literal, NamedTuple

import numpy as np

from chemfit.core.labels import term_labels as _labels_of_terms

from ._jupyter import close_children, has_ipympl, require_ipywidgets, require_matplotlib

widgets = require_ipywidgets()

import traitlets  # noqa: E402  (ipywidgets depends on it)

__all__ = ["Frame", "LivePlot", "thin_indices"]

logger = logging.getLogger(__name__)

Backend = Literal["auto", "ipympl", "png"]

_PENDING_TIMEOUT = 1.0  # ask an ipympl front end again when it did not answer in this time
_MIN_POINTS = 500  # the adaptive point budget never goes below this
_TAIL = 100  # the newest evaluations are always drawn (at most a tenth of the budget)
_LEGEND_FONT = 6.5  # points
_TITLE_FONT = 9.0
_FIGURE_FRAMES = 1000  # frames kept in LivePlot.frames


class Frame(NamedTuple):
    """One drawn frame (see :attr:`LivePlot.frames`)."""

    at: float  #: ``time.perf_counter()`` when the frame was done
    records: int  #: evaluations it showed
    points: int  #: loss points it drew (fewer than ``records`` when thinning)
    seconds: float  #: what it cost (as booked by the throttle)
    axes_redrawn: bool  #: whether axes, ticks or legend were redrawn (not just the data)


def _as_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _term_losses(meta: Any) -> list[float] | None:
    """Per-term losses of a combined objective's meta (full or MPI-summary form)."""
    if not isinstance(meta, Mapping):
        return None
    losses = meta.get("children_losses")
    if losses is None:
        children = meta.get("children")
        if not isinstance(children, list) or not children:
            return None
        losses = [child.get("loss") if isinstance(child, Mapping) else None for child in children]
    return [_as_float(v) for v in losses]


def _meta_term_labels(meta: Any) -> list[str | None] | None:
    """The terms' names or tags from a combined objective's full meta, if any term has one.

    Examples
    --------
    >>> _meta_term_labels({"children": [{"meta": {"tag": "fcc"}}, {"meta": {}}]})
    ['fcc', None]
    >>> _meta_term_labels({"children_losses": [1.0]}) is None
    True
    """
    children = meta.get("children") if isinstance(meta, Mapping) else None
    if not isinstance(children, list):
        return None
    labels: list[str | None] = []
    for child in children:
        child_meta = child.get("meta") if isinstance(child, Mapping) else None
        label = None
        if isinstance(child_meta, Mapping):
            for key in ("name", "label", "tag"):
                value = child_meta.get(key)
                if isinstance(value, str) and value and value != "tag_None":
                    label = value
                    break
        labels.append(label)
    return labels if any(labels) else None


def _combined_objective(obj: Any) -> Any:
    """The combined objective inside a fitter or a wrapper (ExecutorWrapperCOB, ...), if any."""
    for _ in range(6):
        if isinstance(getattr(obj, "objective_functions", None), list):
            return obj
        inner = None
        for attribute in ("objective_function", "wrap_me", "cob"):
            inner = getattr(obj, attribute, None)
            if inner is not None:
                break
        if inner is None:
            return None
        obj = inner
    return None


def _flat_units(units: Mapping) -> dict[str, str]:
    """``{"lj": {"eps": "eV"}, "k": "1"}`` -> ``{"lj.eps": "eV", "k": "1"}`` (flat keys kept)."""
    flat: dict[str, str] = {}
    for key, value in units.items():
        if isinstance(value, Mapping):
            flat.update({f"{key}.{k}": v for k, v in _flat_units(value).items()})
        else:
            flat[str(key)] = str(value)
    return flat


def _with_unit(text: str, unit: str | None) -> str:
    return f"{text} [{unit}]" if unit else text


def _flat_values(parameters: Any) -> dict[str, Any]:
    if not isinstance(parameters, Mapping):
        return {}
    flat: dict[str, Any] = {}
    for key, value in parameters.items():
        if isinstance(value, Mapping):
            flat.update({f"{key}.{k}": v for k, v in _flat_values(value).items()})
        else:
            flat[str(key)] = value
    return flat


def _clocks() -> tuple[float, float]:
    """(CPU time of this thread, wall time) now."""
    return time.thread_time(), time.perf_counter()


_SUPERSCRIPTS = str.maketrans(
    "-0123456789", "\u207b\u2070\u00b9\u00b2\u00b3\u2074\u2075\u2076\u2077\u2078\u2079"
)


def _power_of_ten(value: float, _pos: Any = None) -> str:
    """``10⁻³`` in plain Unicode: matplotlib's mathtext labels take ~50 ms each to lay out.

    Examples
    --------
    >>> [_power_of_ten(v) for v in (1e-3, 1.0, 10.0, 100.0, 2e5)]
    ['10⁻³', '1', '10', '10²', '2e+05']
    """
    if not value > 0:
        return ""
    exponent = math.log10(value)
    if abs(exponent - round(exponent)) > 1e-9:
        return f"{value:.3g}"
    exponent = round(exponent)
    if exponent in (0, 1):
        return str(10**exponent)
    return "10" + str(exponent).translate(_SUPERSCRIPTS)


def _few_ticks(ax: Any) -> None:
    """Few ticks and no minor ones: tick labels are most of the cost of redrawing the axes."""
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullLocator

    ax.xaxis.set_major_locator(MaxNLocator(5, integer=True))
    if ax.get_yscale() == "log":
        ax.yaxis.set_major_locator(LogLocator(numticks=6))
        ax.yaxis.set_major_formatter(FuncFormatter(_power_of_ten))
    else:
        ax.yaxis.set_major_locator(MaxNLocator(4))
    ax.yaxis.set_minor_locator(NullLocator())


def _nice_ceiling(n: float, smallest: int = 10) -> int:
    """The smallest of ``smallest`` and 1, 2, 5, 10, 20, 50, ... above it that is >= ``n``.

    Examples
    --------
    >>> [_nice_ceiling(n) for n in (0, 11, 21, 400, 501)]
    [10, 20, 50, 500, 1000]
    >>> [_nice_ceiling(n, smallest=1) for n in (1, 1.5, 3, 7)]
    [1, 2, 5, 10]
    """
    step = 1
    while True:
        for factor in (1, 2, 5):
            value = step * factor
            if value >= smallest and n <= value:
                return value
        step *= 10


def _ordinal(n: int) -> str:
    """``2nd``, ``20th``, ``21st``...

    Examples
    --------
    >>> [_ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 20, 21, 22, 100)]
    ['1st', '2nd', '3rd', '4th', '11th', '12th', '13th', '20th', '21st', '22nd', '100th']
    """
    if 10 <= n % 100 <= 20:
        return f"{n}th"
    return f"{n}{ {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th') }"


def _every(count: int, step: int) -> np.ndarray:
    """Positions ``0, step, 2*step, ...`` below ``count``, and always the last one."""
    if count <= 0:
        return np.zeros(0, dtype=np.intp)
    picked = np.arange(0, count, max(1, step), dtype=np.intp)
    if picked[-1] != count - 1:
        picked = np.append(picked, count - 1)
    return picked


def thin_indices(
    n: int, budget: int, keep: np.ndarray | None = None, tail: int = _TAIL
) -> tuple[np.ndarray, int]:
    """Which of ``n`` points to draw when at most about ``budget`` of them may be drawn.

    Parameters
    ----------
    n : int
        Points available (0-based indices ``0 .. n-1``).
    budget : int
        Points that may be drawn, about.
    keep : array of int, optional
        Indices that are always drawn (e.g. where the best loss improved); thinned too when
        they are more than a quarter of the budget.
    tail : int
        The newest points always drawn (at most a tenth of the budget).

    Returns
    -------
    indices : numpy.ndarray
        Sorted indices to draw.
    stride : int
        Every ``stride``-th point is drawn (1: all of them). Strides are 1-2-5 numbers, so the
        drawn points stay the same from one frame to the next until the stride grows.

    Examples
    --------
    >>> idx, stride = thin_indices(10, 100)
    >>> stride, idx.tolist() == list(range(10))
    (1, True)
    >>> idx, stride = thin_indices(25_000, 1000, keep=np.array([3, 7, 12_345]), tail=20)
    >>> stride, len(idx), idx[:4].tolist(), int(idx[-1])
    (50, 523, [0, 3, 7, 50], 24999)
    """
    if n <= budget:
        return np.arange(n, dtype=np.intp), 1
    tail = max(1, min(tail, budget // 10))
    keep = np.zeros(0, dtype=np.intp) if keep is None else np.asarray(keep, dtype=np.intp)
    if keep.size > budget // 4:
        keep = keep[_every(keep.size, math.ceil(keep.size / max(1, budget // 4)))]
    grid = max(1, budget - tail - keep.size)
    stride = _nice_ceiling(n / grid, smallest=1)
    parts = [np.arange(0, n, stride, dtype=np.intp), keep, np.arange(n - tail, n, dtype=np.intp)]
    return np.unique(np.concatenate(parts)), stride


class _Column:
    """An append-only float64 array (amortised doubling), read as a numpy view."""

    __slots__ = ("array", "size")

    def __init__(self, nan_fill: int = 0) -> None:
        self.array = np.full(max(64, 2 * nan_fill), math.nan)
        self.size = nan_fill

    def append(self, value: float) -> None:
        if self.size == self.array.size:
            grown = np.full(2 * self.array.size, math.nan)
            grown[: self.size] = self.array
            self.array = grown
        self.array[self.size] = value
        self.size += 1

    @property
    def values(self) -> np.ndarray:
        return self.array[: self.size]


class _Range:
    """Running minimum and maximum of the finite values seen."""

    __slots__ = ("hi", "lo")

    def __init__(self) -> None:
        self.lo, self.hi = math.inf, -math.inf

    def add(self, value: float) -> None:
        if value < self.lo:
            self.lo = value
        if value > self.hi:
            self.hi = value

    @property
    def empty(self) -> bool:
        return self.lo > self.hi


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
    >>> fitter.register_evaluation_callback(plot)        # fed by EvaluationRecords
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
        self._state_lock = threading.Lock()  # short: throttle bookkeeping
        self._timer: threading.Timer | None = None
        self._timer_due = math.inf
        self._closed = False
        self._reset_data()
        view = self._make_canvas(figsize, dpi)
        self.caption = widgets.HTML(
            layout=widgets.Layout(margin="0 0 0 60px"), style={"font_size": "0.85em"}
        )
        self.caption.add_class("chemfit-plot-caption")
        kwargs.setdefault("show_parameters", parameters)
        kwargs.setdefault("show_terms", terms)
        super().__init__(children=[view, self.caption], **kwargs)
        self.add_class("chemfit-live-plot")
        self._initialised = True
        self._uncounted = True  # the empty frame is not part of a fit's drawing
        with self._draw_lock:
            self._sync()
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
        """Create the figure and its canvas; return the widget that shows it."""
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=figsize, dpi=dpi)
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
            # FigureCanvasWebAggCore.draw does, with the cached background of _frame.
            with self._draw_lock:
                start = _clocks()
                canvas._png_is_old = True
                try:
                    info = self._frame()
                finally:
                    canvas.manager.refresh_all()
                self._account(start, info)

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
            if self._layout is not None:
                self._label_axes()
        self._changed()

    @traitlets.observe("term_labels", "max_legend_rows")
    def _on_legend(self, change: Any) -> None:
        with self._draw_lock:
            self._legend_key = None  # made again at the next frame
        self._changed()

    @traitlets.observe("show_parameters", "max_parameters", "show_terms", "max_terms")
    def _on_data_options(self, change: Any) -> None:
        with self._draw_lock:
            self._clear_converted()  # converted again from the records at the next frame
        self._changed()

    @traitlets.observe("expected")
    def _on_expected(self, change: Any) -> None:
        with self._draw_lock:
            self._limits.pop("evaluations", None)
        self._changed()

    @traitlets.observe("max_points")
    def _on_max_points(self, change: Any) -> None:
        self._point_budget = change["new"]
        self._changed()

    def _changed(self) -> None:
        """An option changed: draw it soon (throttled), unless reset() is under way."""
        if self._initialised and not self._holding:
            self._maybe_redraw()

    # -- data ---------------------------------------------------------------------------------

    def _reset_data(self) -> None:
        self._raw: list[tuple[float, bool, Any, Any]] = []
        self._seen: dict[int, int] = {}
        self._holding = False
        self._clear_converted()
        self._layout: tuple | None = None
        self._limits: dict = {}
        self._bounds: dict[str, tuple[float, float]] = {}
        self._background: Any = None
        self._background_size: Any = None
        self._boxes: dict = {}
        self._dirty: set = set()
        self._drawn = -1
        self._last_request = -math.inf
        self._cost: float | None = None  # smoothed cost of recent frames
        self._lag: float | None = None  # smoothed time from a frame's request to its end
        self._last_cost: float | None = None
        self._point_budget = self.max_points
        self._pending = False
        self._uncounted = False
        self._first_record_at: float | None = None
        self._data_requested = False
        self.first_frame_latency: float | None = None
        self._frames: deque[Frame] = deque(maxlen=_FIGURE_FRAMES)
        self.draw_count = 0
        self.draw_seconds = 0.0
        self.draw_wall_seconds = 0.0

    def _clear_converted(self) -> None:
        """Forget the plot data made from the records (they are kept and converted again)."""
        self._converted = 0
        self._loss = _Column()
        self._loss_range = _Range()
        self._best_x = _Column()  # 1-based evaluation numbers where the best loss improved
        self._best_y = _Column()
        self._param_keys: list[str] | None = None
        self._params: dict[str, _Column] = {}
        self._param_ranges: dict[str, _Range] = {}
        self._best_params: dict[str, _Column] = {}
        self._terms: list[_Column] = []
        self._n_terms = 0  # the most terms seen in one record (may exceed max_terms)
        self._meta_labels: list[str | None] | None = None
        self._n_penalised = 0
        self._drawn = -1
        self._layout = None

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
        self._cancel_timer()
        with self._draw_lock, self._state_lock:
            self._reset_data()
            self._holding = True
            try:
                self.expected = expected
                if objective is not None:
                    self.label_terms(objective)
            finally:
                self._holding = False
            for key, pair in _flat_values(dict(bounds or {})).items():
                try:
                    lower, upper = (_as_float(v) for v in pair)
                except (TypeError, ValueError):
                    continue
                if math.isfinite(lower) and math.isfinite(upper) and lower < upper:
                    self._bounds[key] = (lower, upper)
            if names is not None:
                self._set_parameter_keys(list(names))
            self._uncounted = True
        self.redraw()

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
        combined = _combined_objective(objective)
        labels = _labels_of_terms(combined) if combined is not None else []
        self.term_labels = labels
        return labels

    @property
    def frames(self) -> list[Frame]:
        """The last 1000 frames since :meth:`reset` (a copy)."""
        with self._state_lock:
            return list(self._frames)

    @property
    def n_records(self) -> int:
        """The number of evaluations received."""
        return len(self._raw)

    def on_evaluation(self, record: Any) -> None:
        """Add one evaluation: an ``EvaluationRecord`` or its ``to_dict()`` form.

        This is the evaluation callback (``fitter.register_evaluation_callback(plot)`` calls
        it, as does ``MPIEngineFit(on_record=plot.on_evaluation)``).
        """
        self._append(self._item(record))
        self._maybe_redraw()

    __call__ = on_evaluation

    def _append(self, item: tuple[float, bool, Any, Any]) -> None:
        if self._first_record_at is None:
            self._first_record_at = time.perf_counter()
        self._raw.append(item)  # list.append is atomic; the heavy work waits for a frame

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
            loss = _as_float(ctx.loss) if not penalised else math.nan
            self._append((loss, penalised, ctx.parameters, ctx.meta))
        self._maybe_redraw()

    def attach(self, fitter: Any, source: Literal["records", "contexts"] = "records") -> None:
        """Register this plot with ``fitter``: as evaluation callback or as step callback.

        When :attr:`term_labels` is empty, the legend names the terms of the fitter's combined
        objective (:meth:`label_terms`). A plot without data gets its parameter panels now,
        with the fitter's bounds as their limits, so that the first frame only adds the data.
        """
        if source == "records":
            fitter.register_evaluation_callback(self.on_evaluation)
        elif source == "contexts":
            fitter.register_callback(self.on_step, 1)
        else:
            raise ValueError(f"source must be 'records' or 'contexts', got {source!r}")
        objective = None if self.term_labels else fitter
        initial = getattr(fitter, "initial_parameters", None)
        if not self.n_records and isinstance(initial, Mapping):
            bounds = getattr(fitter, "bounds", None)
            self.reset(self.expected, list(_flat_values(initial)), bounds, objective)
        elif objective is not None:
            self.label_terms(objective)

    def detach(self, fitter: Any) -> None:
        """Remove this plot's callbacks from ``fitter``."""
        fitter.evaluation_callbacks[:] = [
            f for f in fitter.evaluation_callbacks if f not in (self, self.on_evaluation)
        ]
        fitter.callbacks[:] = [(f, n) for f, n in fitter.callbacks if f != self.on_step]

    def show_history(self, source: Any) -> None:
        """Show a finished fit: a ``FitResult``, a ``FitHistory`` or a list of records."""
        history = getattr(source, "history", source)
        self.reset()
        for record in history:
            self._append(self._item(record))
        self.finish()

    def _item(self, record: Any) -> tuple[float, bool, Any, Any]:
        if isinstance(record, Mapping):
            return (
                _as_float(record.get("loss")),
                bool(record.get("penalised", False)),
                record.get("parameters"),
                record.get("meta"),
            )
        return (float(record.loss), bool(record.penalised), record.parameters, record.meta)

    def _convert(self) -> None:
        """Turn the records received since the last frame into plot data."""
        raw = self._raw
        end = len(raw)
        show_terms, max_terms = self.show_terms, self.max_terms
        for index in range(self._converted, end):
            loss, penalised, parameters, meta = raw[index]
            if penalised or not math.isfinite(loss):
                self._n_penalised += penalised
                loss = math.nan
            else:
                self._loss_range.add(loss)
            flat = _flat_values(parameters)
            if self._param_keys is None and flat:
                self._set_parameter_keys(list(flat))
            self._loss.append(loss)
            for key in self._param_keys or ():
                value = _as_float(flat.get(key))
                self._params[key].append(value)
                if math.isfinite(value):
                    self._param_ranges[key].add(value)
            if show_terms:
                self._convert_terms(meta, max_terms)
            if not math.isnan(loss) and (not self._best_y.size or loss < self._best_y.values[-1]):
                self._best_x.append(self._loss.size)
                self._best_y.append(loss)
                for key in self._param_keys or ():
                    self._best_params[key].append(self._params[key].values[-1])
        self._converted = end

    def _convert_terms(self, meta: Any, max_terms: int) -> None:
        term_losses = _term_losses(meta)
        if term_losses is not None:
            if len(term_losses) > self._n_terms:
                self._n_terms = len(term_losses)
                self._meta_labels = _meta_term_labels(meta) or self._meta_labels
            while len(self._terms) < min(len(term_losses), max_terms):
                self._terms.append(_Column(nan_fill=self._loss.size - 1))
        for number, series in enumerate(self._terms):
            value = math.nan
            if term_losses is not None and number < len(term_losses):
                value = term_losses[number]
            series.append(value)

    def _set_parameter_keys(self, keys: list[str]) -> None:
        self._param_keys = self._choose_parameters(keys)
        for key in self._param_keys:
            self._params[key] = _Column(nan_fill=self._loss.size)
            self._param_ranges[key] = _Range()
            self._best_params[key] = _Column(nan_fill=self._best_x.size)

    def _choose_parameters(self, keys: list[str]) -> list[str]:
        if self.show_parameters is False:
            return []
        if self.show_parameters is True:
            return keys[: self.max_parameters]
        wanted = [k for k in self.show_parameters if k in keys]
        return wanted[: self.max_parameters]

    def data(self) -> dict:
        """The plotted data as numpy arrays (after bringing them up to date).

        Returns
        -------
        dict
            ``index`` (1-based evaluation number), ``loss`` (NaN for penalised ones),
            ``best`` (best loss so far, per evaluation), ``parameters`` (flat key -> values),
            ``terms`` (list of per-term loss arrays, at most ``max_terms``) and
            ``n_penalised``.
        """
        with self._draw_lock:
            self._convert()
            loss = self._loss.values.copy()
            best = np.fmin.accumulate(loss) if loss.size else loss.copy()
            return {
                "index": np.arange(1, loss.size + 1),
                "loss": loss,
                "best": best,
                "parameters": {k: v.values.copy() for k, v in self._params.items()},
                "terms": [t.values.copy() for t in self._terms],
                "n_penalised": self._n_penalised,
            }

    # -- figure -------------------------------------------------------------------------------

    def _term_label(self, number: int) -> str:
        if number < len(self.term_labels):
            return self.term_labels[number]
        meta = self._meta_labels
        if meta is not None and number < len(meta) and meta[number]:
            return str(meta[number])
        return f"term {number}"

    def _build(self) -> None:
        """(Re)create the axes for the known parameters (creating axes is the costly part)."""
        fig = self.figure
        fig.clear()
        keys = list(self._param_keys or ())
        if keys:
            grid = fig.add_gridspec(len(keys), 2, width_ratios=[1.7, 1.0])
            self._ax = fig.add_subplot(grid[:, 0])
            self._param_axes = [fig.add_subplot(grid[i, 1]) for i in range(len(keys))]
        else:
            self._ax = fig.add_subplot(1, 1, 1)
            self._param_axes = []
        ax = self._ax
        (self._points,) = ax.plot([], [], ".", ms=3, alpha=0.45, color="C0", label="evaluation")
        (self._best_line,) = ax.plot(
            [], [], "-", lw=2, color="C3", drawstyle="steps-post", label="best so far"
        )
        self._term_lines: list[Any] = []
        self._legend: Any = None
        self._legend_key: tuple | None = None
        self._legend_rows = 1
        ax.set_xlabel("evaluation", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3)
        self._param_artists = []
        for pax, key in zip(self._param_axes, keys):
            (points,) = pax.plot([], [], ".", ms=2, alpha=0.35, color="C0")
            (best,) = pax.plot([], [], "-", lw=1.5, color="C3", drawstyle="steps-post")
            pax.tick_params(labelsize=6)
            pax.grid(True, alpha=0.3)
            self._param_artists.append((key, points, best))
        for pax in self._param_axes[:-1]:
            pax.tick_params(labelbottom=False)
        for axes in (ax, *self._param_axes):
            _few_ticks(axes)
        self._label_axes()
        self._title = fig.suptitle("", fontsize=_TITLE_FONT)
        self._adjust()
        for artist in (self._points, self._best_line, self._title):
            artist.set_animated(True)
        for _key, points, best in self._param_artists:
            points.set_animated(True)
            best.set_animated(True)
        self._limits = {}
        self._background = None
        self._layout = self._layout_key()

    def _layout_key(self) -> tuple:
        return tuple(self._param_keys or ())

    def _label_axes(self) -> None:
        """Axis label and panel titles, with their units (call with ``_draw_lock`` held)."""
        label = _with_unit("loss", self.loss_unit)
        if self._ax.get_ylabel() != label:
            self._ax.set_ylabel(label, fontsize=8)
            self._dirty.add(self._ax)
        units = _flat_units(self.parameter_units)
        for (key, _points, _best), pax in zip(self._param_artists, self._param_axes):
            title = _with_unit(key, units.get(key))
            if pax.get_title() != title:
                pax.set_title(title, fontsize=8, pad=2)
                self._dirty.add(pax)

    def _adjust(self) -> None:
        """Leave room above the loss axes for the title and the legend rows."""
        height = self.figure.get_figheight() * 72.0  # points
        reserved = _TITLE_FONT * 2.0 + self._legend_rows * _LEGEND_FONT * 1.45 + 9.0
        self.figure.subplots_adjust(
            left=0.1, right=0.98, bottom=0.14, top=1.0 - reserved / height, wspace=0.28, hspace=0.5
        )

    @property
    def _dynamic(self) -> list:
        """The artists drawn in every frame, over the cached background."""
        artists = [self._points, self._best_line, *self._term_lines, self._title]
        for _key, points, best in self._param_artists:
            artists += [points, best]
        return artists

    def _legend_layout(self, n_terms: int) -> tuple[list[str], int, int]:
        """(term labels to show, hidden terms, columns) that fit ``max_legend_rows`` rows."""
        from matplotlib.font_manager import FontProperties

        renderer = self.figure.canvas.get_renderer()
        prop = FontProperties(size=_LEGEND_FONT)
        font_px = _LEGEND_FONT * self.figure.dpi / 72.0
        available = self._ax.get_position().width * self.figure.bbox.width

        def width(label: str) -> float:
            text = renderer.get_text_width_height_descent(label, prop, ismath=False)[0]
            return (1.6 + 0.5) * font_px + text  # handle, pad, text

        base = [width("evaluation"), width("best so far")]
        rows = max(1, self.max_legend_rows)
        shown = min(n_terms, self.max_terms)
        while True:
            labels = [self._term_label(i) for i in range(shown)]
            hidden = n_terms - shown
            widths = base + [width(label) for label in labels]
            if hidden:
                widths.append(width(f"+ {hidden} more terms"))
            column = max(widths)
            columns = max(1, int((available + 1.2 * font_px) // (column + 1.2 * font_px)))
            if math.ceil(len(widths) / columns) <= rows or shown == 0:
                return labels, hidden, min(columns, len(widths))
            shown -= 1

    def _update_legend(self) -> None:
        """Make the term lines and the legend above the loss axes when the terms changed."""
        n_terms = max(self._n_terms, len(self.term_labels)) if self.show_terms else 0
        key = (n_terms, self._meta_labels is not None)
        if key == self._legend_key:
            return
        from matplotlib.lines import Line2D

        ax = self._ax
        labels, hidden, columns = self._legend_layout(n_terms)
        for line in self._term_lines:
            line.remove()
        self._term_lines = []
        for number, label in enumerate(labels):
            (line,) = ax.plot(
                [],
                [],
                "-",
                lw=1.0,
                alpha=0.8,
                color=f"C{(number + 4) % 10}",
                drawstyle="steps-post",
                label=label,
            )
            line.set_animated(True)
            self._term_lines.append(line)
        handles: list[Any] = [self._points, self._best_line, *self._term_lines]
        if hidden:
            handles.append(
                Line2D([], [], linestyle="none", label=f"+ {hidden} more term{'s' * (hidden > 1)}")
            )
        if self._legend is not None:
            self._legend.remove()
        # A figure legend above the loss axes: off the data, and not redrawn with the axes.
        self._legend = self.figure.legend(
            handles=handles,
            loc="lower left",
            bbox_to_anchor=(0.0, 1.0),
            bbox_transform=ax.transAxes,
            ncols=columns,
            fontsize=_LEGEND_FONT,
            frameon=False,
            borderaxespad=1.0,  # clear of the top tick label, so each redraws alone
            borderpad=0.2,
            handlelength=1.6,
            handletextpad=0.5,
            columnspacing=1.2,
            labelspacing=0.3,
        )
        rows = math.ceil(len(handles) / columns)
        if rows != self._legend_rows:
            self._legend_rows = rows
            self._adjust()
            self._background = None
        self._legend_key = key
        self._dirty.add("legend")

    def _set_limits(self, ax: Any, name: str, scale: str, lo: float, hi: float) -> None:
        """Change an axis' limits only when the data leave them or fill a quarter of them, so
        that most frames reuse the cached background."""
        current = self._limits.get(name)
        if scale == "log":
            below = 1  # a decade of headroom: the best loss keeps falling during a fit
            if current is not None and current[0] == "log":
                c_lo, c_hi = current[1]
                if c_lo <= lo and hi <= c_hi:
                    return
                if lo < c_lo:  # it fell through the headroom: leave it more, redraw less
                    below = 3
            lo = 10.0 ** (math.floor(math.log10(lo)) - below)
            hi = 10.0 ** math.ceil(math.log10(hi))
            new = (lo, hi)
        else:
            span = hi - lo
            pad = 0.08 * span if span > 0 else max(abs(hi) * 0.1, 1e-12)
            pad_lo = pad_hi = pad
            if current is not None and current[0] == scale:
                c_lo, c_hi = current[1]
                if c_lo <= lo and hi <= c_hi and (c_hi - c_lo) <= 4 * max(span, 1e-300):
                    return
                # A side the data left keeps growing during a fit: leave it more room, so
                # that the axes (the costly part of a frame) are redrawn less often.
                pad_lo = 4 * pad if lo < c_lo else pad
                pad_hi = 4 * pad if hi > c_hi else pad
            new = (lo - pad_lo, hi + pad_hi)
        if current == (scale, new):
            return
        if ax.get_yscale() != scale:
            ax.set_yscale(scale)
            _few_ticks(ax)
        ax.set_ylim(*new)
        self._limits[name] = (scale, new)
        self._dirty.add(ax)

    def _sync(self) -> tuple[int, int, int]:
        """Bring the artists up to date with the data (call with ``_draw_lock`` held).

        Returns (evaluations shown, loss points drawn, stride of the thinning).
        """
        self._convert()
        if self._layout_key() != self._layout:
            self._build()
        self._update_legend()
        n = self._loss.size
        self._drawn = self._converted  # records that came in meanwhile wait for the next frame
        budget = max(10, min(self._point_budget, self.max_points))
        best_x = self._best_x.values
        best_pick = _every(best_x.size, math.ceil(best_x.size / budget))
        best_at = best_x[best_pick].astype(np.intp) - 1  # 0-based, thinned
        indices, stride = thin_indices(n, budget, keep=best_at)
        x = indices + 1.0
        self._points.set_data(x, self._loss.values[indices])
        line_x = np.append(best_at + 1.0, float(n)) if best_at.size else best_at
        line_y = self._best_y.values[best_pick]
        self._best_line.set_data(line_x, np.append(line_y, line_y[-1:]))
        shown = []
        for line, series in zip(self._term_lines, self._terms):  # the terms at the best
            values = series.values[best_at]
            values = np.append(values, values[-1:])
            line.set_data(line_x, values)
            shown.append(values)
        self._set_x_limits(n)
        lo, hi = self._loss_range.lo, self._loss_range.hi
        if shown:
            values = np.concatenate(shown)
            finite = values[np.isfinite(values)]
            if finite.size:
                lo, hi = min(lo, float(finite.min())), max(hi, float(finite.max()))
        if lo <= hi:
            # Log once the losses span three decades; back to linear below two (hysteresis).
            was_log = self._limits.get("loss", ("linear",))[0] == "log"
            scale = "log" if lo > 0 and hi / lo > (1e2 if was_log else 1e3) else "linear"
            self._set_limits(self._ax, "loss", scale, lo, hi)
        for (key, points, best), pax in zip(self._param_artists, self._param_axes):
            points.set_data(x, self._params[key].values[indices])
            best_values = self._best_params[key].values[best_pick]
            best.set_data(line_x, np.append(best_values, best_values[-1:]))
            if key in self._bounds:  # fixed limits: the bounds
                self._set_limits(pax, f"parameter {key}", "linear", *self._bounds[key])
            elif not self._param_ranges[key].empty:
                span = self._param_ranges[key]
                self._set_limits(pax, f"parameter {key}", "linear", span.lo, span.hi)
        self._title.set_text(self._title_text(n))
        return n, int(indices.size), stride

    def _set_x_limits(self, n: int) -> None:
        # The expected count, else growing in 1-2-5 steps (each step redraws the axes).
        x_max = self.expected if self.expected and n <= self.expected else _nice_ceiling(max(n, 50))
        if self._limits.get("evaluations") != x_max:
            for ax in (self._ax, *self._param_axes):
                ax.set_xlim(0, x_max)
                self._dirty.add(ax)
            self._limits["evaluations"] = x_max

    def _title_text(self, n: int) -> str:
        if not n:
            return f"{self.title}: waiting for evaluations"
        text = f"{self.title}: {n:,} evaluation{'s' if n != 1 else ''}"
        if self._best_y.size:
            text += f", best loss {self._best_y.values[-1]:.5g}"
            if self.loss_unit:
                text += f" {self.loss_unit}"
        if self._n_penalised:
            text += f", {self._n_penalised} penalised (not shown)"
        return text

    def _caption_text(self, n: int, points: int, stride: int) -> str:
        if stride == 1:
            text = f"{n:,} evaluation{'s' if n != 1 else ''} plotted"
        else:
            tail = max(1, min(_TAIL, max(10, min(self._point_budget, self.max_points)) // 10))
            text = (
                f"showing {points:,} of {n:,} evaluations (every {_ordinal(stride)}, each new "
                f"best and the newest {tail})"
            )
        if self._term_lines:
            text += "; term lines: each term's loss at the best so far"
        return html.escape(text, quote=False)

    def _frame(self) -> tuple[int, int, int, bool]:
        """Render the current data into the Agg buffer (call with ``_draw_lock`` held).

        The axes, ticks and legend are drawn only when the layout, limits or size changed
        (only the axes that changed, when they can be redrawn alone); otherwise the cached
        background is restored and only the data artists are drawn.
        """
        n, points, stride = self._sync()
        canvas = self.figure.canvas
        size = (canvas.get_width_height(physical=True), self.figure.dpi)
        redrawn = True
        if self._background is None or self._background_size != size:
            self._full_draw(canvas)
            self._background_size = size
        elif self._dirty:
            if not self._redraw_axes(canvas):  # they overlap others: draw everything
                self._full_draw(canvas)
        else:
            canvas.restore_region(self._background)
            redrawn = False
        self._dirty.clear()
        for artist in self._dynamic:
            if artist.axes is not None:
                artist.axes.draw_artist(artist)
            else:
                self.figure.draw_artist(artist)
        self.caption.value = self._caption_text(n, points, stride)
        return n, points, stride, redrawn

    def _full_draw(self, canvas: Any) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        FigureCanvasAgg.draw(canvas)  # skips the animated (data) artists
        self._background = canvas.copy_from_bbox(self.figure.bbox)
        renderer = canvas.get_renderer()
        self._boxes = {ax: ax.get_tightbbox(renderer) for ax in self.figure.axes}
        if self._legend is not None:
            self._boxes["legend"] = self._legend.get_window_extent(renderer)
        self._blank = None

    def _static(self, part: Any) -> Any:
        """The artist behind a key of ``_dirty``: an axes, or ``"legend"``."""
        return self._legend if part == "legend" else part

    def _redraw_axes(self, canvas: Any) -> bool:
        """Redraw only the changed axes (and legend) over the cached background.

        Their old area is blanked and they are drawn again. Returns False, and the caller
        draws everything, when that area or the new one overlaps another part of the figure.
        """
        renderer = canvas.get_renderer()
        parts = list(self._dirty)
        others = {k: box for k, box in self._boxes.items() if k not in self._dirty}

        def clear_of_others(box: Any) -> bool:
            return not any(box.padded(2).overlaps(other) for other in others.values())

        old = [self._boxes.get(part) for part in parts]
        if any(box is None or not clear_of_others(box) for box in old):
            return False
        if self._blank is None:
            renderer.clear()
            self.figure.patch.draw(renderer)
            self._blank = canvas.copy_from_bbox(self.figure.bbox)
        canvas.restore_region(self._background)
        height = int(renderer.height)
        for box in old:
            # Buffer regions count rows from the top of the figure.
            x0, y0, x1, y1 = box.padded(2).extents
            left, right = max(0, math.floor(x0)), math.ceil(x1) + 1
            top, bottom = max(0, height - math.ceil(y1) - 1), height - math.floor(y0)
            canvas.restore_region(self._blank, bbox=(left, top, right, bottom), xy=(0, 0))
        for part in parts:
            artist = self._static(part)
            artist.draw(renderer)
            new = (
                artist.get_window_extent(renderer)
                if part == "legend"
                else artist.get_tightbbox(renderer)
            )
            if not clear_of_others(new):  # it grew into another part: draw everything
                return False
            self._boxes[part] = new
        self._background = canvas.copy_from_bbox(self.figure.bbox)
        return True

    def _account(self, start: tuple[float, float], info: tuple[int, int, int, bool]) -> None:
        """Book a frame that began at ``start`` (from :func:`_clocks`).

        A PNG frame is drawn in the thread that fed the plot (usually the fit's), so its wall
        time is what the fit loses. An ipympl frame is drawn in the kernel's main thread while
        the fit goes on; there the frame's CPU time counts, which is what it takes from the fit
        through the GIL (its wall time is longer: it waits for the GIL meanwhile).
        """
        cpu_start, wall_start = start
        now = time.perf_counter()
        wall = now - wall_start
        seconds = wall if self.backend == "png" else time.thread_time() - cpu_start
        n, points, _stride, redrawn = info
        with self._state_lock:
            self._last_cost = seconds
            self._cost = seconds if self._cost is None else 0.5 * (self._cost + seconds)
            if self._pending:
                lag = now - self._last_request
                self._lag = lag if self._lag is None else 0.5 * (self._lag + lag)
            self._pending = False
            self._frames.append(Frame(now, n, points, seconds, redrawn))
            if n and self.first_frame_latency is None and self._first_record_at is not None:
                self.first_frame_latency = now - self._first_record_at
            if points > _MIN_POINTS and not redrawn:
                self._adapt_budget(seconds, points)
            if not n and self._first_record_at is not None and not self._closed:
                # Asked for before the first evaluation came (e.g. reset's empty frame): the
                # first evaluation is drawn right after it, not after a throttle's wait.
                self._data_requested = False
                self._schedule(0.0)
            if self._uncounted:  # the empty frame of reset(): not part of the fit's drawing
                self._uncounted = False
                return
            self.draw_count += 1
            self.draw_seconds += seconds
            self.draw_wall_seconds += wall

    def _adapt_budget(self, seconds: float, points: int) -> None:
        """Fewer points when a frame of ``points`` costs more than ``max_cost`` of
        ``max_interval``; more again when frames are cheap."""
        target = self.max_cost * max(self.max_interval, self.min_interval)
        budget = self._point_budget
        if seconds > target:
            budget = int(min(budget, points) * max(0.3, 0.8 * target / seconds))
        elif seconds < target / 4:
            budget = int(budget * 1.25) + 1
        self._point_budget = max(_MIN_POINTS, min(self.max_points, budget))

    def _render_png(self) -> None:
        from PIL import Image

        with self._draw_lock:
            start = _clocks()
            info = self._frame()
            pixels = np.asarray(self.figure.canvas.buffer_rgba())
            buffer = io.BytesIO()
            Image.fromarray(pixels).convert("RGB").save(buffer, format="png", compress_level=1)
            self._image.value = buffer.getvalue()
            self._account(start, info)

    def _request_frame(self) -> None:
        if self.backend == "png":
            self._render_png()
        else:
            self._canvas.draw_idle()  # the front end asks back for the frame

    # -- throttling ---------------------------------------------------------------------------

    def _interval(self) -> float:
        """Seconds between frames: what keeps drawing at ``max_cost``, within the limits."""
        cost = self._cost or 0.0
        # Requested this long after the last request, the next frame is done at most
        # max_interval after the last one (lag: from a request to its frame being done).
        lag = min(self._lag or 0.0, 0.5 * self.max_interval)  # a front end shown late
        longest = self.max_interval - max(cost, lag) - 0.05
        return max(self.min_interval, min(longest, cost / self.max_cost))

    def _maybe_redraw(self) -> None:
        if self._closed:
            return
        now = time.perf_counter()
        with self._state_lock:
            since = now - self._last_request
            if self._pending and since < _PENDING_TIMEOUT:
                # The front end has not answered yet; its frame will show the newest data.
                self._schedule(_PENDING_TIMEOUT - since)
                return
            first = not self._data_requested and self._first_record_at is not None
            wait = 0.0 if first else self._interval() - since
            if wait > 0:
                self._schedule(wait)
                return
            self._last_request = now
            self._pending = True
            self._data_requested = self._first_record_at is not None
        try:
            self._request_frame()
        except Exception:  # a plot must never break the fit
            logger.warning("drawing the live plot failed", exc_info=True)
            with self._state_lock:
                self._pending = False

    def _schedule(self, delay: float) -> None:
        """Draw the latest data later, even if no new record arrives (call with the lock).

        One timer at a time: the earlier of the one waiting and the one asked for.
        """
        due = time.perf_counter() + delay
        if self._timer is not None and self._timer.is_alive():
            if self._timer_due <= due:
                return
            self._timer.cancel()
        self._timer_due = due
        self._timer = threading.Timer(delay + 0.01, self._on_timer)
        self._timer.daemon = True
        self._timer.start()

    def _on_timer(self) -> None:
        with self._state_lock:
            if self._timer is threading.current_thread():
                self._timer = None  # this one is done: _maybe_redraw may schedule the next
        if len(self._raw) != self._drawn:
            self._maybe_redraw()

    def _cancel_timer(self) -> None:
        with self._state_lock:
            timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()

    # -- public drawing -----------------------------------------------------------------------

    def redraw(self) -> None:
        """Draw the current data now (not throttled)."""
        with self._state_lock:
            self._last_request = time.perf_counter()
            self._pending = True
        self._request_frame()

    def finish(self) -> None:
        """Draw the final state once the fit ended (cancels a pending throttled frame).

        Records may still arrive afterwards (a fit that goes on): they are appended and drawn
        as before. With ipympl and no front end connected (a notebook run headless), the frame
        is drawn at once, so that the saved notebook shows it.
        """
        self._cancel_timer()
        if self.backend == "ipympl" and getattr(self._canvas, "syncing_data_url", False):
            with self._state_lock:
                self._last_request = time.perf_counter()
                self._pending = True
                # The front end ignores a request while it waits for the previous image: ask
                # again until the final records are drawn.
                self._schedule(_PENDING_TIMEOUT)
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
            self._title.set_animated(False)  # figure-level animated artists are not saved
            try:
                target = path if isinstance(path, io.IOBase) else os.fspath(path)
                self.figure.savefig(target, format="png", dpi=dpi or self.dpi)
            finally:
                self._title.set_animated(True)

    def to_png(self) -> bytes:
        """The current figure as PNG bytes."""
        buffer = io.BytesIO()
        self.save_png(buffer)
        return buffer.getvalue()

    def close(self) -> None:
        """Stop pending redraws and close the widget (and the ipympl canvas)."""
        if not self._initialised:  # __init__ failed; ipywidgets still calls close()
            super().close()
            return
        self._closed = True
        self._cancel_timer()
        if self.backend == "ipympl":
            self._canvas.close()
        close_children(self)
        super().close()

    def __repr__(self) -> str:
        return f"LivePlot(backend={self.backend!r}, n_records={self.n_records})"
