"""Fitter.profile(): the loss along each parameter through the best point."""

from __future__ import annotations

import numpy as np
import pytest

from chemfit.fitting.fitter import Fitter
from tests.helpers.diagnostics_objectives import SlowQuadratic


def quadratic(parameters):
    x, y = parameters["p"]["x"], parameters["p"]["y"]
    return 3.0 * (x - 1.0) ** 2 + 0.5 * (y + 2.0) ** 2 + 0.25


@pytest.mark.timeout(120)
def test_profiles_of_a_quadratic_are_exact_at_the_points(executor):
    fitter = Fitter(SlowQuadratic(0.0), {"a": 0.3, "b": 0.7})
    fitter.fit_scipy()
    curves = fitter.profile(points=11, executor=executor)
    assert set(curves) == {"a", "b"}
    best = fitter.result.best_parameters
    for name, frame in curves.items():
        assert list(frame.columns) == ["value", "loss"] and len(frame) == 11
        other = "b" if name == "a" else "a"
        centre = 0.0 if name == "a" else 1.0
        offset = (best[other] - (1.0 if other == "b" else 0.0)) ** 2
        expected = (frame["value"] - centre) ** 2 + offset
        np.testing.assert_allclose(frame["loss"], expected, rtol=0, atol=1e-14)
        assert best[name] in frame["value"].tolist()
        assert frame.attrs["best"] == best[name]


@pytest.mark.timeout(60)
def test_nested_names_ranges_and_bounds():
    fitter = Fitter(
        quadratic, {"p": {"x": 0.0, "y": 0.0}}, bounds={"p": {"x": (0.0, 1.05), "y": (-5, 5)}}
    )
    fitter.fit_scipy()
    curves = fitter.profile("p.x", points=9)
    assert list(curves) == ["p.x"]
    values = curves["p.x"]["value"]
    assert values.max() <= 1.05 and len(values) == 9  # clipped by the upper bound
    curve = fitter.profile(["p.y"], points=5, ranges={"p.y": (-4.0, 0.0)})["p.y"]
    np.testing.assert_allclose(curve["value"], [-4, -3, -2, -1, 0])
    x = fitter.result.best_parameters["p"]["x"]
    np.testing.assert_allclose(
        curve["loss"], 3 * (x - 1) ** 2 + 0.5 * (curve["value"] + 2) ** 2 + 0.25, atol=1e-14
    )


def test_unknown_parameters_are_named():
    fitter = Fitter(quadratic, {"p": {"x": 0.0, "y": 0.0}})
    fitter.fit_scipy()
    with pytest.raises(ValueError, match=r"unknown parameters \['x'\].*\['p.x', 'p.y'\]"):
        fitter.profile("x")
    with pytest.raises(ValueError, match="points must be an int >= 1"):
        fitter.profile(points=0)
