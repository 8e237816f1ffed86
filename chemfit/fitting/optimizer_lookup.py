"""Finding optimizers: nevergrad registry look-up with suggestions, scipy method capabilities.

nevergrad and scipy are imported on first use.
"""

from __future__ import annotations

import difflib
from typing import Any

from chemfit.core.exceptions import UnknownOptimizerError

__all__ = [
    "SCIPY_METHODS",
    "SCIPY_METHODS_WITHOUT_BOUNDS",
    "check_scipy_method",
    "closest_names",
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

#: The ``scipy.optimize.minimize`` methods, spelled as scipy's documentation spells them.
SCIPY_METHODS = (
    "Nelder-Mead",
    "Powell",
    "CG",
    "BFGS",
    "Newton-CG",
    "L-BFGS-B",
    "TNC",
    "COBYLA",
    "COBYQA",
    "SLSQP",
    "trust-constr",
    "dogleg",
    "trust-ncg",
    "trust-exact",
    "trust-krylov",
)

_COMMON_CHOICES = "NgIohTuned, NGOpt, OnePlusOne, CMA, TwoPointsDE"


def closest_names(name: str, names: list[str], *, ignore_case: bool = False) -> list[str]:
    """Up to five of ``names`` close to ``name``: those equal but for case first, then by
    similarity (``difflib``). With ``ignore_case`` the similarity ignores case too.

    Examples
    --------
    >>> closest_names("oneplusone", ["OnePlusOne", "TwoPointsDE"])
    ['OnePlusOne']
    >>> closest_names("l-bfgs", ["BFGS", "L-BFGS-B", "TNC"], ignore_case=True)
    ['L-BFGS-B', 'BFGS']
    """
    by_case = [n for n in names if n.lower() == name.lower()]
    if ignore_case:
        lowered = {n.lower(): n for n in names}
        similar = [
            lowered[n] for n in difflib.get_close_matches(name.lower(), list(lowered), 5, 0.5)
        ]
    else:
        similar = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    return (by_case + [n for n in similar if n not in by_case])[:5]


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
    close = closest_names(name, list(registry))
    suggestion = (
        f"closest names: {', '.join(close)}" if close else f"common choices: {_COMMON_CHOICES}"
    )
    raise UnknownOptimizerError(
        f"optimizer_str {name!r} is not in nevergrad.optimizers.registry ({suggestion}); "
        "pass one of its keys"
    )


def _scipy_methods() -> tuple[str, ...]:
    """The methods this scipy's ``minimize`` knows (``COBYQA`` needs scipy 1.14)."""
    try:
        from scipy.optimize._minimize import MINIMIZE_METHODS  # scipy's own list, lower case
    except ImportError:  # a future scipy that moved it: trust our list
        return SCIPY_METHODS
    known = {name.lower() for name in MINIMIZE_METHODS}
    return tuple(name for name in SCIPY_METHODS if name.lower() in known)


def check_scipy_method(method: Any) -> None:
    """Check ``method`` for ``scipy.optimize.minimize`` before anything runs.

    A method name is matched without regard to case, as scipy does. A callable (a custom
    minimizer) and ``None`` (scipy chooses) are accepted as they are.

    Raises
    ------
    ValueError
        When ``method`` names no ``minimize`` method; the message lists the closest names and
        every valid one.
    TypeError
        When ``method`` is neither a string, a callable nor ``None``.

    Examples
    --------
    >>> check_scipy_method("nelder-mead")
    >>> check_scipy_method("L-BFGS")
    Traceback (most recent call last):
    ...
    ValueError: method 'L-BFGS' is not a scipy.optimize.minimize method (closest names: L-BFGS-B, BFGS); valid methods: Nelder-Mead, Powell, CG, BFGS, Newton-CG, L-BFGS-B, TNC, COBYLA, COBYQA, SLSQP, trust-constr, dogleg, trust-ncg, trust-exact, trust-krylov, or a callable (a custom minimizer)
    """
    if method is None or callable(method):
        return
    if not isinstance(method, str):
        raise TypeError(
            f"method must be the name of a scipy.optimize.minimize method or a callable, got "
            f"{method!r:.60} ({type(method).__name__}); e.g. method='L-BFGS-B'"
        )
    methods = _scipy_methods()
    if method.lower() in {name.lower() for name in methods}:
        return
    close = closest_names(method, list(methods), ignore_case=True)
    suggestion = f" (closest names: {', '.join(close)})" if close else ""
    raise ValueError(
        f"method {method!r} is not a scipy.optimize.minimize method{suggestion}; valid "
        f"methods: {', '.join(methods)}, or a callable (a custom minimizer)"
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
