"""chemfit.wrap_funcs: wrapped objectives and quantity computers, bind, decorators, pickling."""

from __future__ import annotations

import copy
import functools
import pickle
import sys
from concurrent.futures import ProcessPoolExecutor

import pytest

import chemfit.core.wrapping as wrapping
import chemfit.wrap_funcs as wrap_funcs
from chemfit.abstract_objective_function import (
    EvaluateContext,
    ObjectiveFunctor,
    QuantityComputer,
    QuantityComputerObjectiveFunction,
)
from chemfit.wrap_funcs import (
    WrappableObjFunction,
    WrappableQuantFunction,
    WrappedObjectiveFunctor,
    WrappedQuantityComputer,
    to_objective_functor,
    to_quantity_computer,
)
from tests.helpers import core_objectives


def test_shim_exports_the_layer_objects():
    assert set(wrap_funcs.__all__) == {
        "WrappableObjFunction",
        "WrappableQuantFunction",
        "WrappedObjectiveFunctor",
        "WrappedQuantityComputer",
        "to_objective_functor",
        "to_quantity_computer",
    }
    for name in wrap_funcs.__all__:
        assert getattr(wrap_funcs, name) is getattr(wrapping, name)
    assert WrappableObjFunction is not None and WrappableQuantFunction is not None


# -- calling ----------------------------------------------------------------------------------


def test_objective_sets_parameters_and_loss():
    objective = WrappedObjectiveFunctor(core_objectives.square)
    assert isinstance(objective, ObjectiveFunctor)
    ctx = EvaluateContext()
    assert objective({"x": 3.0}, ctx) == 9.0
    assert ctx.loss == 9.0
    assert ctx.parameters == {"x": 3.0}
    assert objective({"x": 2.0}) == 4.0  # no context given


def test_quantity_computer_sets_quantities():
    computer = WrappedQuantityComputer(core_objectives.energy, func_kwargs={"scale": 2.0})
    assert isinstance(computer, QuantityComputer)
    ctx = EvaluateContext()
    assert computer({"x": 1.5}, ctx) == {"energy": 3.0}
    assert ctx.quantities == {"energy": 3.0}
    assert ctx.parameters == {"x": 1.5}
    assert "had_ctx" not in ctx.meta


def test_pass_ctx_passes_the_context_as_keyword():
    received = {}

    def func(parameters, a, b=0, *, ctx):
        received.update(a=a, b=b, ctx=ctx)
        return {"v": a + b}

    computer = WrappedQuantityComputer(func, pass_ctx=True, func_args=(1,), func_kwargs={"b": 2})
    ctx = EvaluateContext()
    assert computer({}, ctx) == {"v": 3}
    assert received == {"a": 1, "b": 2, "ctx": ctx}

    def objective_func(parameters, *, ctx):
        ctx.meta["seen"] = parameters["x"]
        return 1.0

    objective = WrappedObjectiveFunctor(objective_func, pass_ctx=True)
    ctx = EvaluateContext()
    assert objective({"x": 5}, ctx) == 1.0
    assert ctx.meta == {"seen": 5}


def test_func_args_follow_parameters_in_order():
    def func(parameters, a, b, c=None):
        return (a, b, c)

    objective = WrappedObjectiveFunctor(func, func_args=(1, 2), func_kwargs={"c": 3})
    assert objective({}) == (1, 2, 3)
    assert objective.func_args == (1, 2)
    assert objective.func_kwargs == {"c": 3}


def test_defaults_and_validation():
    objective = WrappedObjectiveFunctor(core_objectives.square)
    assert objective.func is core_objectives.square
    assert objective.pass_ctx is False
    assert objective.func_args == ()
    assert objective.func_kwargs == {}
    assert objective.static_meta_data == {}
    with pytest.raises(TypeError, match="func must be callable"):
        WrappedObjectiveFunctor(3.0)
    with pytest.raises(TypeError, match="func must be callable"):
        WrappedQuantityComputer("not a function")


def test_static_meta_data_is_merged():
    computer = WrappedQuantityComputer(core_objectives.energy)
    computer.static_meta_data = {"tag": "e"}
    objective = WrappedObjectiveFunctor(core_objectives.square)
    objective.static_meta_data = {"tag": "sq"}
    ctx = EvaluateContext()
    computer({"x": 1.0}, ctx)
    assert ctx.meta == {"tag": "e"}
    ctx = EvaluateContext()
    objective({"x": 1.0}, ctx)
    assert ctx.meta == {"tag": "sq"}


def test_typeerror_inside_the_function_propagates_unchanged():
    error = TypeError("inside")

    def func(parameters):
        raise error

    with pytest.raises(TypeError) as info:
        WrappedObjectiveFunctor(func)({})
    assert info.value is error


# -- bind -------------------------------------------------------------------------------------


