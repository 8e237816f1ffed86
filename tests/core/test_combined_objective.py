"""chemfit.combined_objective_function: terms, weights, reductions, handlers, meta data."""

from __future__ import annotations

import logging
import math
import pickle

import numpy as np
import pytest

import chemfit.combined_objective_function as cof
import chemfit.core.combined as combined
from chemfit.abstract_objective_function import EvaluateContext, ObjectiveFunctor
from chemfit.combined_objective_function import (
    Aggregator,
    CombinedObjectiveFunction,
    ExceptionHandler,
    Reducer,
    WrappedReducer,
    mean_reducer,
    nan_exception_handler,
    raising_exception_handler,
    root_mean_reducer,
    skip_exception_handler,
    sum_reducer,
    transform_generic_callables,
)
from chemfit.wrap_funcs import (
    WrappedObjectiveFunctor,
    WrappedQuantityComputer,
    to_objective_functor,
)
from tests.helpers import core_objectives


def const(value):
    return lambda parameters: value


def failing(exc):
    def term(parameters):
        raise exc

    return term


def computer_term(value):
    """A quantity-computer objective whose child gets quantities {"v": value}."""
    return WrappedQuantityComputer(lambda p: {"v": value}).with_loss(lambda q: q["v"])


def test_shim_exports_every_public_name():
    expected = {
        "Aggregator",
        "CombinedObjectiveFunction",
        "ExceptionHandler",
        "Reducer",
        "WrappedReducer",
        "mean_reducer",
        "nan_exception_handler",
        "raising_exception_handler",
        "root_mean_reducer",
        "skip_exception_handler",
        "sum_reducer",
        "transform_generic_callables",
    }
    assert set(cof.__all__) == expected
    assert set(combined.__all__) == expected
    for name in expected:
        assert getattr(cof, name) is getattr(combined, name)
    assert Reducer is not None and Aggregator is not None and ExceptionHandler is not None


# -- reducers and handlers --------------------------------------------------------------------


def test_reducers():
    assert sum_reducer([1.0, 2.0, 3.5]) == 6.5
    assert sum_reducer([]) == 0.0
    assert mean_reducer([1.0, 2.0]) == 1.5
    assert root_mean_reducer([1.0, 4.0, 4.0]) == math.sqrt(3.0)
    assert math.isnan(mean_reducer([]))
    assert math.isnan(root_mean_reducer([]))
    assert isinstance(sum_reducer([1, 2]), float)


def test_exception_handlers(caplog):
    error = RuntimeError("boom")
    with pytest.raises(RuntimeError) as info:
        raising_exception_handler(error, EvaluateContext(), 0)
    assert info.value is error
    with caplog.at_level(logging.WARNING, logger="chemfit.core.combined"):
        assert math.isnan(nan_exception_handler(error, EvaluateContext(), 4))
        assert skip_exception_handler(error, EvaluateContext(), 5) is None
    assert "term 4" in caplog.text and "term 5" in caplog.text and "boom" in caplog.text


def test_wrapped_reducer():
    wrapped = WrappedReducer(max)
    assert wrapped.to_reducer() is max
    assert wrapped([1.0, 3.0], [None, None], EvaluateContext()) == 3.0
    assert isinstance(WrappedReducer(np.sum)([1.0, 2.0], [], EvaluateContext()), float)
    assert isinstance(wrapped, Aggregator)
    assert pickle.loads(pickle.dumps(wrapped)).to_reducer() is max
    with pytest.raises(TypeError, match="reducer must be callable"):
        WrappedReducer(1.0)


def test_transform_generic_callables():
    functor = WrappedObjectiveFunctor(core_objectives.square)
    result = transform_generic_callables([functor, core_objectives.square])
    assert result[0] is functor
    assert isinstance(result[1], WrappedObjectiveFunctor)
    assert result[1].func is core_objectives.square
    assert all(isinstance(t, ObjectiveFunctor) for t in result)
    with pytest.raises(TypeError, match="objective function 1 is not callable"):
        transform_generic_callables([core_objectives.square, 3.0])


# -- evaluation and meta ----------------------------------------------------------------------


