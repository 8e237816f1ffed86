"""Objective functions and quantity computers.

An *objective* maps a parameter dict to a scalar loss and records what it did in an
:class:`~chemfit.core.context.EvaluateContext`. A *quantity computer* maps parameters to a dict
of computed quantities (energies, forces, ...); :meth:`QuantityComputer.with_loss` turns it into
an objective by attaching a loss function.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import partial
from typing import Any

from chemfit.core.context import EvaluateContext

__all__ = ["ObjectiveFunctor", "QuantityComputer", "QuantityComputerObjectiveFunction"]


def ensure_context(ctx: EvaluateContext | None) -> EvaluateContext:
    """Return ``ctx``, or a new context when it is ``None`` (the objective protocol)."""
    return EvaluateContext() if ctx is None else ctx


class ObjectiveFunctor:
    """Base class of objective functions.

    A subclass implements ``__call__(parameters, ctx=None) -> float``: it creates a context when
    ``ctx`` is ``None``, sets ``ctx.parameters`` and ``ctx.loss``, and returns the loss.
    Inheriting is optional: any callable with that signature is an objective.
    """

    def __call__(self, parameters: dict, ctx: EvaluateContext | None = None) -> float:
        raise NotImplementedError(
            f"{type(self).__name__} must implement __call__(parameters, ctx=None) -> float"
        )


def _loss_takes_parameters(loss_function: Callable[..., Any]) -> bool:
    """Whether ``loss_function`` must be called as ``(quantities, parameters)``.

    Decided by signature binding, never by catching a ``TypeError`` from a call, so that a
    ``TypeError`` raised inside the loss propagates unchanged (R5).
    """
    try:
        signature = inspect.signature(loss_function)
    except (TypeError, ValueError):  # builtins without a signature take (quantities)
        return False
    try:
        signature.bind({})
        return False
    except TypeError:
        pass
    try:
        signature.bind({}, {})
        return True
    except TypeError:
        return False


def call_loss(loss_function: Callable[..., Any], quantities: dict, parameters: dict) -> Any:
    """Call a loss function as ``(quantities)`` or ``(quantities, parameters)``."""
    if _loss_takes_parameters(loss_function):
        return loss_function(quantities, parameters)
    return loss_function(quantities)


class QuantityComputer:
    """Computes a dict of quantities from parameters.

    Subclasses implement :meth:`_compute`. The static meta data is merged into ``ctx.meta`` on
    every call.

    Examples
    --------
    >>> class Square(QuantityComputer):
    ...     def _compute(self, parameters, ctx):
    ...         return {"y": parameters["x"] ** 2}
    >>> objective = Square().with_loss(lambda q, target: (q["y"] - target) ** 2, target=4.0)
    >>> objective({"x": 3.0})
    25.0
    """

    def __init__(self) -> None:
        self.static_meta_data: dict = {}

    def __call__(self, parameters: dict, ctx: EvaluateContext | None = None) -> dict:
        ctx = ensure_context(ctx)
        ctx.parameters = parameters
        ctx.meta.update(self.static_meta_data)
        ctx.quantities = self._compute(parameters, ctx)
        return ctx.quantities

    def _compute(self, parameters: dict, ctx: EvaluateContext) -> dict:
        raise NotImplementedError(
            f"{type(self).__name__} must implement _compute(parameters, ctx) -> dict"
        )

    def with_loss(
        self, loss_function: Callable[..., Any], /, **kwargs: Any
    ) -> QuantityComputerObjectiveFunction:
        """An objective that computes the quantities and applies ``loss_function`` to them.

        ``kwargs`` are bound to the loss function as keywords.
        """
        loss = partial(loss_function, **kwargs) if kwargs else loss_function
        return QuantityComputerObjectiveFunction(loss, self)


class QuantityComputerObjectiveFunction(ObjectiveFunctor):
    """An objective made of a quantity computer and a loss function.

    The loss function is called as ``loss(quantities)`` or ``loss(quantities, parameters)``,
    chosen by signature binding.

    Examples
    --------
    >>> from chemfit.wrap_funcs import WrappedQuantityComputer
    >>> computer = WrappedQuantityComputer(lambda p: {"e": 2 * p["a"]})
    >>> objective = QuantityComputerObjectiveFunction(lambda q: q["e"] ** 2, computer)
    >>> objective({"a": 1.5})
    9.0
    """

    def __init__(
        self, loss_function: Callable[..., Any], quantity_computer: Callable[..., dict]
    ) -> None:
        self.loss_function = loss_function
        self.quantity_computer = quantity_computer
        self.static_meta_data: dict = {}

    def __call__(self, parameters: dict, ctx: EvaluateContext | None = None) -> float:
        ctx = ensure_context(ctx)
        quantities = self.quantity_computer(parameters, ctx)
        ctx.meta.update(self.static_meta_data)
        loss = call_loss(self.loss_function, quantities, parameters)
        ctx.parameters = parameters
        ctx.loss = loss
        return loss
