"""Turn plain functions into objectives and quantity computers.

:class:`WrappedObjectiveFunctor` and :class:`WrappedQuantityComputer` call
``func(parameters, *func_args, **func_kwargs)``, adding ``ctx=`` as a keyword when
``pass_ctx`` is true. :meth:`~WrappedObjectiveFunctor.bind` returns a new wrapper with more
arguments; binding accumulates. The decorators :func:`to_objective_functor` and
:func:`to_quantity_computer` work with and without parentheses.

A wrapper is picklable whenever its function is. A function defined in ``__main__`` (a notebook
cell or the script being run), which no other process can import, travels by value: as
cloudpickle bytes that plain :mod:`pickle` carries too, so it works on stdlib process pools,
loky, ipyparallel, Dask and MPI alike and never resolves a stale same-named object in a
long-lived worker's ``__main__``. Without cloudpickle, or for an importable module, a function
decorated in place (so that its module name now refers to the wrapper) is pickled by reference
to that name.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import logging
import pickle
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from chemfit.core.context import EvaluateContext
from chemfit.core.objectives import ObjectiveFunctor, QuantityComputer, ensure_context

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "WrappableObjFunction",
    "WrappableQuantFunction",
    "WrappedObjectiveFunctor",
    "WrappedQuantityComputer",
    "defined_in_main",
    "dumps_by_value",
    "functions_inline",
    "to_objective_functor",
    "to_quantity_computer",
]

logger = logging.getLogger(__name__)

WrappableObjFunction = Callable[[dict], float] | Callable[[dict, EvaluateContext], float]
WrappableQuantFunction = Callable[..., dict]


# While cloudpickle pickles in this thread, wrappers leave their functions to it (it sends
# ``__main__`` functions by value, each once per pickle); this also ends the recursion of a
# function whose globals hold its own wrapper.
_inline = threading.local()


@contextlib.contextmanager
def functions_inline() -> Iterator[None]:
    """Within this block, wrappers pickle their functions as they are (no nested bytes).

    For picklers that send ``__main__`` functions by value themselves (cloudpickle), and for
    probing with plain :mod:`pickle` whether an object refers to ``__main__`` by name.
    """
    depth = getattr(_inline, "depth", 0)
    _inline.depth = depth + 1
    try:
        yield
    finally:
        _inline.depth = depth


def dumps_by_value(obj: Any, protocol: int | None = pickle.HIGHEST_PROTOCOL) -> bytes:
    """``cloudpickle.dumps(obj)``, with wrappers in ``obj`` sending their functions inline.

    ``pickle.loads`` rebuilds it wherever chemfit and cloudpickle are installed.

    Raises
    ------
    ImportError
        When cloudpickle is not installed.

    Examples
    --------
    >>> square = WrappedObjectiveFunctor(lambda p: p["x"] ** 2)
    >>> pickle.loads(dumps_by_value(square))({"x": 3.0})
    9.0
    """
    import cloudpickle

    with functions_inline():
        return cloudpickle.dumps(obj, protocol=protocol)


def defined_in_main(obj: Any) -> bool:
    """Whether ``obj`` (a function, class, instance or ``functools.partial``) comes from
    ``__main__``: a notebook cell or the script being run, which other processes cannot import.

    Examples
    --------
    >>> import functools
    >>> defined_in_main(len), defined_in_main(functools.partial(len))
    (False, False)
    """
    if isinstance(obj, functools.partial):
        return defined_in_main(obj.func)
    return getattr(obj, "__module__", None) == "__main__"


class _FunctionByValue:
    """Pickle stand-in for a ``__main__`` function: its cloudpickle bytes."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def resolve(self) -> Callable[..., Any]:
        return pickle.loads(self.data)


class _ShadowedFunctionRef:
    """Pickle stand-in for a module-level function whose name now refers to its wrapper."""

    def __init__(self, module: str, qualname: str) -> None:
        self.module = module
        self.qualname = qualname

    def resolve(self) -> Callable[..., Any]:
        obj: Any = importlib.import_module(self.module)
        for part in self.qualname.split("."):
            obj = getattr(obj, part)
        return obj.func if isinstance(obj, _FunctionWrapper) else obj