def test_call_sets_loss_parameters_and_meta():
    cob = CombinedObjectiveFunction([core_objectives.square, const(1.0)], weights=[2.0, 3.0])
    ctx = EvaluateContext()
    assert cob({"x": 2.0}, ctx) == 11.0
    assert ctx.loss == 11.0
    assert ctx.parameters == {"x": 2.0}
    assert list(ctx.meta) == ["n_terms", "children", "skipped_indices"]
    assert ctx.meta["n_terms"] == 2
    assert ctx.meta["skipped_indices"] == []
    children = ctx.meta["children"]
    assert [set(c) for c in children] == [{"quantities", "parameters", "loss", "meta"}] * 2
    # child losses are unweighted
    assert [c["loss"] for c in children] == [4.0, 1.0]
    assert [c["parameters"] for c in children] == [{"x": 2.0}] * 2
    assert cob({"x": 1.0}) == 5.0  # creates its own context


def test_child_meta_and_quantities_reach_the_parent():
    computer = core_objectives.LinearComputer(2.0)
    cob = CombinedObjectiveFunction(
        [computer.with_loss(core_objectives.squared_error, target=0.0), const(1.0)]
    )
    ctx = EvaluateContext()
    cob({"x": 1.0}, ctx)
    first, second = ctx.meta["children"]
    assert first["quantities"] == {"y": 2.0}
    assert first["meta"] == {"type": "linear", "tag": "lin"}
    assert second["quantities"] is None and second["meta"] == {}


def test_static_meta_data_of_the_cob():
    cob = CombinedObjectiveFunction([const(1.0)])
    assert cob.static_meta_data == {}
    cob.static_meta_data = {"name": "total"}
    ctx = EvaluateContext()
    cob({}, ctx)
    assert ctx.meta["name"] == "total"


def test_nested_cobs_nest_children():
    inner = CombinedObjectiveFunction([const(1.0), const(2.0)], weights=[1.0, 10.0])
    outer = CombinedObjectiveFunction([inner, const(5.0)], weights=[2.0, 1.0])
    ctx = EvaluateContext()
    assert outer({}, ctx) == 2.0 * 21.0 + 5.0
    inner_meta = ctx.meta["children"][0]
    assert inner_meta["loss"] == 21.0
    assert inner_meta["meta"]["n_terms"] == 2
    assert [c["loss"] for c in inner_meta["meta"]["children"]] == [1.0, 2.0]
    assert inner_meta["meta"]["skipped_indices"] == []
    assert "children" not in ctx.meta["children"][1]["meta"]


def test_empty_cob_raises_value_error():
    cob = CombinedObjectiveFunction([])
    assert cob.n_terms() == 0
    with pytest.raises(ValueError, match="no terms"):
        cob({})
    with pytest.raises(ValueError, match="no terms"):
        cob.evaluate_terms({}, EvaluateContext())


def test_objective_functions_must_be_a_sequence():
    with pytest.raises(TypeError, match="wrap it in a list"):
        CombinedObjectiveFunction(core_objectives.square)


def test_typeerror_in_a_term_propagates_unchanged():
    error = TypeError("inside the term")
    calls = []

    def term(parameters):
        calls.append(1)
        raise error

    cob = CombinedObjectiveFunction([term])
    ctx = EvaluateContext()
    with pytest.raises(TypeError) as info:
        cob({}, ctx)
    assert info.value is error
    assert calls == [1]
    # the children were still collected
    assert len(ctx.meta["children"]) == 1


def test_handlers_other_than_raising_also_handle_type_errors():
    # the handler is the user's explicit policy for term exceptions, TypeError included
    cob = CombinedObjectiveFunction(
        [failing(TypeError("t")), const(2.0)], exception_handler=skip_exception_handler
    )
    ctx = EvaluateContext()
    assert cob({}, ctx) == 2.0
    assert ctx.meta["skipped_indices"] == [0]


