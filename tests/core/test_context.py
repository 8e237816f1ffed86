"""EvaluateContext, ObjectiveFunctor, QuantityComputer and QuantityComputerObjectiveFunction."""

from __future__ import annotations

import pickle
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest

from chemfit.abstract_objective_function import (
    ChildContextConfigurator,
    EvaluateContext,
    ExecutorLike,
    FutureLike,
    LossFunction,
    ObjectiveFunctor,
    QuantityComputer,
    QuantityComputerObjectiveFunction,
)
from chemfit.core.objectives import call_loss, ensure_context
from chemfit.wrap_funcs import WrappedQuantityComputer
from tests.helpers import core_objectives

# -- children ---------------------------------------------------------------------------------


def test_spawn_children_copies_config_and_shares_shared_and_executor():
    config = SimpleNamespace(nested={"a": [1]})
    shared = SimpleNamespace(cache={})
    with ThreadPoolExecutor(max_workers=1) as pool:
        ctx = EvaluateContext(config=config, shared=shared, executor=pool)
        children = ctx.spawn_children(3)
        assert children is ctx.children
        assert len(children) == 3
        for child in children:
            assert child.config is not config
            assert child.config.nested == {"a": [1]}
            assert child.config.nested is not config.nested
            assert child.shared is shared
            assert child.executor is pool
            assert child.parameters is None and child.loss is None and child.meta == {}
        children[0].config.nested["a"].append(2)
        assert config.nested == {"a": [1]}
        assert children[1].config.nested == {"a": [1]}


def test_spawn_children_replaces_previous_children():
    ctx = EvaluateContext()
    first = ctx.spawn_children(2)
    second = ctx.spawn_children(1)
    assert len(ctx.children) == 1
    assert ctx.children is second
    assert second[0] is not first[0]


def test_spawn_children_accepts_numpy_ints_and_zero():
    ctx = EvaluateContext()
    assert len(ctx.spawn_children(np.int64(2))) == 2
    assert ctx.spawn_children(0) == []


@pytest.mark.parametrize("bad", [-1, 1.5, "2", True, None])
def test_spawn_children_rejects_bad_counts(bad):
    with pytest.raises(ValueError, match="n_children"):
        EvaluateContext().spawn_children(bad)


def test_configurator_called_with_keywords_in_index_order():
    calls = []

    def configure(*, idx_child_ctx, child_ctx, num_children, parent_ctx):
        calls.append(idx_child_ctx)
        child_ctx.config.index = idx_child_ctx
        child_ctx.config.total = num_children
        parent_ctx.meta.setdefault("configured", []).append(idx_child_ctx)

    ctx = EvaluateContext()
    children = ctx.spawn_children(3, configure)
    assert calls == [0, 1, 2]
    assert [c.config.index for c in children] == [0, 1, 2]
    assert {c.config.total for c in children} == {3}
    assert ctx.meta["configured"] == [0, 1, 2]


def test_configurator_typeerror_propagates():
    def configure(idx_child_ctx, child_ctx, num_children, parent_ctx):
        raise TypeError("inside configurator")

    with pytest.raises(TypeError, match="inside configurator"):
        EvaluateContext().spawn_children(2, configure)


def test_collect_child_meta_data_recursive_and_not():
    ctx = EvaluateContext()
    (child,) = ctx.spawn_children(1)
    child.loss = 1.0
    grandchildren = child.spawn_children(2)
    for i, g in enumerate(grandchildren):
        g.loss = float(i)
        g.meta["i"] = i

    ctx.collect_child_meta_data(recursive=False)
    assert "children" in ctx.meta
    assert "children" not in child.meta

    ctx.collect_child_meta_data()
    nested = ctx.meta["children"][0]
    assert set(nested) == {"quantities", "parameters", "loss", "meta"}
    assert nested["loss"] == 1.0
    assert [g["loss"] for g in nested["meta"]["children"]] == [0.0, 1.0]
    assert [g["meta"]["i"] for g in nested["meta"]["children"]] == [0, 1]
    # grandchildren are childless: no "children" key
    assert "children" not in grandchildren[0].meta


def test_childless_context_has_no_children_key():
    ctx = EvaluateContext()
    ctx.collect_child_meta_data()
    assert "children" not in ctx.meta


def test_to_meta_data_returns_references():
    ctx = EvaluateContext()
    ctx.parameters = {"x": 1.0}
    ctx.quantities = {"e": 2.0}
    ctx.loss = 3.0
    data = ctx.to_meta_data()
    assert set(data) == {"quantities", "parameters", "loss", "meta"}
    assert data["parameters"] is ctx.parameters
    assert data["quantities"] is ctx.quantities
    assert data["meta"] is ctx.meta
    assert data["loss"] == 3.0


