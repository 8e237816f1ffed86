"""The plots of how good a fit is, drawn from a real fit's diagnostics."""

from __future__ import annotations

import pytest

pytest.importorskip("ipywidgets")
matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from chemfit.core.combined import CombinedObjectiveFunction  # noqa: E402
from chemfit.core.wrapping import WrappedQuantityComputer  # noqa: E402
from chemfit.fitting.fitter import Fitter  # noqa: E402
from chemfit_widgets import plot_correlation, plot_parity, plot_profiles  # noqa: E402


def _line(parameters, x):
    return {"y": parameters["a"] + parameters["b"] * x}


def _squared(quantities, y_ref):
    return (quantities["y"] - y_ref) ** 2


@pytest.fixture(scope="module")
def fitter():
    computer = WrappedQuantityComputer(_line)
    data = [(0.0, 1.1), (1.0, 1.9), (2.0, 3.2), (3.0, 3.9), (4.0, 5.1)]
    cob = CombinedObjectiveFunction(
        [computer.bind(x=x).with_loss(_squared, y_ref=y) for x, y in data]
    )
    fitter = Fitter(cob, {"a": 0.0, "b": 0.5})
    fitter.fit_scipy()
    return fitter


@pytest.mark.timeout(60)
def test_correlation_profiles_and_parity(fitter):
    cov = fitter.covariance()
    figure = plot_correlation(cov)
    assert len(figure.axes[0].texts) == 4
    plt.close(figure)
    boot = fitter.bootstrap(5, budget=60, seed=0)
    plt.close(plot_correlation(boot))
    figure = plot_profiles(fitter.profile(points=7), covariance=cov)
    assert [ax.get_xlabel() for ax in figure.axes[:2]] == ["a", "b"]
    assert len(figure.axes[0].lines) == 3  # loss, best value, quadratic model
    plt.close(figure)
    figure = plot_parity(fitter, "y")
    ax = figure.axes[0]
    assert len(ax.lines) == 6  # one per term and y = x
    assert ax.lines[0].get_xdata().tolist() == [1.1]
    plt.close(figure)
    with pytest.raises(ValueError, match="no term has both"):
        plot_parity(fitter, "energy")