def test_bad_configurator_and_handler_raise_type_error():
    with pytest.raises(TypeError, match="child_context_configurator must be callable"):
        CombinedObjectiveFunction([const(1.0)], child_context_configurator=3)
    with pytest.raises(TypeError, match="exception_handler must be callable"):
        CombinedObjectiveFunction([const(1.0)], exception_handler="skip")


def test_non_numeric_term_value_raises_type_error():
    cob = CombinedObjectiveFunction([const(None)], exception_handler=skip_exception_handler)
    with pytest.raises(TypeError):
        cob({})


# -- exception policies -----------------------------------------------------------------------


def test_raising_policy_is_the_default():
    cob = CombinedObjectiveFunction([const(1.0), failing(KeyError("missing"))])
    assert cob.exception_handler is raising_exception_handler
    with pytest.raises(KeyError, match="missing"):
        cob({})


def test_nan_policy_gives_nan():
    cob = CombinedObjectiveFunction(
        [const(1.0), failing(RuntimeError("x"))], exception_handler=nan_exception_handler
    )
    ctx = EvaluateContext()
    assert math.isnan(cob({}, ctx))
    assert ctx.meta["skipped_indices"] == []


def test_skip_policy_drops_the_term():
    cob = CombinedObjectiveFunction(
        [const(1.0), failing(RuntimeError("x")), const(2.0)],
        exception_handler=skip_exception_handler,
        reduction=mean_reducer,
    )
    ctx = EvaluateContext()
    assert cob({}, ctx) == 1.5
    assert ctx.meta["skipped_indices"] == [1]
    assert len(ctx.meta["children"]) == 3


def test_handler_results_are_not_weighted_and_see_child_context_and_index():
    seen = []

    def handler(exception, ctx, idx):
        seen.append((type(exception), idx))
        ctx.meta["error"] = str(exception)
        return 100.0

    cob = CombinedObjectiveFunction(
        [const(1.0), failing(ValueError("bad"))], weights=[2.0, 3.0], exception_handler=handler
    )
    ctx = EvaluateContext()
    assert cob({}, ctx) == 2.0 + 100.0
    assert seen == [(ValueError, 1)]
    assert ctx.meta["children"][1]["meta"] == {"error": "bad"}


@pytest.mark.parametrize("reduction", [sum_reducer, mean_reducer, root_mean_reducer, max])
def test_all_terms_skipped_gives_nan_and_a_warning(caplog, reduction):
    ran = []

    def aggregator(terms, quantities, ctx):
        ran.append(1)
        return 0.0

    for red in (reduction, aggregator):
        cob = CombinedObjectiveFunction(
            [failing(RuntimeError("a")), failing(RuntimeError("b"))],
            reduction=red,
            exception_handler=skip_exception_handler,
        )
        ctx = EvaluateContext()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="chemfit.core.combined"):
            value = cob({}, ctx)
        assert math.isnan(value) and math.isnan(ctx.loss)
        assert ctx.meta["skipped_indices"] == [0, 1]
        records = [r for r in caplog.records if "all 2 terms were skipped" in r.getMessage()]
        assert len(records) == 1
        assert records[0].levelno == logging.WARNING
        assert "[0, 1]" in records[0].getMessage()
    assert ran == []


# -- configurators ----------------------------------------------------------------------------


def test_configurator_mutates_child_and_parent_with_absolute_indices():
    calls = []

    def configure(idx_child_ctx, child_ctx, num_children, parent_ctx):
        calls.append((idx_child_ctx, num_children))
        child_ctx.config.scale = idx_child_ctx + 1
        parent_ctx.meta.setdefault("configured", []).append(idx_child_ctx)

    @to_objective_functor(pass_ctx=True)
    def scaled(parameters, ctx):
        return ctx.config.scale * parameters["x"]

    cob = CombinedObjectiveFunction([scaled, scaled, scaled], child_context_configurator=configure)
    ctx = EvaluateContext()
    assert cob({"x": 1.0}, ctx) == 6.0
    assert calls == [(0, 3), (1, 3), (2, 3)]
    assert ctx.meta["configured"] == [0, 1, 2]
    assert [c["loss"] for c in ctx.meta["children"]] == [1.0, 2.0, 3.0]


