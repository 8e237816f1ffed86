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
ships with it), otherwise a PNG re-drawn into an ``ipywidgets.Image``. Redraws are throttled:
at most one every ``min_interval`` seconds, and only while the time spent drawing stays below
``max_cost`` of the time since the fit started, so a fast fit is not slowed down by its plot.
Callbacks only append to a list; the data are turned into artists when a frame is drawn.
"""

from __future__ import annotations

import io
import logging
import math
import os
import threading
import time
import warnings
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from chemfit.core.flatdict import flatten_dict

from ._jupyter import close_children, has_ipympl, require_ipywidgets, require_matplotlib

widgets = require_ipywidgets()

__all__ = ["LivePlot"]

logger = logging.getLogger(__name__)

Backend = Literal["auto", "ipympl", "png"]

_FIRST_COST_GUESS = 0.05  # seconds per frame before the first one was measured
_PENDING_TIMEOUT = 5.0  # re-request an ipympl frame the front end did not ask for in time


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


def _clocks() -> tuple[float, float]:
    """(CPU time of this thread, wall time) now."""
    return time.thread_time(), time.perf_counter()


def _few_ticks(ax: Any) -> None:
    """Few ticks and no minor ones: tick labels are most of the cost of redrawing the axes."""
    from matplotlib.ticker import LogLocator, MaxNLocator, NullLocator

    ax.xaxis.set_major_locator(MaxNLocator(5, integer=True))
    if ax.get_yscale() == "log":
        ax.yaxis.set_major_locator(LogLocator(numticks=6))
    else:
        ax.yaxis.set_major_locator(MaxNLocator(4))
    ax.yaxis.set_minor_locator(NullLocator())


def _nice_ceiling(n: int) -> int:
    """The smallest of 10, 20, 50, 100, 200, 500, ... that is >= ``n``.

    Examples
    --------
    >>> [_nice_ceiling(n) for n in (0, 11, 21, 400, 501)]
    [10, 20, 50, 500, 1000]
    """
    step = 10
    while True:
        for factor in (1, 2, 5):
            if n <= step * factor:
                return step * factor
        step *= 10


class LivePlot(widgets.VBox):
    """Live plot of a fit's losses, best-so-far, parameters and per-term losses.

    Parameters
    ----------
    backend : {"auto", "ipympl", "png"}
        ``"auto"`` uses the ipympl canvas when ipympl is installed, else a re-drawn PNG.
    parameters : bool or list of str
        Plot parameter traces: ``True`` for the first ``max_parameters`` parameters, or a list
        of flat keys (``"a.b"``); ``False`` for none.
    terms : bool
        Plot the per-term losses of a combined objective (from the records' meta): those of
        the best evaluation so far, as steps; :meth:`data` has them for every evaluation.
    max_parameters, max_terms : int
        Caps on the parameter panels and term lines.
    min_interval : float
        Seconds between frames, at least.
    max_cost : float
        Fraction of the fit's run time that drawing may take (e.g. 0.03 for 3 %).
    max_points : int
        Loss and parameter points drawn per series; longer histories are thinned for display.
    figsize : tuple of float
        Figure size in inches.
    dpi : float
        Figure resolution.
    title : str
        Prefix of the figure title.

    Attributes
    ----------
    figure : matplotlib.figure.Figure
    backend : str
        ``"ipympl"`` or ``"png"``.
    n_records : int
        Evaluations received.
    draw_count, draw_seconds, draw_wall_seconds : int, float, float
        Frames drawn since the last :meth:`reset`, the time the throttle books for them (wall
        time for PNG frames, drawn in the fit's thread; CPU time for ipympl frames, drawn in
        the kernel's main thread) and their wall time.

    Examples
    --------
    >>> from chemfit import Fitter
    >>> plot = LivePlot(backend="png", min_interval=0.0)
    >>> fitter = Fitter(lambda p: (p["x"] - 1.0) ** 2, {"x": 0.0}, bounds={"x": (-2, 2)})
    >>> fitter.register_evaluation_callback(plot)        # fed by EvaluationRecords
    >>> _ = fitter.fit_nevergrad(budget=20, optimizer_str="OnePlusOne", seed=0)
    >>> plot.finish()
    >>> plot.n_records, float(plot.data()["best"][-1]) == fitter.result.best_loss
    (20, True)
    >>> plot.close()
    """

    _initialised = False

    def __init__(
        self,
        *,
        backend: Backend = "auto",
        parameters: bool | list[str] = True,
        terms: bool = True,
        max_parameters: int = 4,
        max_terms: int = 8,
        min_interval: float = 0.3,
        max_cost: float = 0.03,
        max_points: int = 1500,
        figsize: tuple[float, float] = (7.2, 3.4),
        dpi: float = 90,
        title: str = "Fit progress",
        **box_kwargs: Any,
    ) -> None:
        if backend not in ("auto", "ipympl", "png"):
            raise ValueError(f"backend must be 'auto', 'ipympl' or 'png', got {backend!r}")
        if backend == "ipympl" and not has_ipympl():
            raise ImportError(
                "backend='ipympl' needs ipympl; install it with: pip install 'chemfit[jupyter]', "
                "or use backend='png'"
            )
        if not (isinstance(max_cost, (int, float)) and 0 < max_cost <= 1):
            raise ValueError(f"max_cost must be a fraction in (0, 1], got {max_cost!r}")
        if not (isinstance(min_interval, (int, float)) and min_interval >= 0):
            raise ValueError(f"min_interval must be >= 0 seconds, got {min_interval!r}")
        require_matplotlib()
        from matplotlib.figure import Figure

        self.backend = (
            "ipympl" if backend == "ipympl" or (backend == "auto" and has_ipympl()) else "png"
        )
        self.show_parameters = parameters
        self.show_terms = bool(terms)
        self.max_parameters = int(max_parameters)
        self.max_terms = int(max_terms)
        self.min_interval = float(min_interval)
        self.max_cost = float(max_cost)
        self.max_points = max(10, int(max_points))
        self.dpi = dpi
        self.title = title

        self._draw_lock = threading.RLock()  # held while artists are updated and drawn
        self._state_lock = threading.Lock()  # short: throttle bookkeeping
        self.figure = Figure(figsize=figsize, dpi=dpi)
        if self.backend == "ipympl":
            from ipympl.backend_nbagg import Canvas, FigureManager

            self._canvas = Canvas(self.figure)
            with warnings.catch_warnings():  # ipympl's Toolbar passes traitlets a stray argument
                warnings.simplefilter("ignore", DeprecationWarning)
                self._manager = FigureManager(self._canvas, 0)
            self._canvas.header_visible = False
            self._canvas.footer_visible = False
            self._canvas.toolbar_position = "right"
            canvas = self._canvas

            def draw(*args: Any, **kwargs: Any) -> None:
                # Runs when the front end asks for a frame (in the kernel's main thread); what
                # FigureCanvasWebAggCore.draw does, with the cached background of _frame.
                with self._draw_lock:
                    start = _clocks()
                    canvas._png_is_old = True
                    try:
                        self._frame()
                    finally:
                        canvas.manager.refresh_all()
                    self._account(start)

            canvas.draw = draw
            view = self._canvas
        else:
            from matplotlib.backends.backend_agg import FigureCanvasAgg

            FigureCanvasAgg(self.figure)
            width = round(figsize[0] * dpi)
            self._image = widgets.Image(
                format="png", layout=widgets.Layout(width=f"{width}px", max_width="100%")
            )
            view = self._image
        #: How many evaluations the last frame showed (the plot lags the fit by design).
        self.caption = widgets.HTML(
            layout=widgets.Layout(margin="0 0 0 60px"), style={"font_size": "0.85em"}
        )
        self.caption.add_class("chemfit-plot-caption")
        super().__init__(children=[view, self.caption], **box_kwargs)
        self.add_class("chemfit-live-plot")
        self._timer: threading.Timer | None = None
        self._expected: int | None = None
        self._reset_data()
        with self._draw_lock:
            self._sync()
        if self.backend == "png":
            self._render_png()
        self._initialised = True

    # -- data ---------------------------------------------------------------------------------

    def _reset_data(self) -> None:
        self._raw: list[tuple[float, bool, Any, Any]] = []
        self._seen: dict[int, int] = {}
        self._converted = 0
        self._loss: list[float] = []
        self._best_x: list[int] = []
        self._best_y: list[float] = []
        self._param_keys: list[str] | None = None
        self._params: dict[str, list[float]] = {}
        self._best_params: dict[str, list[float]] = {}
        self._terms: list[list[float]] = []
        self._n_penalised = 0
        self._layout: tuple | None = None
        self._limits: dict = {}
        self._bounds: dict[str, tuple[float, float]] = {}
        self._background: Any = None
        self._background_size: Any = None
        self._drawn = -1
        self._t0 = time.perf_counter()
        self._last_request = -math.inf
        self._last_cost: float | None = None
        self._pending = False
        self._uncounted = False
        self.draw_count = 0
        self.draw_seconds = 0.0
        self.draw_wall_seconds = 0.0

    def reset(
        self,
        expected: int | None = None,
        names: Iterable[str] | None = None,
        bounds: Mapping | None = None,
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

        The empty frame drawn now does not count against the next fit's drawing budget.

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
            self._expected = expected
            self._bounds = {}
            for key, pair in flatten_dict(dict(bounds or {})).items():
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

    @property
    def n_records(self) -> int:
        """The number of evaluations received."""
        return len(self._raw)

    def on_evaluation(self, record: Any) -> None:
        """Add one evaluation: an ``EvaluationRecord`` or its ``to_dict()`` form.

        This is the evaluation callback (``fitter.register_evaluation_callback(plot)`` calls
        it, as does ``MPIEngineFit(on_record=plot.on_evaluation)``).
        """
        if isinstance(record, Mapping):
            item = (
                _as_float(record.get("loss")),
                bool(record.get("penalised", False)),
                record.get("parameters"),
                record.get("meta"),
            )
        else:
            item = (float(record.loss), bool(record.penalised), record.parameters, record.meta)
        self._raw.append(item)  # list.append is atomic; the heavy work waits for a frame
        self._maybe_redraw()

    __call__ = on_evaluation

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
            self._raw.append((loss, penalised, ctx.parameters, ctx.meta))
        self._maybe_redraw()

    def attach(self, fitter: Any, source: Literal["records", "contexts"] = "records") -> None:
        """Register this plot with ``fitter``: as evaluation callback or as step callback."""
        if source == "records":
            fitter.register_evaluation_callback(self.on_evaluation)
        elif source == "contexts":
            fitter.register_callback(self.on_step, 1)
        else:
            raise ValueError(f"source must be 'records' or 'contexts', got {source!r}")

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
            self._raw.append(self._item(record))
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
        for index in range(self._converted, end):
            loss, penalised, parameters, meta = raw[index]
            if penalised or not math.isfinite(loss):
                self._n_penalised += penalised
                loss = math.nan
            flat = flatten_dict(parameters) if isinstance(parameters, Mapping) else {}
            if self._param_keys is None and flat:
                self._set_parameter_keys(list(flat))
            self._loss.append(loss)
            for key in self._param_keys or ():
                self._params[key].append(_as_float(flat.get(key)))
            if self.show_terms:
                term_losses = _term_losses(meta)
                if term_losses is not None:
                    term_losses = term_losses[: self.max_terms]
                    while len(self._terms) < len(term_losses):
                        self._terms.append([math.nan] * (len(self._loss) - 1))
                for number, series in enumerate(self._terms):
                    value = math.nan
                    if term_losses is not None and number < len(term_losses):
                        value = term_losses[number]
                    series.append(value)
            if not math.isnan(loss) and (not self._best_y or loss < self._best_y[-1]):
                self._best_x.append(len(self._loss))
                self._best_y.append(loss)
                for key in self._param_keys or ():
                    self._best_params[key].append(self._params[key][-1])
        self._converted = end

    def _set_parameter_keys(self, keys: list[str]) -> None:
        self._param_keys = self._choose_parameters(keys)
        for key in self._param_keys:
            self._params[key] = [math.nan] * len(self._loss)
            self._best_params[key] = []

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
            ``terms`` (list of per-term loss arrays) and ``n_penalised``.
        """
        import numpy as np

        with self._draw_lock:
            self._convert()
            loss = np.asarray(self._loss, dtype=float)
            best = np.full(loss.shape, np.nan)
            for x, y in zip(self._best_x, self._best_y):
                best[x - 1 :] = y
            return {
                "index": np.arange(1, loss.size + 1),
                "loss": loss,
                "best": best,
                "parameters": {k: np.asarray(v, dtype=float) for k, v in self._params.items()},
                "terms": [np.asarray(t, dtype=float) for t in self._terms],
                "n_penalised": self._n_penalised,
            }

    # -- figure -------------------------------------------------------------------------------

    def _build(self) -> None:
        """(Re)create the axes for the known parameters (creating axes is the costly part)."""
        fig = self.figure
        fig.clear()
        n_params = len(self._param_keys or ())
        if n_params:
            grid = fig.add_gridspec(n_params, 2, width_ratios=[1.7, 1.0])
            self._ax = fig.add_subplot(grid[:, 0])
            self._param_axes = [fig.add_subplot(grid[i, 1]) for i in range(n_params)]
        else:
            self._ax = fig.add_subplot(1, 1, 1)
            self._param_axes = []
        ax = self._ax
        (self._points,) = ax.plot([], [], ".", ms=3, alpha=0.45, color="C0", label="evaluation")
        (self._best_line,) = ax.plot(
            [], [], "-", lw=2, color="C3", drawstyle="steps-post", label="best so far"
        )
        self._term_lines = []
        self._legend_state: tuple | None = None
        ax.set_xlabel("evaluation", fontsize=8)
        ax.set_ylabel("loss", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3)
        self._param_artists = []
        for pax, key in zip(self._param_axes, self._param_keys or ()):
            (points,) = pax.plot([], [], ".", ms=2, alpha=0.35, color="C0")
            (best,) = pax.plot([], [], "-", lw=1.5, color="C3", drawstyle="steps-post")
            pax.set_title(key, fontsize=8, pad=2)
            pax.tick_params(labelsize=6)
            pax.grid(True, alpha=0.3)
            self._param_artists.append((key, points, best))
        for pax in self._param_axes[:-1]:
            pax.tick_params(labelbottom=False)
        for axes in (ax, *self._param_axes):
            _few_ticks(axes)
        self._title = fig.suptitle("", fontsize=9)
        fig.subplots_adjust(left=0.1, right=0.98, bottom=0.14, top=0.88, wspace=0.28, hspace=0.5)
        # Drawn on top of a cached background in every frame; the rest only when limits change.
        self._dynamic = [self._points, self._best_line, self._title]
        for _key, points, best in self._param_artists:
            self._dynamic += [points, best]
        for artist in self._dynamic:
            artist.set_animated(True)
        self._limits: dict = {}
        self._background = None
        self._layout = tuple(self._param_keys or ())

    def _update_legend(self) -> None:
        """Add lines for newly seen terms and (re)make the legend once data arrived."""
        state = (len(self._terms), bool(self._loss))
        if state == self._legend_state:
            return
        ax = self._ax
        for number in range(len(self._term_lines), len(self._terms)):
            (line,) = ax.plot(
                [],
                [],
                "-",
                lw=1.0,
                alpha=0.8,
                color=f"C{(number + 4) % 10}",
                drawstyle="steps-post",
                label=f"term {number} (best)",
            )
            line.set_animated(True)
            self._term_lines.append(line)
            self._dynamic.insert(2 + number, line)
        if self._loss:
            ax.legend(fontsize=6, loc="upper right", framealpha=0.7, ncols=2 if self._terms else 1)
        self._legend_state = state
        self._background = None

    def _set_limits(self, ax: Any, name: str, scale: str, lo: float, hi: float) -> None:
        """Change an axis' limits only when the data leave them or fill a quarter of them, so
        that most frames reuse the cached background."""
        current = self._limits.get(name)
        if scale == "log":
            if current is not None and current[0] == "log":
                c_lo, c_hi = current[1]
                if c_lo <= lo and hi <= c_hi:
                    return
            # A decade of headroom below: the best loss keeps falling during a fit.
            lo = 10.0 ** (math.floor(math.log10(lo)) - 1)
            hi = 10.0 ** math.ceil(math.log10(hi))
            new = (lo, hi)
        else:
            span = hi - lo
            if current is not None and current[0] == scale:
                c_lo, c_hi = current[1]
                if c_lo <= lo and hi <= c_hi and (c_hi - c_lo) <= 4 * max(span, 1e-300):
                    return
            pad = 0.08 * span if span > 0 else max(abs(hi) * 0.1, 1e-12)
            new = (lo - pad, hi + pad)
        if current == (scale, new):
            return
        if ax.get_yscale() != scale:
            ax.set_yscale(scale)
            _few_ticks(ax)
        ax.set_ylim(*new)
        self._limits[name] = (scale, new)
        self._background = None

    def _sync(self) -> None:
        """Bring the artists up to date with the data (call with ``_draw_lock`` held)."""
        import numpy as np

        self._convert()
        if tuple(self._param_keys or ()) != self._layout:
            self._build()
        self._update_legend()
        n = len(self._loss)
        self._drawn = self._converted  # records that came in meanwhile wait for the next frame
        stride = max(1, math.ceil(n / self.max_points))
        x = np.arange(1, n + 1)
        loss = np.asarray(self._loss, dtype=float)
        self._points.set_data(x[::stride], loss[::stride])
        best_x = np.asarray(self._best_x + ([n] if self._best_x else []), dtype=float)
        best_y = np.asarray(self._best_y + (self._best_y[-1:] if self._best_y else []))
        self._best_line.set_data(best_x, best_y)
        shown = [loss]
        # Per-term losses of the best evaluation so far (all of them are in data()["terms"]).
        best_index = np.asarray(self._best_x, dtype=int) - 1
        for line, series in zip(self._term_lines, self._terms):
            values = np.asarray(series, dtype=float)[best_index]
            values = np.append(values, values[-1:])
            line.set_data(best_x, values)
            shown.append(values)

        # Grows in 1-2-5 steps (each step redraws the axes), capped by the expected count.
        x_max = _nice_ceiling(max(n, 50))
        if self._expected and n <= self._expected:
            x_max = min(x_max, self._expected)
        if self._limits.get("evaluations") != x_max:
            for ax in (self._ax, *self._param_axes):
                ax.set_xlim(0, x_max)
            self._limits["evaluations"] = x_max
            self._background = None
        values = np.concatenate(shown)
        finite = values[np.isfinite(values)]
        if finite.size:
            lo, hi = float(finite.min()), float(finite.max())
            scale = "log" if lo > 0 and hi / lo > 1e3 else "linear"
            self._set_limits(self._ax, "loss", scale, lo, hi)
        for (key, points, best), pax in zip(self._param_artists, self._param_axes):
            values = np.asarray(self._params[key], dtype=float)
            points.set_data(x[::stride], values[::stride])
            best_values = self._best_params[key]
            best.set_data(best_x, np.asarray(best_values + best_values[-1:], dtype=float))
            finite = values[np.isfinite(values)]
            if key in self._bounds:  # fixed limits: the bounds
                self._set_limits(pax, f"parameter {key}", "linear", *self._bounds[key])
            elif finite.size:
                self._set_limits(
                    pax, f"parameter {key}", "linear", float(finite.min()), float(finite.max())
                )
        if n:
            text = f"{self.title}: {n} evaluations"
            if self._best_y:
                text += f", best loss {self._best_y[-1]:.5g}"
            if self._n_penalised:
                text += f", {self._n_penalised} penalised (not shown)"
        else:
            text = f"{self.title}: waiting for evaluations"
        self._title.set_text(text)

    def _frame(self) -> None:
        """Render the current data into the Agg buffer (call with ``_draw_lock`` held).

        The axes, ticks and labels are drawn only when the layout, limits or size changed;
        otherwise the cached background is restored and only the data artists are drawn.
        """
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        self._sync()
        canvas = self.figure.canvas
        size = (canvas.get_width_height(physical=True), self.figure.dpi)
        if self._background is None or self._background_size != size:
            FigureCanvasAgg.draw(canvas)  # skips the animated (data) artists
            self._background = canvas.copy_from_bbox(self.figure.bbox)
            self._background_size = size
        else:
            canvas.restore_region(self._background)
        for artist in self._dynamic:
            if artist.axes is not None:
                artist.axes.draw_artist(artist)
            else:
                self.figure.draw_artist(artist)
        self.caption.value = f"{self._drawn} evaluation{'s' if self._drawn != 1 else ''} plotted"

    def _account(self, start: tuple[float, float]) -> None:
        """Book a frame that began at ``start`` (from :func:`_clocks`).

        A PNG frame is drawn in the thread that fed the plot (usually the fit's), so its wall
        time is what the fit loses. An ipympl frame is drawn in the kernel's main thread while
        the fit goes on; there the frame's CPU time counts, which is what it takes from the fit
        through the GIL (its wall time is longer: it waits for the GIL meanwhile).
        """
        cpu_start, wall_start = start
        wall = time.perf_counter() - wall_start
        seconds = wall if self.backend == "png" else time.thread_time() - cpu_start
        with self._state_lock:
            self._last_cost = seconds
            self._pending = False
            if self._uncounted:  # the empty frame of reset(): its cost is the next estimate
                self._uncounted = False
                return
            self.draw_count += 1
            self.draw_seconds += seconds
            self.draw_wall_seconds += wall

    def _render_png(self) -> None:
        import numpy as np
        from PIL import Image

        with self._draw_lock:
            start = _clocks()
            self._frame()
            pixels = np.asarray(self.figure.canvas.buffer_rgba())
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="png", compress_level=1)
            self._image.value = buffer.getvalue()
            self._account(start)

    def _request_frame(self) -> None:
        if self.backend == "png":
            self._render_png()
        else:
            self._canvas.draw_idle()  # the front end asks back for the frame

    # -- throttling ---------------------------------------------------------------------------

    def _maybe_redraw(self) -> None:
        now = time.perf_counter()
        with self._state_lock:
            since = now - self._last_request
            if self._pending and since < _PENDING_TIMEOUT:
                return
            wait = self.min_interval - since
            cost = self._last_cost if self._last_cost is not None else _FIRST_COST_GUESS
            if not self.draw_count:
                cost *= 2  # the first frame with data also sets up limits and the legend
            # Draw only while the total drawing time stays within max_cost of the run time.
            wait = max(wait, (self.draw_seconds + cost) / self.max_cost - (now - self._t0))
            if wait > 0:
                self._schedule(wait)
                return
            self._last_request = now
            self._pending = True
        try:
            self._request_frame()
        except Exception:  # a plot must never break the fit
            logger.warning("drawing the live plot failed", exc_info=True)
            with self._state_lock:
                self._pending = False

    def _schedule(self, delay: float) -> None:
        """Draw the latest data later, even if no new record arrives (call with the lock)."""
        if self._timer is not None and self._timer.is_alive():
            return
        self._timer = threading.Timer(delay + 0.01, self._on_timer)
        self._timer.daemon = True
        self._timer.start()

    def _on_timer(self) -> None:
        if len(self._raw) != self._drawn:
            self._maybe_redraw()

    def _cancel_timer(self) -> None:
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
        """Draw the final state once the fit ended (cancels a pending throttled frame)."""
        self._cancel_timer()
        self.redraw()

    def sync(self) -> None:
        """Update the artists from the data without drawing (e.g. before inspecting them)."""
        with self._draw_lock:
            self._sync()

    def save_png(self, path: str | os.PathLike, dpi: float | None = None) -> None:
        """Save the current figure as a PNG file."""
        with self._draw_lock:
            self._sync()
            self.figure.savefig(os.fspath(path), format="png", dpi=dpi or self.dpi)

    def to_png(self) -> bytes:
        """The current figure as PNG bytes."""
        with self._draw_lock:
            self._sync()
            buffer = io.BytesIO()
            self.figure.savefig(buffer, format="png", dpi=self.dpi)
        return buffer.getvalue()

    def close(self) -> None:
        """Stop pending redraws and close the widget (and the ipympl canvas)."""
        if not self._initialised:  # __init__ failed; ipywidgets still calls close()
            super().close()
            return
        self._cancel_timer()
        if self.backend == "ipympl":
            self._canvas.close()
        close_children(self)
        super().close()

    def __repr__(self) -> str:
        return f"LivePlot(backend={self.backend!r}, n_records={self.n_records})"
