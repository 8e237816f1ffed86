"""The live plot's matplotlib figure: axes, artists, legend, limits and blitted frames.

:class:`PlotFigure` draws a :class:`~chemfit_widgets.plot_series.PlotSeries` into a figure.
Axes, ticks and the legend are drawn only when they change (only the axes that changed, when
they can be redrawn alone); other frames restore a cached background and draw just the data
artists over it. Nothing here knows about widgets, threads or timing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .plot_labels import flat_units, power_of_ten, with_unit
from .plot_series import PlotSeries, every, nice_ceiling, thin_indices

__all__ = ["PlotFigure", "View"]

LEGEND_FONT = 6.5  # points
TITLE_FONT = 9.0


@dataclass
class View:
    """What a frame shows besides the data: options and words (from the widget's traitlets)."""

    budget: int  #: loss and parameter points drawn per series, at most
    expected: int | None = None  #: the x axis spans this many evaluations from the start
    loss_unit: str = ""
    parameter_units: dict = field(default_factory=dict)
    term_label: Callable[[int], str] = lambda number: f"term {number}"
    n_term_labels: int = 0  #: terms named before any record has them
    show_terms: bool = True
    max_terms: int = 8
    max_legend_rows: int = 2


def few_ticks(ax: Any) -> None:
    """Few ticks and no minor ones: tick labels are most of the cost of redrawing the axes."""
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullLocator

    ax.xaxis.set_major_locator(MaxNLocator(5, integer=True))
    if ax.get_yscale() == "log":
        ax.yaxis.set_major_locator(LogLocator(numticks=6))
        ax.yaxis.set_major_formatter(FuncFormatter(power_of_ten))
    else:
        ax.yaxis.set_major_locator(MaxNLocator(4))
    ax.yaxis.set_minor_locator(NullLocator())


class PlotFigure:
    """The artists of a live plot in ``figure``, brought up to date from the data.

    Parameters
    ----------
    figure : matplotlib.figure.Figure
        With an Agg-based canvas attached.

    Examples
    --------
    >>> from matplotlib.backends.backend_agg import FigureCanvasAgg
    >>> from matplotlib.figure import Figure
    >>> from chemfit.fitting.results import EvaluationRecord, FitHistory
    >>> figure = Figure(figsize=(6, 3))
    >>> _ = FigureCanvasAgg(figure)
    >>> series = PlotSeries(True, 4, True, 8)
    >>> history = FitHistory([EvaluationRecord(0, 0, 0, {"x": 1.0}, 2.0, 2.0, False, None,
    ...                                         None, 0.0)])
    >>> series.convert(history)
    >>> drawing = PlotFigure(figure)
    >>> drawing.show(series, View(budget=1000), "Fit: 1 evaluation")
    (1, 1, 1)
    >>> drawing.render(), drawing.points.get_ydata().tolist()
    (True, [2.0])
    """

    def __init__(self, figure: Any) -> None:
        self.figure = figure
        self.forget()

    def forget(self) -> None:
        """Drop the axes and the cached background: they are made again at the next frame."""
        self.layout: tuple | None = None
        self.legend_key: tuple | None = None
        self.limits: dict = {}
        self.bounds: dict[str, tuple[float, float]] = {}
        self.background: Any = None
        self.background_size: Any = None
        self.boxes: dict = {}
        self.dirty: set = set()
        self.blank: Any = None

    # -- layout -------------------------------------------------------------------------------

    def build(self, keys: list[str], view: View) -> None:
        """(Re)create the axes for the parameters ``keys`` (creating axes is the costly part)."""
        fig = self.figure
        fig.clear()
        if keys:
            grid = fig.add_gridspec(len(keys), 2, width_ratios=[1.7, 1.0])
            self.ax = fig.add_subplot(grid[:, 0])
            self.param_axes = [fig.add_subplot(grid[i, 1]) for i in range(len(keys))]
        else:
            self.ax = fig.add_subplot(1, 1, 1)
            self.param_axes = []
        ax = self.ax
        (self.points,) = ax.plot([], [], ".", ms=3, alpha=0.45, color="C0", label="evaluation")
        (self.best_line,) = ax.plot(
            [], [], "-", lw=2, color="C3", drawstyle="steps-post", label="best so far"
        )
        # Fitter(validation=...): the held-out loss at each new best (it holds until the next)
        (self.validation_line,) = ax.plot(
            [], [], "o-", ms=3, lw=1.2, color="C2", drawstyle="steps-post", label="validation"
        )
        # failed or lost evaluations: red crosses along the top edge (they have no loss)
        (self.faults,) = ax.plot(
            [], [], "x", ms=4, mew=1.2, color="red", clip_on=False, label="failed or lost",
            transform=ax.get_xaxis_transform(),
        )  # fmt: skip
        self.term_lines: list[Any] = []
        self.legend: Any = None
        self.legend_key: tuple | None = None
        self.legend_rows = 1
        ax.set_xlabel("evaluation", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3)
        self.param_artists = []
        for pax, key in zip(self.param_axes, keys):
            (points,) = pax.plot([], [], ".", ms=2, alpha=0.35, color="C0")
            (best,) = pax.plot([], [], "-", lw=1.5, color="C3", drawstyle="steps-post")
            pax.tick_params(labelsize=6)
            pax.grid(True, alpha=0.3)
            self.param_artists.append((key, points, best))
        for pax in self.param_axes[:-1]:
            pax.tick_params(labelbottom=False)
        for axes in (ax, *self.param_axes):
            few_ticks(axes)
        self.label_axes(view)
        self.title = fig.suptitle("", fontsize=TITLE_FONT)
        self.adjust()
        for artist in self.dynamic:
            artist.set_animated(True)
        self.limits = {}
        self.background = None
        self.layout = tuple(keys)

    def label_axes(self, view: View) -> None:
        """Axis label and panel titles, with their units."""
        label = with_unit("loss", view.loss_unit)
        if self.ax.get_ylabel() != label:
            self.ax.set_ylabel(label, fontsize=8)
            self.dirty.add(self.ax)
        units = flat_units(view.parameter_units)
        for (key, _points, _best), pax in zip(self.param_artists, self.param_axes):
            title = with_unit(key, units.get(key))
            if pax.get_title() != title:
                pax.set_title(title, fontsize=8, pad=2)
                self.dirty.add(pax)

    def adjust(self) -> None:
        """Leave room above the loss axes for the title and the legend rows."""
        height = self.figure.get_figheight() * 72.0  # points
        reserved = TITLE_FONT * 2.0 + self.legend_rows * LEGEND_FONT * 1.45 + 9.0
        self.figure.subplots_adjust(
            left=0.1, right=0.98, bottom=0.14, top=1.0 - reserved / height, wspace=0.28, hspace=0.5
        )

    @property
    def dynamic(self) -> list:
        """The artists drawn in every frame, over the cached background."""
        artists = [self.points, self.best_line, self.validation_line, self.faults]
        artists += [*self.term_lines, self.title]
        for _key, points, best in self.param_artists:
            artists += [points, best]
        return artists

    # -- legend -------------------------------------------------------------------------------

    def _legend_layout(
        self, n_terms: int, view: View, validation: bool = False
    ) -> tuple[list[str], int, int]:
        """(term labels to show, hidden terms, columns) that fit ``max_legend_rows`` rows."""
        from matplotlib.font_manager import FontProperties

        renderer = self.figure.canvas.get_renderer()
        prop = FontProperties(size=LEGEND_FONT)
        font_px = LEGEND_FONT * self.figure.dpi / 72.0
        available = self.ax.get_position().width * self.figure.bbox.width

        def width(label: str) -> float:
            text = renderer.get_text_width_height_descent(label, prop, ismath=False)[0]
            return (1.6 + 0.5) * font_px + text  # handle, pad, text

        base = [width("evaluation"), width("best so far")] + [width("validation")] * validation
        rows = max(1, view.max_legend_rows)
        shown = min(n_terms, view.max_terms)
        while True:
            labels = [view.term_label(i) for i in range(shown)]
            hidden = n_terms - shown
            widths = base + [width(label) for label in labels]
            if hidden:
                widths.append(width(f"+ {hidden} more terms"))
            column = max(widths)
            columns = max(1, int((available + 1.2 * font_px) // (column + 1.2 * font_px)))
            if math.ceil(len(widths) / columns) <= rows or shown == 0:
                return labels, hidden, min(columns, len(widths))
            shown -= 1

    def update_legend(self, n_terms: int, key: tuple, view: View, validation: bool = False) -> None:
        """Make the term lines and the legend above the loss axes when ``key`` changed."""
        if key == self.legend_key:
            return
        from matplotlib.lines import Line2D

        labels, hidden, columns = self._legend_layout(n_terms, view, validation)
        for line in self.term_lines:
            line.remove()
        self.term_lines = []
        for number, label in enumerate(labels):
            (line,) = self.ax.plot(
                [], [], "-", lw=1.0, alpha=0.8, color=f"C{(number + 4) % 10}",
                drawstyle="steps-post", label=label,
            )  # fmt: skip
            line.set_animated(True)
            self.term_lines.append(line)
        handles: list[Any] = [self.points, self.best_line, *self.term_lines]
        if validation:
            handles.insert(2, self.validation_line)
        if hidden:
            handles.append(
                Line2D([], [], linestyle="none", label=f"+ {hidden} more term{'s' * (hidden > 1)}")
            )
        if self.legend is not None:
            self.legend.remove()
        # A figure legend above the loss axes: off the data, and not redrawn with the axes.
        self.legend = self.figure.legend(
            handles=handles, loc="lower left", bbox_to_anchor=(0.0, 1.0),
            bbox_transform=self.ax.transAxes, ncols=columns, fontsize=LEGEND_FONT,
            frameon=False,
            borderaxespad=1.0,  # clear of the top tick label, so each redraws alone
            borderpad=0.2, handlelength=1.6, handletextpad=0.5, columnspacing=1.2,
            labelspacing=0.3,
        )  # fmt: skip
        rows = math.ceil(len(handles) / columns)
        if rows != self.legend_rows:
            self.legend_rows = rows
            self.adjust()
            self.background = None
        self.legend_key = key
        self.dirty.add("legend")

    # -- limits -------------------------------------------------------------------------------

    def set_limits(self, ax: Any, name: str, scale: str, lo: float, hi: float) -> None:
        """Change an axis' limits only when the data leave them or fill a quarter of them, so
        that most frames reuse the cached background."""
        current = self.limits.get(name)
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
            few_ticks(ax)
        ax.set_ylim(*new)
        self.limits[name] = (scale, new)
        self.dirty.add(ax)

    def _set_x_limits(self, n: int, expected: int | None) -> None:
        # The expected count, else growing in 1-2-5 steps (each step redraws the axes).
        x_max = expected if expected and n <= expected else nice_ceiling(max(n, 50))
        if self.limits.get("evaluations") != x_max:
            for ax in (self.ax, *self.param_axes):
                ax.set_xlim(0, x_max)
                self.dirty.add(ax)
            self.limits["evaluations"] = x_max

    def _set_loss_limits(self, series: PlotSeries, term_values: list[np.ndarray]) -> None:
        lo, hi = series.loss_range.lo, series.loss_range.hi
        if term_values:
            values = np.concatenate(term_values)
            finite = values[np.isfinite(values)]
            if finite.size:
                lo, hi = min(lo, float(finite.min())), max(hi, float(finite.max()))
        if lo <= hi:
            # Log once the losses span three decades; back to linear below two (hysteresis).
            was_log = self.limits.get("loss", ("linear",))[0] == "log"
            scale = "log" if lo > 0 and hi / lo > (1e2 if was_log else 1e3) else "linear"
            self.set_limits(self.ax, "loss", scale, lo, hi)

    # -- data ---------------------------------------------------------------------------------

    def show(self, series: PlotSeries, view: View, title: str) -> tuple[int, int, int]:
        """Bring the artists up to date with ``series``.

        Returns (evaluations shown, loss points drawn, stride of the thinning).
        """
        keys = list(series.param_keys or ())
        if tuple(keys) != self.layout:
            self.build(keys, view)
        n_terms = max(series.n_terms, view.n_term_labels) if view.show_terms else 0
        validation = bool(series.validation[0].size)
        key = (n_terms, series.meta_labels is not None, validation)
        self.update_legend(n_terms, key, view, validation)
        n = series.loss.size
        budget = max(10, view.budget)
        best_all = series.best_at.values
        best_pick = every(best_all.size, math.ceil(best_all.size / budget))
        best_at = best_all[best_pick]  # 0-based, thinned
        indices, stride = thin_indices(n, budget, keep=best_at)
        x = indices + 1.0
        self.points.set_data(x, series.loss.values[indices])
        line_x = np.append(best_at + 1.0, float(n)) if best_at.size else best_at.astype(float)
        line_y = series.loss.values[best_at]
        self.best_line.set_data(line_x, np.append(line_y, line_y[-1:]))
        self.validation_line.set_data(*series.validation)
        faults = series.fault_at.values + 1.0
        self.faults.set_data(faults, np.full(faults.size, 0.97))
        shown = []
        for line, column in zip(self.term_lines, series.terms):  # the terms at the best
            values = column.values[best_at]
            values = np.append(values, values[-1:])
            line.set_data(line_x, values)
            shown.append(values)
        self._set_x_limits(n, view.expected)
        self._set_loss_limits(series, [*shown, series.validation[1]])
        for (key, points, best), pax in zip(self.param_artists, self.param_axes):
            values = series.params[key].values
            points.set_data(x, values[indices])
            best_values = values[best_at]
            best.set_data(line_x, np.append(best_values, best_values[-1:]))
            if key in self.bounds:  # fixed limits: the bounds
                self.set_limits(pax, f"parameter {key}", "linear", *self.bounds[key])
            elif not series.param_ranges[key].empty:
                span = series.param_ranges[key]
                self.set_limits(pax, f"parameter {key}", "linear", span.lo, span.hi)
        self.title.set_text(title)
        return n, int(indices.size), stride

    # -- frames -------------------------------------------------------------------------------

    def render(self) -> bool:
        """Render the artists into the Agg buffer; returns whether the axes were redrawn."""
        canvas = self.figure.canvas
        size = (canvas.get_width_height(physical=True), self.figure.dpi)
        redrawn = True
        if self.background is None or self.background_size != size:
            self._full_draw(canvas)
            self.background_size = size
        elif self.dirty:
            if not self._redraw_axes(canvas):  # they overlap others: draw everything
                self._full_draw(canvas)
        else:
            canvas.restore_region(self.background)
            redrawn = False
        self.dirty.clear()
        for artist in self.dynamic:
            if artist.axes is not None:
                artist.axes.draw_artist(artist)
            else:
                self.figure.draw_artist(artist)
        return redrawn

    def _full_draw(self, canvas: Any) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        FigureCanvasAgg.draw(canvas)  # skips the animated (data) artists
        self.background = canvas.copy_from_bbox(self.figure.bbox)
        renderer = canvas.get_renderer()
        self.boxes = {ax: ax.get_tightbbox(renderer) for ax in self.figure.axes}
        if self.legend is not None:
            self.boxes["legend"] = self.legend.get_window_extent(renderer)
        self.blank = None

    def _redraw_axes(self, canvas: Any) -> bool:
        """Redraw only the changed axes (and legend) over the cached background.

        Their old area is blanked and they are drawn again. Returns False, and the caller
        draws everything, when that area or the new one overlaps another part of the figure.
        """
        renderer = canvas.get_renderer()
        parts = list(self.dirty)
        others = {k: box for k, box in self.boxes.items() if k not in self.dirty}

        def clear_of_others(box: Any) -> bool:
            return not any(box.padded(2).overlaps(other) for other in others.values())

        old = [self.boxes.get(part) for part in parts]
        if any(box is None or not clear_of_others(box) for box in old):
            return False
        if self.blank is None:
            renderer.clear()
            self.figure.patch.draw(renderer)
            self.blank = canvas.copy_from_bbox(self.figure.bbox)
        canvas.restore_region(self.background)
        height = int(renderer.height)
        for box in old:
            # Buffer regions count rows from the top of the figure.
            x0, y0, x1, y1 = box.padded(2).extents
            left, right = max(0, math.floor(x0)), math.ceil(x1) + 1
            top, bottom = max(0, height - math.ceil(y1) - 1), height - math.floor(y0)
            canvas.restore_region(self.blank, bbox=(left, top, right, bottom), xy=(0, 0))
        for part in parts:
            artist = self.legend if part == "legend" else part
            artist.draw(renderer)
            new = (
                artist.get_window_extent(renderer)
                if part == "legend"
                else artist.get_tightbbox(renderer)
            )
            if not clear_of_others(new):  # it grew into another part: draw everything
                return False
            self.boxes[part] = new
        self.background = canvas.copy_from_bbox(self.figure.bbox)
        return True

    def save(self, target: Any, dpi: float) -> None:
        """Save the figure as PNG (figure-level animated artists are not saved otherwise)."""
        self.title.set_animated(False)
        try:
            self.figure.savefig(target, format="png", dpi=dpi)
        finally:
            self.title.set_animated(True)