def test_configurator_typeerror_propagates():
    def configure(idx_child_ctx, child_ctx, num_children, parent_ctx):
        raise TypeError("configurator bug")

    cob = CombinedObjectiveFunction([const(1.0)], child_context_configurator=configure)
    with pytest.raises(TypeError, match="configurator bug"):
        cob({})


# -- weights ----------------------------------------------------------------------------------


def test_default_weights():
    assert CombinedObjectiveFunction([const(1.0), const(2.0)]).weights == [1.0, 1.0]


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ([1.0], "2 objective functions"),
        ([1.0, 1.0, 1.0], "2 objective functions"),
        ([1.0, -1.0], r"weights\[1\] must be finite and >= 0"),
        ([math.nan, 1.0], r"weights\[0\] must be finite"),
        ([1.0, math.inf], r"weights\[1\] must be finite"),
    ],
)
def test_bad_weights_raise_value_error(weights, match):
    with pytest.raises(ValueError, match=match):
        CombinedObjectiveFunction([const(1.0), const(2.0)], weights=weights)


def test_non_numeric_weight_raises_type_error():
    with pytest.raises(TypeError, match=r"weights\[0\] must be a real number"):
        CombinedObjectiveFunction([const(1.0)], weights=["1"])


def test_weights_accept_numpy_and_mutated_weights_are_checked_at_call():
    cob = CombinedObjectiveFunction([const(1.0), const(2.0)], weights=np.array([1.0, 2.0]))
    assert cob.weights == [1.0, 2.0]
    assert all(type(w) is float for w in cob.weights)
    cob.weights = [1.0]
    with pytest.raises(ValueError, match="pass one weight per entry of objective functions"):
        cob({})


# -- reductions -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reduction", "expected"),
    [(sum, 6.0), (max, 3.0), (min, 1.0), (np.mean, 2.0), (np.sum, 6.0), (mean_reducer, 2.0)],
)
def test_reducers_are_wrapped_and_return_floats(reduction, expected):
    cob = CombinedObjectiveFunction([const(1.0), const(2.0), const(3.0)], reduction=reduction)
    assert isinstance(cob.reduction, WrappedReducer)
    assert cob.reduction.to_reducer() is reduction
    value = cob({})
    assert value == expected
    assert type(value) is float


def test_aggregator_gets_kept_terms_quantities_and_context():
    received = {}

    def aggregator(terms, quantities, ctx):
        received.update(terms=terms, quantities=quantities, ctx=ctx)
        return np.float64(sum(t * q["v"] for t, q in zip(terms, quantities)))

    cob = CombinedObjectiveFunction(
        [computer_term(1.0), failing(RuntimeError("x")), computer_term(3.0)],
        weights=[1.0, 1.0, 2.0],
        reduction=aggregator,
        exception_handler=skip_exception_handler,
    )
    assert cob.reduction is aggregator
    ctx = EvaluateContext()
    value = cob({}, ctx)
    assert type(value) is float
    assert value == 1.0 * 1.0 + 6.0 * 3.0
    assert received["terms"] == [1.0, 6.0]
    assert received["quantities"] == [{"v": 1.0}, {"v": 3.0}]
    assert received["ctx"] is ctx


def test_reduction_is_reclassified_on_assignment():
    cob = CombinedObjectiveFunction([const(1.0), const(4.0)])
    assert isinstance(cob.reduction, WrappedReducer)
    assert cob.reduction.to_reducer() is sum_reducer
    cob.reduction = max
    assert cob({}) == 4.0

    def aggregator(terms, quantities, ctx):
        return -1.0

    cob.reduction = aggregator
    assert cob.reduction is aggregator
    assert cob({}) == -1.0
    wrapped = WrappedReducer(min)
    cob.reduction = wrapped
    assert cob.reduction is wrapped
    assert cob({}) == 1.0


@pytest.mark.parametrize(
    "bad",
    [
        lambda: 1.0,
        lambda terms, quantities: 1.0,
        lambda a, b, c, d: 1.0,
        3.0,
        "sum",
    ],
)
def test_bad_reductions_raise_type_error(bad):
    with pytest.raises(TypeError, match="reduction"):
        CombinedObjectiveFunction([const(1.0)], reduction=bad)
    cob = CombinedObjectiveFunction([const(1.0)])
    with pytest.raises(TypeError, match="reduction"):
        cob.reduction = bad


