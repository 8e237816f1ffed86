"""When the live plot draws: the first evaluation at once, then paced by what frames cost.

A frame comes every ``cost / max_cost`` seconds (``cost``: what the recent frames took), never
more often than ``min_interval`` and never less often than ``max_interval``, so drawing takes
about ``max_cost`` of the fit's time. The cost of a frame is kept bounded by drawing fewer
points (:attr:`Cadence.point_budget`), never by waiting longer. A record that arrives while
a frame is not due schedules one (a timer), so the newest data are drawn even when records stop.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import NamedTuple

__all__ = ["Cadence", "Frame", "clocks"]

logger = logging.getLogger(__name__)

PENDING_TIMEOUT = 1.0  # ask an ipympl front end again when it did not answer in this time
MIN_POINTS = 500  # the adaptive point budget never goes below this
KEPT_FRAMES = 1000  # frames kept in Cadence.frames


class Frame(NamedTuple):
    """One drawn frame (see :attr:`LivePlot.frames`)."""

    at: float  #: ``time.perf_counter()`` when the frame was done
    records: int  #: evaluations it showed
    points: int  #: loss points it drew (fewer than ``records`` when thinning)
    seconds: float  #: what it cost (as booked by the throttle)
    axes_redrawn: bool  #: whether axes, ticks or legend were redrawn (not just the data)


def clocks() -> tuple[float, float]:
    """(CPU time of this thread, wall time) now.

    Examples
    --------
    >>> cpu, wall = clocks()
    >>> cpu >= 0 and wall > 0
    True
    """
    return time.thread_time(), time.perf_counter()


class Cadence:
    """Decides when frames are drawn and books what they cost.

    Parameters
    ----------
    request_frame : callable
        Draws a frame now (PNG) or asks the front end for one (ipympl); called without locks.
    has_news : callable
        Whether records arrived that the last frame did not show.
    wall_clock : bool
        Book a frame's wall time (drawn in the fit's thread) instead of its CPU time (drawn in
        the kernel's main thread while the fit goes on).

    Examples
    --------
    >>> frames = []
    >>> cadence = Cadence(lambda: frames.append(1), lambda: False, wall_clock=True)
    >>> cadence.record_arrived()
    >>> cadence.maybe_redraw()  # the first evaluation is drawn at once
    >>> cadence.account(clocks(), 1, 1, True)
    >>> len(frames), cadence.draw_count, cadence.first_frame_latency < 1.0
    (1, 1, True)
    >>> cadence.close()
    """

    def __init__(
        self, request_frame: Callable[[], None], has_news: Callable[[], bool], wall_clock: bool
    ) -> None:
        self.lock = threading.Lock()  # short: the bookkeeping below
        self.request_frame = request_frame
        self.has_news = has_news
        self.wall_clock = wall_clock
        self.min_interval, self.max_interval, self.max_cost, self.max_points = 0.3, 2.0, 0.03, 1500
        self.closed = False
        self.timer: threading.Timer | None = None
        self.timer_due = math.inf
        self.restart()

    def restart(self) -> None:
        """Start over (a new fit): the cost clock, the counters and the first-frame latency."""
        self.last_request = -math.inf
        self.cost: float | None = None  # smoothed cost of recent frames
        self.lag: float | None = None  # smoothed time from a frame's request to its end
        self.last_cost: float | None = None
        self.point_budget = self.max_points
        self.pending = False
        self.uncounted = False  # the next frame is not part of a fit's drawing
        self.first_record_at: float | None = None
        self.data_requested = False
        self.first_frame_latency: float | None = None
        self.frames: deque[Frame] = deque(maxlen=KEPT_FRAMES)
        self.draw_count = 0
        self.draw_seconds = 0.0
        self.draw_wall_seconds = 0.0

    @property
    def budget(self) -> int:
        """Points a frame may draw per series now."""
        return max(10, min(self.point_budget, self.max_points))

    def record_arrived(self) -> None:
        """Note the first record's time (for the first frame and its latency)."""
        if self.first_record_at is None:
            self.first_record_at = time.perf_counter()

    def asked(self) -> None:
        """A frame was asked for outside the cadence (redraw, finish)."""
        with self.lock:
            self.last_request = time.perf_counter()
            self.pending = True

    def interval(self) -> float:
        """Seconds between frames: what keeps drawing at ``max_cost``, within the limits."""
        cost = self.cost or 0.0
        # Requested this long after the last request, the next frame is done at most
        # max_interval after the last one (lag: from a request to its frame being done).
        lag = min(self.lag or 0.0, 0.5 * self.max_interval)  # a front end shown late
        longest = self.max_interval - max(cost, lag) - 0.05
        return max(self.min_interval, min(longest, cost / self.max_cost))

    def maybe_redraw(self) -> None:
        """Draw now if a frame is due, else make sure one comes when it is."""
        if self.closed:
            return
        now = time.perf_counter()
        with self.lock:
            since = now - self.last_request
            if self.pending and since < PENDING_TIMEOUT:
                # The front end has not answered yet; its frame will show the newest data.
                self.schedule(PENDING_TIMEOUT - since)
                return
            first = not self.data_requested and self.first_record_at is not None
            wait = 0.0 if first else self.interval() - since
            if wait > 0:
                self.schedule(wait)
                return
            self.last_request = now
            self.pending = True
            self.data_requested = self.first_record_at is not None
        try:
            self.request_frame()
        except Exception:  # a plot must never break the fit
            logger.warning("drawing the live plot failed", exc_info=True)
            with self.lock:
                self.pending = False

    def schedule(self, delay: float) -> None:
        """Draw the latest data later, even if no new record arrives (call with the lock).

        One timer at a time: the earlier of the one waiting and the one asked for.
        """
        due = time.perf_counter() + delay
        if self.timer is not None and self.timer.is_alive():
            if self.timer_due <= due:
                return
            self.timer.cancel()
        self.timer_due = due
        self.timer = threading.Timer(delay + 0.01, self._on_timer)
        self.timer.daemon = True
        self.timer.start()

    def _on_timer(self) -> None:
        with self.lock:
            if self.timer is threading.current_thread():
                self.timer = None  # this one is done: maybe_redraw may schedule the next
        if self.has_news():
            self.maybe_redraw()

    def cancel(self) -> None:
        """Cancel a scheduled frame."""
        with self.lock:
            timer, self.timer = self.timer, None
        if timer is not None:
            timer.cancel()

    def close(self) -> None:
        """No more frames."""
        self.closed = True
        self.cancel()

    def account(self, start: tuple[float, float], n: int, points: int, redrawn: bool) -> None:
        """Book a frame of ``n`` records and ``points`` points that began at ``start``.

        A PNG frame is drawn in the thread that fed the plot (usually the fit's), so its wall
        time is what the fit loses. An ipympl frame is drawn in the kernel's main thread while
        the fit goes on; there the frame's CPU time counts, which is what it takes from the fit
        through the GIL (its wall time is longer: it waits for the GIL meanwhile).
        """
        cpu_start, wall_start = start
        now = time.perf_counter()
        wall = now - wall_start
        seconds = wall if self.wall_clock else time.thread_time() - cpu_start
        with self.lock:
            self.last_cost = seconds
            self.cost = seconds if self.cost is None else 0.5 * (self.cost + seconds)
            if self.pending:
                lag = now - self.last_request
                self.lag = lag if self.lag is None else 0.5 * (self.lag + lag)
            self.pending = False
            self.frames.append(Frame(now, n, points, seconds, redrawn))
            if n and self.first_frame_latency is None and self.first_record_at is not None:
                self.first_frame_latency = now - self.first_record_at
            if points > MIN_POINTS and not redrawn:
                self._adapt_budget(seconds, points)
            if not n and self.first_record_at is not None and not self.closed:
                # Asked for before the first evaluation came (e.g. reset's empty frame): the
                # first evaluation is drawn right after it, not after a throttle's wait.
                self.data_requested = False
                self.schedule(0.0)
            if self.uncounted:  # the empty frame of reset(): not part of the fit's drawing
                self.uncounted = False
                return
            self.draw_count += 1
            self.draw_seconds += seconds
            self.draw_wall_seconds += wall

    def _adapt_budget(self, seconds: float, points: int) -> None:
        """Fewer points when a frame of ``points`` costs more than ``max_cost`` of
        ``max_interval``; more again when frames are cheap."""
        target = self.max_cost * max(self.max_interval, self.min_interval)
        budget = self.point_budget
        if seconds > target:
            budget = int(min(budget, points) * max(0.3, 0.8 * target / seconds))
        elif seconds < target / 4:
            budget = int(budget * 1.25) + 1
        self.point_budget = max(MIN_POINTS, min(self.max_points, budget))