def test_bind_accumulates():
    computer = WrappedQuantityComputer(lambda p, *args, **kwargs: {"args": args, **kwargs})
    bound = computer.bind(1).bind(b=2)
    assert bound.func_args == (1,)
    assert bound.func_kwargs == {"b": 2}
    more = bound.bind(3, b=4, c=5)
    assert more.func_args == (1, 3)
    assert more.func_kwargs == {"b": 4, "c": 5}
    assert more({}) == {"args": (1, 3), "b": 4, "c": 5}
    # the originals are unchanged
    assert computer.func_args == () and computer.func_kwargs == {}
    assert bound.func_args == (1,) and bound.func_kwargs == {"b": 2}


def test_bind_accepts_a_keyword_named_self():
    objective = WrappedObjectiveFunctor(lambda p, **kwargs: kwargs["self"])
    assert objective.bind(self=7)({}) == 7


def test_bind_keeps_pass_ctx_type_and_copies_static_meta():
    for cls in (WrappedObjectiveFunctor, WrappedQuantityComputer):
        wrapper = cls(core_objectives.energy, pass_ctx=True)
        wrapper.static_meta_data = {"tag": "t", "nested": {"a": 1}}
        bound = wrapper.bind(2.0)
        assert type(bound) is cls
        assert bound.pass_ctx is True
        assert bound.static_meta_data == {"tag": "t", "nested": {"a": 1}}
        assert bound.static_meta_data is not wrapper.static_meta_data
        bound.static_meta_data["tag"] = "changed"
        bound.static_meta_data["nested"]["a"] = 2
        assert wrapper.static_meta_data == {"tag": "t", "nested": {"a": 1}}
        ctx = EvaluateContext()
        bound({"x": 1.0}, ctx)
        assert ctx.meta["had_ctx"] is True


def test_bind_then_with_loss_chains():
    computer = WrappedQuantityComputer(core_objectives.energy)
    objective = computer.bind(scale=3.0).with_loss(
        lambda q, target: (q["energy"] - target) ** 2, target=1.0
    )
    assert isinstance(objective, QuantityComputerObjectiveFunction)
    assert objective({"x": 1.0}) == 4.0


# -- decorators -------------------------------------------------------------------------------


def test_quantity_computer_decorator_forms():
    @to_quantity_computer()
    def with_parens(parameters):
        return {"v": parameters["x"]}

    @to_quantity_computer(pass_ctx=True)
    def with_ctx(parameters, ctx):
        ctx.meta["ctx"] = True
        return {"v": 2 * parameters["x"]}

    @to_quantity_computer
    def bare(parameters, f=1):
        return {"v": f * parameters["x"]}

    for computer in (with_parens, with_ctx, bare):
        assert isinstance(computer, WrappedQuantityComputer)
    assert with_parens.pass_ctx is False and bare.pass_ctx is False and with_ctx.pass_ctx is True
    ctx = EvaluateContext()
    assert with_ctx({"x": 1.0}, ctx) == {"v": 2.0}
    assert ctx.meta == {"ctx": True}
    assert with_parens({"x": 1.0}) == {"v": 1.0}
    objective = bare.bind(f=2).with_loss(lambda q, target: q["v"] - target, target=1)
    assert objective({"x": 3.0}) == 5.0


def test_objective_decorator_forms():
    @to_objective_functor()
    def with_parens(parameters):
        return parameters["x"]

    @to_objective_functor(pass_ctx=True)
    def with_ctx(parameters, ctx):
        ctx.meta["ctx"] = True
        return 2 * parameters["x"]

    @to_objective_functor
    def bare(parameters):
        return 3 * parameters["x"]

    for objective in (with_parens, with_ctx, bare):
        assert isinstance(objective, WrappedObjectiveFunctor)
    ctx = EvaluateContext()
    assert with_ctx({"x": 1.0}, ctx) == 2.0
    assert ctx.meta == {"ctx": True} and ctx.loss == 2.0
    assert with_parens({"x": 1.0}) == 1.0
    assert bare({"x": 1.0}) == 3.0


# -- pickling ---------------------------------------------------------------------------------


def test_wrappers_of_module_level_functions_pickle():
    objective = WrappedObjectiveFunctor(core_objectives.square).bind()
    objective.static_meta_data = {"tag": "sq"}
    clone = pickle.loads(pickle.dumps(objective))
    assert clone.func is core_objectives.square
    assert clone.static_meta_data == {"tag": "sq"}
    assert clone({"x": 2.0}) == 4.0

    computer = WrappedQuantityComputer(core_objectives.energy, pass_ctx=True).bind(2.0)
    clone = pickle.loads(pickle.dumps(computer))
    assert clone.pass_ctx is True and clone.func_args == (2.0,)
    assert clone({"x": 1.0}) == {"energy": 2.0}


def test_decorated_module_level_functions_pickle():
    clone = pickle.loads(pickle.dumps(core_objectives.decorated_energy))
    assert clone.func is core_objectives.decorated_energy.func
    assert clone({"x": 1.0}) == {"energy": 1.0}

    bound = pickle.loads(pickle.dumps(core_objectives.decorated_energy.bind(offset=2.0)))
    assert bound.func_kwargs == {"offset": 2.0}
    assert bound({"x": 1.0}) == {"energy": 3.0}

    ctx = EvaluateContext()
    assert pickle.loads(pickle.dumps(core_objectives.decorated_loss))({"x": -2.0}, ctx) == 2.0
    assert ctx.meta == {"decorated": True}