def test_typeerror_inside_the_reducer_propagates():
    def reducer(terms):
        raise TypeError("reducer bug")

    with pytest.raises(TypeError, match="reducer bug"):
        CombinedObjectiveFunction([const(1.0)], reduction=reducer)({})


# -- add, add_flat, select --------------------------------------------------------------------


def test_add_single_and_sequences():
    cob = CombinedObjectiveFunction([const(1.0)])
    assert cob.add(const(2.0)) is cob
    cob.add(const(3.0), 2.0)
    cob.add([const(1.0), const(1.0)], weights=[0.5, 1.5])
    cob.add([const(1.0), const(1.0)], weights=np.float64(3.0))
    cob.add(CombinedObjectiveFunction([const(10.0)]), 0.1)
    assert cob.n_terms() == 8
    assert cob.weights == [1.0, 1.0, 2.0, 0.5, 1.5, 3.0, 3.0, 0.1]
    assert isinstance(cob.objective_functions[1], WrappedObjectiveFunctor)
    assert isinstance(cob.objective_functions[-1], CombinedObjectiveFunction)
    assert cob({}) == pytest.approx(1 + 2 + 6 + 0.5 + 1.5 + 3 + 3 + 1.0)


def test_add_validates_before_changing_anything():
    cob = CombinedObjectiveFunction([const(1.0)])
    with pytest.raises(ValueError, match="2 objective functions"):
        cob.add([const(1.0), const(1.0)], weights=[1.0])
    with pytest.raises(ValueError, match="finite and >= 0"):
        cob.add(const(1.0), -2.0)
    assert cob.n_terms() == 1 and cob.weights == [1.0]


def test_add_flat_scales_weights_and_passes_kwargs():
    def configure(idx_child_ctx, child_ctx, num_children, parent_ctx):
        pass

    a = CombinedObjectiveFunction(
        [const(1.0)],
        weights=[2.0],
        reduction=max,
        exception_handler=skip_exception_handler,
        child_context_configurator=configure,
    )
    b = CombinedObjectiveFunction([const(1.0), const(3.0)])
    flat = CombinedObjectiveFunction.add_flat([a, b], weights=[1.0, 0.5])
    assert flat.n_terms() == 3
    assert flat.weights == [2.0, 0.5, 0.5]
    assert flat.objective_functions == a.objective_functions + b.objective_functions
    # class defaults for reduction, handler and configurator
    assert flat.reduction.to_reducer() is sum_reducer
    assert flat.exception_handler is raising_exception_handler
    assert flat.child_context_configurator is None
    assert flat({}) == 2.0 + 0.5 + 1.5

    unscaled = CombinedObjectiveFunction.add_flat([a, b], reduction=max)
    assert unscaled.weights == [2.0, 1.0, 1.0]
    assert unscaled({}) == 3.0


def test_add_flat_uses_the_subclass_and_validates():
    class MyCOB(CombinedObjectiveFunction):
        pass

    flat = MyCOB.add_flat([CombinedObjectiveFunction([const(1.0)])])
    assert type(flat) is MyCOB
    with pytest.raises(ValueError, match="finite and >= 0"):
        CombinedObjectiveFunction.add_flat([CombinedObjectiveFunction([const(1.0)])], [-1.0])
    with pytest.raises(ValueError, match="2 entries but there are 1 combined objectives"):
        CombinedObjectiveFunction.add_flat([CombinedObjectiveFunction([const(1.0)])], [1.0, 2.0])
    with pytest.raises(TypeError, match="must be a CombinedObjectiveFunction"):
        CombinedObjectiveFunction.add_flat([const(1.0)])


