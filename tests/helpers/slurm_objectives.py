"""Objectives for the Slurm tests, importable on the engines and workers (the repository is on
their ``PYTHONPATH`` through the job's exported environment)."""

from __future__ import annotations

import time


class SlowTerm:
    """``(x - 0.3)**2`` after sleeping ``seconds``: a fit that is still running when its job
    is cancelled."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __call__(self, params: dict, ctx=None) -> float:
        time.sleep(self.seconds)
        return (params["x"] - 0.3) ** 2
