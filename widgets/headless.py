"""A stand-in for the browser side of an ipympl canvas, for tests and benchmarks.

In JupyterLab, ipympl's front end answers each ``draw`` request of the kernel by asking for the
image. Run headless (nbclient, pytest, a benchmark), nobody answers, so a live plot on an ipympl
canvas would never paint. :class:`HeadlessFrontEnd` answers in a thread, as the browser would.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

__all__ = ["HeadlessFrontEnd"]


class HeadlessFrontEnd:
    """Answers an ipympl canvas's draw requests in a thread, as a browser does.

    Parameters
    ----------
    canvas
        An ``ipympl.backend_nbagg.Canvas`` (``LivePlot(backend="ipympl")._canvas``).

    Examples
    --------
    >>> from chemfit_widgets import LivePlot
    >>> plot = LivePlot(backend="ipympl")
    >>> front_end = HeadlessFrontEnd(plot._canvas)
    >>> front_end.drain()  # every frame asked for so far has been painted
    >>> front_end.close()
    >>> plot.close()
    """

    def __init__(self, canvas: Any) -> None:
        self.canvas = canvas
        self.requests: queue.Queue = queue.Queue()
        original = canvas.send_json

        def send_json(content: dict) -> None:
            if content.get("type") == "draw":
                self.requests.put(True)
            else:
                original(content)

        canvas.send_json = send_json
        canvas._handle_message(canvas, {"type": "initialized"}, [])
        self.thread = threading.Thread(target=self._serve, daemon=True, name="ipympl-front-end")
        self.thread.start()

    def _serve(self) -> None:
        while self.requests.get() is not None:
            try:
                self.canvas.manager.handle_json({"type": "draw"})
            finally:
                self.requests.task_done()
        self.requests.task_done()

    def drain(self) -> None:
        """Wait until every draw request sent so far has been answered."""
        self.requests.join()

    def close(self, timeout: float = 30) -> None:
        """Stop answering and end the thread."""
        self.requests.put(None)
        self.thread.join(timeout=timeout)