def _shadowed_reference(func: Any) -> _ShadowedFunctionRef | None:
    """A reference to ``func`` through the wrapper that took its module-level name, if any."""
    module_name = getattr(func, "__module__", None)
    qualname = getattr(func, "__qualname__", None)
    if not module_name or not qualname or "<locals>" in qualname:
        return None
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        return None
    if obj is not func and isinstance(obj, _FunctionWrapper) and obj.func is func:
        return _ShadowedFunctionRef(module_name, qualname)
    return None


def _by_value(func: Callable[..., Any]) -> bytes | None:
    """``func`` as cloudpickle bytes; ``None`` without cloudpickle or when it cannot pickle it
    (then the caller falls back to a reference by name, which works on forked workers)."""
    try:
        return dumps_by_value(func)
    except ImportError:
        return None
    except Exception:
        logger.debug("cloudpickle could not pickle %r; sending it by name", func, exc_info=True)
        return None


class _FunctionWrapper:
    """Shared state and behaviour of the two wrappers: the function and its bound arguments."""

    func: Callable[..., Any]
    pass_ctx: bool
    func_args: tuple
    func_kwargs: dict
    static_meta_data: dict

    def _init_wrapper(
        self,
        func: Callable[..., Any],
        pass_ctx: bool,
        func_args: tuple | None,
        func_kwargs: dict | None,
    ) -> None:
        if not callable(func):
            raise TypeError(
                f"func must be callable, got {func!r} ({type(func).__name__}); "
                "pass the function to wrap"
            )
        self.func = func
        self.pass_ctx = bool(pass_ctx)
        self.func_args = tuple(func_args) if func_args is not None else ()
        self.func_kwargs = dict(func_kwargs) if func_kwargs is not None else {}

    def bind(self, /, *args: Any, **kwargs: Any) -> Self:
        """A new wrapper with more arguments bound.

        Positional arguments are appended to the bound ones and keywords update them (later
        keywords win). ``pass_ctx`` is kept and ``static_meta_data`` is copied.

        Returns
        -------
        Self
            A new wrapper of the same type; ``self`` is unchanged.

        Examples
        --------
        >>> q = WrappedQuantityComputer(lambda p, *args, **kwargs: {"args": args, **kwargs})
        >>> bound = q.bind(1).bind(b=2).bind(3, b=4)
        >>> bound.func_args, bound.func_kwargs, q.func_args
        ((1, 3), {'b': 4}, ())
        """
        new = copy.copy(self)
        new.func_args = (*self.func_args, *args)
        new.func_kwargs = {**self.func_kwargs, **kwargs}
        new.static_meta_data = copy.deepcopy(self.static_meta_data)
        return new

    def _call_func(self, parameters: dict, ctx: EvaluateContext) -> Any:
        if self.pass_ctx:
            return self.func(parameters, *self.func_args, **self.func_kwargs, ctx=ctx)
        return self.func(parameters, *self.func_args, **self.func_kwargs)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        func = self.func
        if defined_in_main(func):
            if getattr(_inline, "depth", 0):
                return state
            data = _by_value(func)
            if data is not None:
                state["func"] = _FunctionByValue(data)
                return state
        ref = _shadowed_reference(func)
        if ref is not None:
            state["func"] = ref
        return state

    def __setstate__(self, state: dict) -> None:
        func = state.get("func")
        if isinstance(func, (_ShadowedFunctionRef, _FunctionByValue)):
            state = {**state, "func": func.resolve()}
        self.__dict__.update(state)

    # Copies share the function (as before); only pickling sends it by value.
    def __copy__(self) -> Self:
        new = type(self).__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

    def __deepcopy__(self, memo: dict) -> Self:
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    def __repr__(self) -> str:
        name = getattr(self.func, "__qualname__", repr(self.func))
        return (
            f"{type(self).__name__}({name}, pass_ctx={self.pass_ctx}, "
            f"func_args={self.func_args!r}, func_kwargs={self.func_kwargs!r})"
        )