def test_select_keeps_policies():
    def configure(idx_child_ctx, child_ctx, num_children, parent_ctx):
        child_ctx.config.idx = idx_child_ctx

    cob = CombinedObjectiveFunction(
        [const(1.0), const(2.0), const(4.0)],
        weights=[1.0, 2.0, 3.0],
        reduction=max,
        exception_handler=nan_exception_handler,
        child_context_configurator=configure,
    )
    sub = cob.select([2, 0])
    assert sub is not cob and type(sub) is CombinedObjectiveFunction
    assert sub.objective_functions == [cob.objective_functions[2], cob.objective_functions[0]]
    assert sub.weights == [3.0, 1.0]
    assert sub.reduction is cob.reduction
    assert sub.exception_handler is nan_exception_handler
    assert sub.child_context_configurator is configure
    assert sub({}) == 12.0
    assert cob.n_terms() == 3  # unchanged
    sub.add(const(100.0))
    assert cob.n_terms() == 3
    assert cob.select(slice(0, 2)).weights == [1.0, 2.0]
    assert cob.select([-1]).weights == [3.0]
    with pytest.raises(ValueError, match="out of range"):
        cob.select([3])
    with pytest.raises(TypeError, match="indices must be ints"):
        cob.select(["0"])


# -- the evaluation steps, used piecewise -----------------------------------------------------


def test_steps_used_piecewise_give_the_serial_result():
    def configure(idx_child_ctx, child_ctx, num_children, parent_ctx):
        child_ctx.config.idx = idx_child_ctx

    cob = CombinedObjectiveFunction(
        [computer_term(1.0), failing(RuntimeError("x")), computer_term(2.0)],
        weights=[1.0, 1.0, 3.0],
        child_context_configurator=configure,
        exception_handler=skip_exception_handler,
    )
    serial_ctx = EvaluateContext()
    serial = cob({"p": 1}, serial_ctx)

    # what a parallel wrapper does: evaluate each term in a copy that travelled by pickle
    ctx = cob.prepare_context({"p": 1}, EvaluateContext())
    with ctx.child_contexts(cob.n_terms(), cob.child_context_configurator) as children:
        terms = []
        for idx, child in enumerate(children):
            remote = pickle.loads(pickle.dumps(child))
            assert remote.config.idx == idx
            terms.append(cob.evaluate_term({"p": 1}, idx, remote))
            child.apply_result_state(remote.to_result_state())
    kept = cob.filter_terms(terms, ctx)
    ctx.loss = cob.apply_reduction(kept, ctx)

    assert ctx.loss == serial == 7.0
    assert ctx.meta == serial_ctx.meta


def test_pickled_cob_evaluates_the_same():
    cob = CombinedObjectiveFunction(
        [core_objectives.square, core_objectives.decorated_loss],
        weights=[1.0, 2.0],
        reduction=max,
        exception_handler=skip_exception_handler,
    )
    clone = pickle.loads(pickle.dumps(cob))
    assert clone({"x": 3.0}) == cob({"x": 3.0}) == 9.0
    assert clone.reduction.to_reducer() is max


def test_repr():
    text = repr(CombinedObjectiveFunction([const(1.0)], reduction=max))
    assert "n_terms=1" in text and "max" in text


# -- the recipe: evaluate(run_terms=...) and run_term --------------------------------------------


@to_objective_functor(pass_ctx=True)
def with_sub_evaluations(parameters, ctx):
    """Spawns two children of its context and never collects them itself."""
    for i, sub in enumerate(ctx.spawn_children(2)):
        sub.loss = parameters["x"] + i
        sub.meta["i"] = i
    return parameters["x"]


def sub_evaluation_cob(**kwargs):
    def configure(idx_child_ctx, child_ctx, num_children, parent_ctx):
        child_ctx.config.idx = idx_child_ctx

    return CombinedObjectiveFunction(
        [with_sub_evaluations, computer_term(2.0), with_sub_evaluations],
        weights=[1.0, 0.5, 3.0],
        child_context_configurator=configure,
        **kwargs,
    )


def on_pickled_copies(cob):
    """A run_terms that runs each term on a copy of its child that travelled by pickle, as a
    process pool does, in reverse order, and applies the result states back."""

    def run_terms(parameters, children):
        terms = [None] * len(children)
        for idx in reversed(range(len(children))):
            remote = pickle.loads(pickle.dumps(children[idx]))
            terms[idx] = cob.run_term(parameters, idx, remote)
            children[idx].apply_result_state(pickle.loads(pickle.dumps(remote.to_result_state())))
        return terms

    return run_terms


