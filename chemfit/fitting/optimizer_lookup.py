"""Finding optimizers: nevergrad registry look-up with suggestions, scipy method capabilities.

nevergrad and scipy are imported on first use.
"""

from __future__ import annotations

import difflib
from typing import Any

from chemfit.core.exceptions import UnknownOptimizerError

__all__ = [
    "SCIPY_METHODS_WITHOUT_BOUNDS",
    "delegates_to_scipy",
    "drops_early_tells",
    "nevergrad_optimizer_class",
    "scipy_ignores_bounds",
    "scipy_method_name",
]

#: ``scipy.optimize.minimize`` methods that ignore bounds (scipy only warns about them).
SCIPY_METHODS_WITHOUT_BOUNDS = frozenset(
    {"cg", "bfgs", "newton-cg", "dogleg", "trust-ncg", "trust-exact", "trust-krylov"}
)

_COMMON_CHOICES = "NgIohTuned, NGOpt, OnePlusOne, CMA, TwoPointsDE"


def nevergrad_optimizer_class(name: Any) -> Any:
    """The optimizer class registered under ``name`` in ``nevergrad.optimizers.registry``.

    Raises
    ------
    TypeError
        When ``name`` is not a string.
    UnknownOptimizerError
        When no optimizer has that name; the message lists the closest names (a match that
        differs only in case first) or, without any, some common choices.

    Examples
    --------
    >>> nevergrad_optimizer_class("OnePlusOne") is not None
    True
    >>> try:
    ...     nevergrad_optimizer_class("oneplusone")
    ... except UnknownOptimizerError as exc:
    ...     print("closest names: OnePlusOne" in str(exc))
    True
    """
    import nevergrad as ng

    registry = ng.optimizers.registry
    if not isinstance(name, str):
        raise TypeError(
            f"optimizer_str must be the name of a nevergrad optimizer, got {name!r} "
            f"({type(name).__name__})"
        )
    if name in registry:
        return registry[name]
    names = list(registry)
    by_case = [n for n in names if n.lower() == name.lower()]
    close = by_case + [
        n for n in difflib.get_close_matches(name, names, n=5, cutoff=0.5) if n not in by_case
    ]
    suggestion = (
        f"closest names: {', '.join(close)}" if close else f"common choices: {_COMMON_CHOICES}"
    )
    raise UnknownOptimizerError(
        f"optimizer_str {name!r} is not in nevergrad.optimizers.registry ({suggestion}); "
        "pass one of its keys"
    )


def scipy_ignores_bounds(method: Any) -> bool:
    """Whether ``scipy.optimize.minimize(method=method)`` ignores ``bounds=``.

    A callable (custom minimizer) receives the bounds and decides itself, so it does not count.
    COBYLA supports bounds from scipy 1.11 on and Nelder-Mead from 1.7 on.

    Examples
    --------
    >>> scipy_ignores_bounds("BFGS"), scipy_ignores_bounds("L-BFGS-B")
    (True, False)
    """
    if not isinstance(method, str):
        return False  # a custom minimizer: it receives bounds and decides itself
    name = method.lower()
    if name in SCIPY_METHODS_WITHOUT_BOUNDS:
        return True
    import scipy

    major_minor = tuple(int(part) for part in scipy.__version__.split(".")[:2])
    return (name == "cobyla" and major_minor < (1, 11)) or (
        name == "nelder-mead" and major_minor < (1, 7)
    )


def scipy_method_name(method: Any) -> str:
    """The name of a ``minimize`` method: the string itself, or a custom minimizer's name.

    Examples
    --------
    >>> def my_minimizer(fun, x0, args, **options): ...
    >>> scipy_method_name("Powell"), scipy_method_name(my_minimizer)
    ('Powell', 'my_minimizer')
    """
    return method if isinstance(method, str) else getattr(method, "__name__", "custom")


def delegates_to_scipy(optimizer: Any) -> bool:
    """Whether a nevergrad optimizer runs a scipy minimiser in a thread (a "recast" optimizer).

    Meta-optimizers such as ``NgIohTuned`` choose sub-optimizers; this walks that tree. In
    nevergrad 1.0, such optimizers hang in ``ask()`` once they have been told points they did
    not propose, so the Fitter never replays observations into them.

    Examples
    --------
    >>> import nevergrad as ng
    >>> space = ng.p.Dict(x=ng.p.Scalar(0.0, lower=-1, upper=1), y=ng.p.Scalar(0.0))
    >>> delegates_to_scipy(ng.optimizers.registry["Cobyla"](space, budget=10))
    True
    >>> delegates_to_scipy(ng.optimizers.registry["OnePlusOne"](space, budget=10))
    False
    """
    from nevergrad.optimization.recaster import SequentialRecastOptimizer

    seen: list[Any] = []
    pending = [optimizer]
    while pending:
        current = pending.pop()
        if any(current is other for other in seen):
            continue
        seen.append(current)
        if isinstance(current, SequentialRecastOptimizer):
            return True
        inner = getattr(current, "optim", None)  # NGOpt-style selection (lazy property)
        if inner is not None:
            pending.append(inner)
        pending.extend(getattr(current, "optimizers", None) or [])  # chains and portfolios
    return False


def drops_early_tells(optimizer: Any) -> bool:
    """Whether a nevergrad optimizer runs CMA, which drops points told before its first ask.

    With cma 4.x, ``tell`` before the first ``ask`` fails inside cma and nevergrad 1.0 swallows
    the error, so observations replayed into a fresh CMA are silently lost. This follows the
    optimizer's selection (``NGOpt``-style ``optim``), not portfolios, whose other members do
    learn from the points.

    Examples
    --------
    >>> import nevergrad as ng
    >>> space = ng.p.Dict(x=ng.p.Scalar(0.0, lower=-1, upper=1), y=ng.p.Scalar(0.0))
    >>> drops_early_tells(ng.optimizers.registry["CMA"](space, budget=10))
    True
    >>> drops_early_tells(ng.optimizers.registry["OnePlusOne"](space, budget=10))
    False
    """
    from nevergrad.optimization.optimizerlib import _CMA

    current, seen = optimizer, []
    while current is not None and not any(current is other for other in seen):
        if isinstance(current, _CMA):
            return True
        seen.append(current)
        current = getattr(current, "optim", None)
    return False