class WrappedObjectiveFunctor(_FunctionWrapper, ObjectiveFunctor):
    """An objective made from a function ``func(parameters, *func_args, **func_kwargs)``.

    Parameters
    ----------
    func : callable
        Returns the loss. Called with ``ctx=`` as an extra keyword when ``pass_ctx`` is true.
    pass_ctx : bool, default False
        Whether ``func`` receives the evaluation context as the keyword ``ctx``.
    func_args : tuple, optional
        Extra positional arguments, passed after ``parameters``.
    func_kwargs : dict, optional
        Extra keyword arguments.

    Attributes
    ----------
    static_meta_data : dict
        Merged into ``ctx.meta`` before every call.

    Examples
    --------
    >>> def distance(parameters, target):
    ...     return abs(parameters["x"] - target)
    >>> objective = WrappedObjectiveFunctor(distance).bind(target=1.0)
    >>> ctx = EvaluateContext()
    >>> objective({"x": 3.0}, ctx), ctx.loss, ctx.parameters
    (2.0, 2.0, {'x': 3.0})
    """

    def __init__(
        self,
        func: WrappableObjFunction | Callable[..., Any],
        pass_ctx: bool = False,
        func_args: tuple | None = None,
        func_kwargs: dict | None = None,
    ) -> None:
        self._init_wrapper(func, pass_ctx, func_args, func_kwargs)
        self.static_meta_data: dict = {}

    def __call__(self, parameters: dict, ctx: EvaluateContext | None = None) -> float:
        ctx = ensure_context(ctx)
        ctx.parameters = parameters
        ctx.meta.update(self.static_meta_data)
        loss = self._call_func(parameters, ctx)
        ctx.loss = loss
        return loss


class WrappedQuantityComputer(_FunctionWrapper, QuantityComputer):
    """A quantity computer made from a function returning a dict of quantities.

    Takes the same arguments as :class:`WrappedObjectiveFunctor`; the result goes to
    ``ctx.quantities``.

    Examples
    --------
    >>> def energy(parameters, scale=1.0):
    ...     return {"energy": scale * parameters["x"] ** 2}
    >>> computer = WrappedQuantityComputer(energy).bind(scale=2.0)
    >>> computer({"x": 3.0})
    {'energy': 18.0}
    >>> objective = computer.with_loss(lambda q, target: (q["energy"] - target) ** 2, target=17.0)
    >>> objective({"x": 3.0})
    1.0
    """

    def __init__(
        self,
        func: WrappableQuantFunction,
        pass_ctx: bool = False,
        func_args: tuple | None = None,
        func_kwargs: dict | None = None,
    ) -> None:
        QuantityComputer.__init__(self)
        self._init_wrapper(func, pass_ctx, func_args, func_kwargs)

    def _compute(self, parameters: dict, ctx: EvaluateContext) -> dict:
        return self._call_func(parameters, ctx)


def to_objective_functor(
    pass_ctx: bool | Callable[..., Any] = False,
) -> Any:
    """Decorator turning a function into a :class:`WrappedObjectiveFunctor`.

    Use ``@to_objective_functor()``, ``@to_objective_functor(pass_ctx=True)`` or the bare
    ``@to_objective_functor``.

    Examples
    --------
    >>> @to_objective_functor(pass_ctx=True)
    ... def loss(parameters, ctx):
    ...     ctx.meta["seen"] = True
    ...     return parameters["x"] ** 2
    >>> ctx = EvaluateContext()
    >>> loss({"x": 2.0}, ctx), ctx.meta
    (4.0, {'seen': True})
    >>> @to_objective_functor
    ... def plain(parameters):
    ...     return parameters["x"]
    >>> plain({"x": 1.5})
    1.5
    """
    if callable(pass_ctx) and not isinstance(pass_ctx, bool):
        return WrappedObjectiveFunctor(pass_ctx)

    def decorate(func: Callable[..., Any]) -> WrappedObjectiveFunctor:
        return WrappedObjectiveFunctor(func, pass_ctx=bool(pass_ctx))

    return decorate


def to_quantity_computer(
    pass_ctx: bool | Callable[..., Any] = False,
) -> Any:
    """Decorator turning a function into a :class:`WrappedQuantityComputer`.

    Use ``@to_quantity_computer()``, ``@to_quantity_computer(pass_ctx=True)`` or the bare
    ``@to_quantity_computer``.

    Examples
    --------
    >>> @to_quantity_computer
    ... def energy(parameters, offset=0.0):
    ...     return {"energy": parameters["x"] + offset}
    >>> objective = energy.bind(offset=1.0).with_loss(lambda q, target: q["energy"] - target, target=1.0)
    >>> objective({"x": 2.0})
    2.0
    """
    if callable(pass_ctx) and not isinstance(pass_ctx, bool):
        return WrappedQuantityComputer(pass_ctx)

    def decorate(func: Callable[..., Any]) -> WrappedQuantityComputer:
        return WrappedQuantityComputer(func, pass_ctx=bool(pass_ctx))

    return decorate