def test_child_contexts_collects_on_success_and_on_exception():
    ctx = EvaluateContext()
    with ctx.child_contexts(2) as children:
        children[0].loss = 5.0
    assert [c["loss"] for c in ctx.meta["children"]] == [5.0, None]

    ctx = EvaluateContext()
    with pytest.raises(RuntimeError, match="term failed"), ctx.child_contexts(3) as children:
        children[0].loss = 1.0
        children[0].meta["done"] = True
        raise RuntimeError("term failed")
    assert len(ctx.meta["children"]) == 3
    assert ctx.meta["children"][0]["loss"] == 1.0
    assert ctx.meta["children"][0]["meta"] == {"done": True}


def test_child_contexts_recursive_flag_and_configurator():
    def configure(idx_child_ctx, child_ctx, num_children, parent_ctx):
        child_ctx.config.label = f"{idx_child_ctx}/{num_children}"

    ctx = EvaluateContext()
    with ctx.child_contexts(2, configure, recursive=False) as children:
        assert [c.config.label for c in children] == ["0/2", "1/2"]
        children[0].spawn_children(1)
    assert "children" not in children[0].meta


# -- travelling -------------------------------------------------------------------------------


def _filled_context(executor=None) -> EvaluateContext:
    ctx = EvaluateContext(
        config=SimpleNamespace(level=2), shared=SimpleNamespace(token="abc"), executor=executor
    )
    ctx.parameters = {"x": 1.0}
    ctx.loss = 7.0
    ctx.quantities = {"e": 1.0}
    ctx.meta = {"tag": "t"}
    ctx.temp.scratch = "do not send"
    ctx.spawn_children(2)
    return ctx


def test_getstate_contains_worker_input_only():
    state = _filled_context().__getstate__()
    assert set(state) == {"parameters", "config", "shared", "meta"}


def test_pickle_round_trip_sends_worker_input_and_drops_the_rest():
    with ThreadPoolExecutor(max_workers=1) as pool:
        ctx = _filled_context(executor=pool)
        clone = pickle.loads(pickle.dumps(ctx))  # the executor itself is not picklable
    assert clone.parameters == {"x": 1.0}
    assert clone.config.level == 2
    assert clone.shared.token == "abc"
    assert clone.meta == {"tag": "t"}
    assert clone.executor is None
    assert clone.loss is None
    assert clone.quantities is None
    assert vars(clone.temp) == {}
    assert clone.children == []


def test_setstate_resets_fields_of_a_used_context():
    target = _filled_context()
    target.__setstate__({"parameters": {"y": 2.0}, "config": SimpleNamespace(), "meta": {}})
    assert target.parameters == {"y": 2.0}
    assert target.loss is None and target.quantities is None and target.children == []
    assert vars(target.temp) == {}
    assert isinstance(target.shared, SimpleNamespace)


@pytest.mark.timeout(60)
def test_context_through_a_real_process_pool():
    ctx = _filled_context()
    with ProcessPoolExecutor(max_workers=1) as pool:
        out = pool.submit(core_objectives.inspect_in_worker, ctx).result(timeout=50)
    seen = out["seen"]
    assert seen["parameters"] == {"x": 1.0}
    assert seen["config"] == {"level": 2}
    assert seen["shared"] == {"token": "abc"}
    assert seen["meta"] == {"tag": "t"}
    assert seen["temp"] == {}
    assert seen["loss"] is None and seen["quantities"] is None
    assert seen["executor"] is None and seen["n_children"] == 0

    ctx.apply_result_state(out["state"])
    assert ctx.loss == 42.0
    assert ctx.quantities == {"q": 1}
    assert ctx.meta == {"tag": "t", "worker": True}
    # shared travels out, never back
    assert not hasattr(ctx.shared, "changed_in_worker")


def test_result_state_round_trip_replaces_meta_wholesale():
    worker = EvaluateContext()
    worker.parameters = {"x": 2.0}
    worker.loss = 3.0
    worker.quantities = {"e": 4.0}
    worker.meta = {"new": 1}
    state = worker.to_result_state()
    assert set(state) == {"parameters", "loss", "quantities", "meta"}

    caller = EvaluateContext()
    caller.meta = {"old": 0}
    caller.temp.keep = True
    caller.apply_result_state(pickle.loads(pickle.dumps(state)))
    assert caller.parameters == {"x": 2.0}
    assert caller.loss == 3.0
    assert caller.quantities == {"e": 4.0}
    assert caller.meta == {"new": 1}
    assert caller.temp.keep is True


def test_reset_clears_evaluation_state_and_keeps_configuration():
    with ThreadPoolExecutor(max_workers=1) as pool:
        ctx = _filled_context(executor=pool)
        config, shared = ctx.config, ctx.shared
        ctx.reset()
        assert ctx.parameters is None and ctx.loss is None and ctx.quantities is None
        assert ctx.meta == {}
        assert vars(ctx.temp) == {}
        assert ctx.children == []
        assert ctx.config is config and ctx.shared is shared and ctx.executor is pool


def test_repr_is_one_line_with_the_essentials():
    text = repr(_filled_context())
    assert "\n" not in text
    assert text.startswith("EvaluateContext(")
    assert "'x': 1.0" in text
    assert "7.0" in text
    assert "tag" in text
    assert "children=2" in text


