"""Diagnostics of an objective defined in ``__main__`` (as in a notebook) on worker processes.

The script runs as ``__main__`` in a subprocess: its objective, terms and loss exist only
there, so a process pool or loky worker gets them by value from chemfit's submission.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]

SCRIPT = """
import numpy as np
from concurrent.futures import ProcessPoolExecutor
import loky

from chemfit import CombinedObjectiveFunction, Fitter

rng = np.random.default_rng(0)
x = np.linspace(0, 3, 12)
y = 2.0 - 0.5 * x + rng.normal(0, 0.2, x.size)


class Residual:  # a class of __main__
    def __init__(self, xi, yi):
        self.xi, self.yi = xi, yi

    def __call__(self, p):
        return (self.yi - line(p, self.xi)) ** 2


def line(p, xi):  # a function of __main__ the terms call
    return p["a"] + p["b"] * xi


terms = [Residual(xi, yi) for xi, yi in zip(x, y)]
terms[0] = lambda p, xi=x[0], yi=y[0]: (yi - line(p, xi)) ** 2  # and a lambda
fitter = Fitter(CombinedObjectiveFunction(terms), {"a": 0.0, "b": 0.0})
fitter.fit_scipy()

serial_cov = fitter.covariance()
serial_profile = fitter.profile(points=5)
serial_boot = fitter.bootstrap(4, budget=60, seed=1)
with ProcessPoolExecutor(2) as pool:
    executors = {"process-pool": pool, "loky": loky.get_reusable_executor(max_workers=2)}
    for name, executor in executors.items():
        cov = fitter.covariance(executor=executor)
        np.testing.assert_allclose(cov.matrix, serial_cov.matrix, rtol=1e-9)
        curves = fitter.profile(points=5, executor=executor)
        for key in curves:
            np.testing.assert_allclose(curves[key], serial_profile[key], rtol=1e-12)
        boot = fitter.bootstrap(4, executor=executor, budget=60, seed=1)
        np.testing.assert_allclose(boot.parameters, serial_boot.parameters, rtol=1e-9)
        print(name, "OK", flush=True)
    executors["loky"].shutdown(wait=True, kill_workers=True)
"""


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_main_defined_objective_on_a_process_pool_and_loky(tmp_path):
    script = tmp_path / "diagnose.py"
    script.write_text(textwrap.dedent(SCRIPT))
    proc = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=200,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["process-pool", "OK", "loky", "OK"], proc.stdout