def test_wrapper_of_a_lambda_is_not_picklable():
    with pytest.raises((pickle.PicklingError, AttributeError)):
        pickle.dumps(WrappedObjectiveFunctor(lambda p: 1.0))


def _main_namespace(source: str) -> dict:
    """Run ``source`` as a notebook cell would: its functions belong to ``__main__`` (whose
    real module, pytest's, does not have them, as a worker's ``__main__`` would not)."""
    namespace = {"__name__": "__main__", "to_quantity_computer": to_quantity_computer}
    exec(source, namespace)
    return namespace


MAIN_MODEL = """
@to_quantity_computer
def model(params, scale=1.0):
    return {"y": scale * params["x"]}

@to_quantity_computer
def countdown(params, n=3):  # its body uses its own wrapper's name
    return {"n": 0 if n == 0 else 1 + countdown.func(params, n - 1)["n"]}
"""


def test_wrappers_of_main_functions_travel_by_value():
    ns = _main_namespace(MAIN_MODEL)
    data = pickle.dumps(ns["model"].bind(scale=2.0))  # plain pickle, as a fork pool uses
    del ns["model"]  # not even this namespace can resolve it by name now
    clone = pickle.loads(data)
    assert clone({"x": 1.5}) == {"y": 3.0}
    assert clone.func.__module__ == "__main__"


def test_a_main_function_using_its_own_wrapper_pickles():
    ns = _main_namespace(MAIN_MODEL)
    assert pickle.loads(pickle.dumps(ns["countdown"]))({"x": 0.0}) == {"n": 3}
    cloudpickle = pytest.importorskip("cloudpickle")
    assert cloudpickle.loads(cloudpickle.dumps(ns["countdown"]))({"x": 0.0}) == {"n": 3}


def test_each_pickle_carries_the_current_definition():
    first = _main_namespace(MAIN_MODEL)["model"]
    second = _main_namespace(MAIN_MODEL.replace("scale * params", "10 * scale * params"))
    assert pickle.loads(pickle.dumps(first))({"x": 1.0}) == {"y": 1.0}
    assert pickle.loads(pickle.dumps(second["model"]))({"x": 1.0}) == {"y": 10.0}


def test_without_cloudpickle_main_functions_go_by_name(monkeypatch):
    monkeypatch.setitem(sys.modules, "cloudpickle", None)  # `import cloudpickle` fails
    ns = _main_namespace(MAIN_MODEL)
    monkeypatch.setattr(sys.modules["__main__"], "model", ns["model"], raising=False)
    data = pickle.dumps(ns["model"])  # a reference to __main__.model, as before
    assert b"_ShadowedFunctionRef" in data
    assert pickle.loads(data).func is ns["model"].func


def test_copies_share_the_function_and_do_not_pickle_it(monkeypatch):
    ns = _main_namespace(MAIN_MODEL)
    monkeypatch.setattr(wrapping, "_by_value", None)  # any pickling of the function would fail
    bound = ns["model"].bind(scale=3.0)
    for clone in (copy.copy(bound), copy.deepcopy(bound)):
        assert clone.func is ns["model"].func and clone.func_kwargs == {"scale": 3.0}
    deep = copy.deepcopy(bound)
    deep.func_kwargs["scale"] = 4.0
    assert bound.func_kwargs == {"scale": 3.0}


def test_defined_in_main():
    ns = _main_namespace(MAIN_MODEL + "class Thing:\n    pass\n")
    assert wrapping.defined_in_main(ns["model"].func)
    assert wrapping.defined_in_main(functools.partial(ns["model"].func, scale=2.0))
    assert wrapping.defined_in_main(ns["Thing"]()) and wrapping.defined_in_main(ns["Thing"])
    assert not wrapping.defined_in_main(core_objectives.square)


@pytest.mark.timeout(60)
def test_decorated_wrappers_run_in_a_process_pool():
    with ProcessPoolExecutor(max_workers=1) as pool:
        loss_future = pool.submit(
            core_objectives.call_in_worker,
            core_objectives.decorated_loss,
            {"x": -3.0},
            EvaluateContext(),
        )
        computer_future = pool.submit(
            core_objectives.call_in_worker,
            core_objectives.decorated_energy.bind(offset=1.0),
            {"x": 1.0},
            EvaluateContext(),
        )
        value, state = loss_future.result(timeout=50)
        quantities, computer_state = computer_future.result(timeout=50)
    assert value == 3.0
    assert state["loss"] == 3.0
    assert state["meta"] == {"decorated": True}
    assert quantities == {"energy": 2.0}
    assert computer_state["quantities"] == {"energy": 2.0}


def test_repr_names_the_function():
    text = repr(WrappedQuantityComputer(core_objectives.energy).bind(2.0))
    assert "WrappedQuantityComputer(energy" in text
    assert "(2.0,)" in text