def test_evaluate_without_run_terms_is_the_call():
    cob = sub_evaluation_cob()
    ctx_call, ctx_evaluate = EvaluateContext(), EvaluateContext()
    assert cob.evaluate({"x": 1.5}, ctx_evaluate) == cob({"x": 1.5}, ctx_call) == 7.0
    assert ctx_evaluate.meta == ctx_call.meta
    assert ctx_evaluate.loss == 7.0
    assert cob.evaluate({"x": 1.5}) == 7.0  # no context


def test_evaluate_with_run_terms_elsewhere_gives_the_serial_meta_with_sub_evaluations():
    cob = sub_evaluation_cob()
    serial_ctx, ctx = EvaluateContext(), EvaluateContext()
    serial = cob({"x": 1.5}, serial_ctx)
    assert cob.evaluate({"x": 1.5}, ctx, run_terms=on_pickled_copies(cob)) == serial
    assert ctx.meta == serial_ctx.meta
    assert repr(ctx.meta) == repr(serial_ctx.meta)
    grandchildren = ctx.meta["children"][2]["meta"]["children"]
    assert [g["loss"] for g in grandchildren] == [1.5, 2.5]
    assert [c["meta"].get("children") is None for c in ctx.meta["children"]] == [
        False,
        True,
        False,
    ]


def test_run_term_collects_sub_evaluations_also_when_the_handler_raises():
    @to_objective_functor(pass_ctx=True)
    def spawns_then_fails(parameters, ctx):
        ctx.spawn_children(3)
        raise RuntimeError("after the sub-evaluations")

    cob = CombinedObjectiveFunction([spawns_then_fails])
    child = EvaluateContext()
    with pytest.raises(RuntimeError, match="after the sub-evaluations"):
        cob.run_term({}, 0, child)
    assert len(child.meta["children"]) == 3
    childless = EvaluateContext()
    assert CombinedObjectiveFunction([const(2.0)]).run_term({}, 0, childless) == 2.0
    assert "children" not in childless.meta


def test_run_terms_failures_leave_the_serial_meta_and_propagate():
    cob = sub_evaluation_cob()

    def first_two_then_fail(parameters, children):
        for idx in range(2):
            cob.run_term(parameters, idx, children[idx])
        raise KeyError("a term failed elsewhere")

    ctx = EvaluateContext()
    with pytest.raises(KeyError, match="a term failed elsewhere"):
        cob.evaluate({"x": 1.0}, ctx, run_terms=first_two_then_fail)
    assert ctx.meta["n_terms"] == 3
    assert len(ctx.meta["children"]) == 3  # collected even though run_terms raised
    assert [g["loss"] for g in ctx.meta["children"][0]["meta"]["children"]] == [1.0, 2.0]
    assert ctx.meta["children"][2]["loss"] is None


def test_run_terms_must_return_one_value_per_term():
    cob = sub_evaluation_cob()
    with pytest.raises(ValueError, match=r"run_terms returned 2 values for 3 terms"):
        cob.evaluate({"x": 1.0}, run_terms=lambda parameters, children: [1.0, 2.0])


def test_skipped_terms_through_run_terms():
    cob = sub_evaluation_cob(exception_handler=skip_exception_handler)
    ctx = EvaluateContext()
    value = cob.evaluate({"x": 2.0}, ctx, run_terms=lambda parameters, children: [None, 1.0, 2.0])
    assert value == 3.0 and ctx.meta["skipped_indices"] == [0]


def test_call_uses_an_overridden_evaluate_terms():
    class Doubled(CombinedObjectiveFunction):
        def evaluate_terms(self, parameters, ctx):
            return [2.0 * term for term in super().evaluate_terms(parameters, ctx)]

    cob = Doubled([const(1.0), const(2.0)])
    assert cob({}) == cob.evaluate({}) == 6.0