def test_protocols_are_satisfied_by_stdlib_executors():
    with ThreadPoolExecutor(max_workers=1) as pool:
        assert isinstance(pool, ExecutorLike)
        assert isinstance(pool.submit(int), FutureLike)
    assert ChildContextConfigurator is not None
    assert LossFunction is not None


# -- objectives and quantity computers ---------------------------------------------------------


def test_objective_functor_base_raises_not_implemented():
    with pytest.raises(NotImplementedError, match="__call__"):
        ObjectiveFunctor()({})


def test_quantity_computer_base_compute_raises_not_implemented():
    with pytest.raises(NotImplementedError, match="_compute"):
        QuantityComputer()({})


def test_ensure_context():
    ctx = EvaluateContext()
    assert ensure_context(ctx) is ctx
    assert isinstance(ensure_context(None), EvaluateContext)


def test_quantity_computer_sets_parameters_quantities_and_static_meta():
    computer = core_objectives.LinearComputer(slope=2.0)
    assert QuantityComputer().static_meta_data == {}
    ctx = EvaluateContext()
    ctx.meta["tag"] = "before"
    assert computer({"x": 3.0}, ctx) == {"y": 6.0}
    assert ctx.parameters == {"x": 3.0}
    assert ctx.quantities == {"y": 6.0}
    assert ctx.meta == {"tag": "lin", "type": "linear"}
    assert computer({"x": 1.0}) == {"y": 2.0}  # creates its own context


def test_with_loss_binds_keywords():
    objective = core_objectives.LinearComputer(slope=2.0).with_loss(
        core_objectives.squared_error, target=5.0
    )
    assert isinstance(objective, QuantityComputerObjectiveFunction)
    assert isinstance(objective, ObjectiveFunctor)
    ctx = EvaluateContext()
    assert objective({"x": 3.0}, ctx) == 1.0
    assert ctx.loss == 1.0
    assert ctx.parameters == {"x": 3.0}
    assert ctx.quantities == {"y": 6.0}
    # no keywords: the loss function is used as is
    plain = core_objectives.LinearComputer(1.0).with_loss(lambda q: q["y"])
    assert plain.loss_function.__name__ == "<lambda>"
    assert plain({"x": 4.0}) == 4.0


def test_qcof_static_meta_wins_over_the_computers():
    objective = QuantityComputerObjectiveFunction(
        lambda q: q["y"], core_objectives.LinearComputer(1.0)
    )
    assert objective.static_meta_data == {}
    objective.static_meta_data = {"tag": "objective", "extra": 1}
    ctx = EvaluateContext()
    objective({"x": 1.0}, ctx)
    assert ctx.meta == {"tag": "objective", "type": "linear", "extra": 1}


def test_qcof_chooses_the_call_form_by_signature():
    computer = WrappedQuantityComputer(lambda p: {"e": p["x"]})

    def with_parameters(quantities, parameters):
        return quantities["e"] + parameters["x"]

    def quantities_only(quantities):
        return quantities["e"]

    def optional_parameters(quantities, parameters=None):
        assert parameters is None
        return 10.0

    assert QuantityComputerObjectiveFunction(with_parameters, computer)({"x": 2.0}) == 4.0
    assert QuantityComputerObjectiveFunction(quantities_only, computer)({"x": 2.0}) == 2.0
    assert QuantityComputerObjectiveFunction(optional_parameters, computer)({"x": 2.0}) == 10.0
    # builtins without a signature are called with the quantities only
    assert QuantityComputerObjectiveFunction(len, computer)({"x": 2.0}) == 1
    assert call_loss(with_parameters, {"e": 1.0}, {"x": 1.0}) == 2.0
    assert call_loss(np.sum, np.array([1.0, 2.0]), {"x": 1.0}) == 3.0


def test_qcof_typeerror_inside_loss_propagates_without_retry():
    calls = []

    def loss(quantities, parameters=None):
        calls.append((quantities, parameters))
        raise TypeError("bad arithmetic inside the loss")

    objective = QuantityComputerObjectiveFunction(
        loss, WrappedQuantityComputer(lambda p: {"e": 1.0})
    )
    with pytest.raises(TypeError, match="bad arithmetic inside the loss"):
        objective({"x": 1.0})
    assert calls == [({"e": 1.0}, None)]

    two_calls = []

    def loss_with_parameters(quantities, parameters):
        two_calls.append(1)
        raise TypeError("inner")

    objective = QuantityComputerObjectiveFunction(
        loss_with_parameters, WrappedQuantityComputer(lambda p: {"e": 1.0})
    )
    with pytest.raises(TypeError, match="inner"):
        objective({"x": 1.0})
    assert two_calls == [1]


def test_qcof_is_picklable_with_module_level_parts():
    objective = core_objectives.LinearComputer(3.0).with_loss(
        core_objectives.squared_error, target=0.0
    )
    clone = pickle.loads(pickle.dumps(objective))
    assert clone({"x": 1.0}) == 9.0
