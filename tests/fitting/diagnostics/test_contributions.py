"""Fitter.contributions(): one row per term at the best parameters."""

from __future__ import annotations

import math

import pytest

from chemfit.core.combined import CombinedObjectiveFunction
from chemfit.fitting.fitter import Fitter
from chemfit.wrap_funcs import WrappedQuantityComputer
from tests.helpers.diagnostics_objectives import linear_problem


def _model(parameters, temperature):
    return {"B": parameters["b"] / temperature, "T": temperature, "curve": [1.0, 2.0]}


def _squared(quantities, ref):
    return (quantities["B"] - ref) ** 2


@pytest.mark.timeout(60)
def test_rows_weights_losses_shares_and_quantities():
    computer = WrappedQuantityComputer(_model)
    terms = [
        computer.bind(temperature=t).with_loss(_squared, ref=ref)
        for t, ref in [(100.0, 1.0), (200.0, 0.4)]
    ]
    fitter = Fitter(CombinedObjectiveFunction(terms, weights=[1.0, 4.0]), {"b": 50.0})
    fitter.fit_scipy()
    table = fitter.contributions()
    assert list(table.columns) == [
        "name", "weight", "loss", "weighted_loss", "share", "quantities", "loss_arguments",
        "B", "T",
    ]  # fmt: skip
    assert table["name"].tolist() == ["temperature=100", "temperature=200"]
    b = fitter.result.best_parameters["b"]
    expected = [(b / 100 - 1.0) ** 2, (b / 200 - 0.4) ** 2]
    assert table["loss"].tolist() == pytest.approx(expected)
    assert table["weighted_loss"].tolist() == pytest.approx([expected[0], 4 * expected[1]])
    assert table["weighted_loss"].sum() == pytest.approx(fitter.result.best_loss)
    assert table["share"].sum() == pytest.approx(1.0)
    assert table["T"].tolist() == [100.0, 200.0]
    assert table["quantities"][0]["curve"] == [1.0, 2.0]
    assert table["loss_arguments"].tolist() == [{"ref": 1.0}, {"ref": 0.4}]


@pytest.mark.timeout(60)
def test_tags_name_the_terms_and_skipped_terms_are_nan():
    from chemfit.combined_objective_function import skip_exception_handler
    from chemfit.wrap_funcs import WrappedObjectiveFunctor

    def tagged(parameters, ctx):
        ctx.meta["tag"] = "eos"
        return parameters["x"] ** 2 + 1.0

    def failing(parameters):
        raise RuntimeError("no minimum")

    cob = CombinedObjectiveFunction(
        [WrappedObjectiveFunctor(tagged, pass_ctx=True), failing],
        exception_handler=skip_exception_handler,
    )
    fitter = Fitter(cob, {"x": 1.0})
    fitter.fit_scipy()
    table = fitter.contributions()
    assert table["name"].tolist() == ["eos", "failing"]  # a tag written while it ran
    assert math.isnan(table["loss"][1]) and math.isnan(table["share"][1])
    assert table["share"][0] == 1.0


@pytest.mark.timeout(60)
def test_a_plain_objective_gives_one_row():
    fitter = Fitter(lambda p: (p["x"] - 2.0) ** 2 + 1.0, {"x": 0.0})
    fitter.fit_scipy()
    table = fitter.contributions()
    assert len(table) == 1
    assert table.loc[0, "loss"] == pytest.approx(1.0)
    assert table.loc[0, "share"] == 1.0 and table.loc[0, "weight"] == 1.0


@pytest.mark.timeout(60)
def test_linear_problem_terms_sum_to_the_loss():
    problem = linear_problem(n=12)
    fitter = problem.fitted()
    table = fitter.contributions()
    assert len(table) == 12
    assert table["weighted_loss"].sum() == pytest.approx(fitter.result.best_loss, rel=1e-9)


def test_before_a_fit_the_error_says_what_to_do():
    fitter = Fitter(lambda p: p["x"] ** 2, {"x": 0.0})
    with pytest.raises(RuntimeError, match=r"contributions\(\) needs a finished fit"):
        fitter.contributions()
