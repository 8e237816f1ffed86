"""CMA: cma's round-off "orphanated injected solution" warnings become one INFO line per fit."""

from __future__ import annotations

import logging
import warnings

import pytest

from chemfit.fitter import Fitter


def _quadratic(p):
    return (p["a"] - 1.3) ** 2 + 3 * (p["b"] + 0.7) ** 2 + 0.5 * (p["c"] - 0.2) ** 2


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["batch", "async"])
def test_cma_injection_warnings_become_one_info_line(mode, caplog):
    fitter = Fitter(
        _quadratic, {"a": 0.0, "b": 0.0, "c": 0.0}, bounds={k: (-5.0, 5.0) for k in "abc"}
    )
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        fitter.fit_nevergrad(
            200, optimizer_str="CMA", num_workers=2, mode=mode, seed=0, progress=False
        )
    assert not [w for w in caught if "orphanated injected solution" in str(w.message)]
    lines = [r for r in caplog.records if "orphaned injected solution" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO
    assert fitter.result.best_loss < 1e-6


@pytest.mark.timeout(120)
def test_other_warnings_still_shown_once_per_location():
    def objective(p):
        warnings.warn("objective warns on every call", RuntimeWarning, stacklevel=1)
        return _quadratic(p)

    fitter = Fitter(
        objective, {"a": 0.0, "b": 0.0, "c": 0.0}, bounds={k: (-5.0, 5.0) for k in "abc"}
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # record keeps only what would be shown
        fitter.fit_nevergrad(100, optimizer_str="CMA", num_workers=2, seed=0, progress=False)
    shown = [w for w in caught if "objective warns" in str(w.message)]
    assert 1 <= len(shown) <= 2  # not once per tell
    assert not [w for w in caught if "orphanated injected solution" in str(w.message)]
