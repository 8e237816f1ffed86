"""The fitted parameters and their bounds: validation, flat forms and optimizer encodings.

Parameters and bounds may be nested dicts; flat keys join the levels with ``"."``. Bounds leaves
are ``(lower, upper)`` pairs whose sides may be ``None`` (an infinite side is no bound either).
"""

from __future__ import annotations

import copy
import logging
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from chemfit.core.flatdict import flatten_dict, unflatten_dict
from chemfit.fitting.fitter_context import describe_bad_loss
from chemfit.fitting.observations import parameter_mismatch

__all__ = [
    "FlatBounds",
    "bounded_keys",
    "float_tree",
    "is_real",
    "nested_floats",
    "nevergrad_parametrization",
    "outside_bounds",
    "scipy_bounds",
    "usable_observations",
    "validate_parameters",
]

logger = logging.getLogger(__name__)

#: Flat bounds: ``{flat key: (lower or None, upper or None)}``.
FlatBounds = dict[str, tuple[float | None, float | None]]


def is_real(value: Any) -> bool:
    """Whether ``value`` is a real number and not a bool.

    Examples
    --------
    >>> is_real(1), is_real(2.5), is_real(True), is_real("1")
    (True, True, False, False)
    """
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def float_tree(nested: Any) -> Any:
    """A copy of nested parameters with every leaf as a Python ``float`` where possible.

    Examples
    --------
    >>> import numpy as np
    >>> float_tree({"a": {"b": np.float32(0.5)}, "c": 2})
    {'a': {'b': 0.5}, 'c': 2.0}
    """
    if type(nested) is float:  # the common leaf, without the ABC checks below
        return nested
    if isinstance(nested, Mapping):
        return {key: float_tree(value) for key, value in nested.items()}
    if is_real(nested) or describe_bad_loss(nested) is None:
        return float(nested)
    return copy.deepcopy(nested)


def nested_floats(items: Iterable[tuple[str, Any]]) -> dict:
    """Nested parameters of Python floats from ``(flat key, value)`` pairs.

    Examples
    --------
    >>> nested_floats(zip(["a.b", "c"], [1, 2]))
    {'a': {'b': 1.0}, 'c': 2.0}
    """
    return unflatten_dict({key: float(value) for key, value in items})


def validate_parameters(initial_params: Any, bounds: Any) -> tuple[dict[str, float], FlatBounds]:
    """Flat initial values and flat bounds, or the ``TypeError``/``ValueError`` the contract names.

    Raises
    ------
    TypeError
        ``initial_params`` is not a mapping, a leaf is not a real number, or a bounds leaf is
        not a pair of numbers or ``None``.
    ValueError
        No parameters, a non-finite start value, a bounds key that is not a parameter, a NaN
        side, ``lower >= upper``, or a start value outside its bounds (R16).

    Examples
    --------
    >>> validate_parameters({"a": {"b": 1}}, {"a": {"b": (0, None)}})
    ({'a.b': 1.0}, {'a.b': (0.0, None)})
    >>> validate_parameters({"x": 5.0}, {"x": (0, 1)})
    Traceback (most recent call last):
    ...
    ValueError: the initial value of 'x' is 5.0, outside its bounds (0.0, 1.0); move it inside the bounds or widen them
    """
    if not isinstance(initial_params, Mapping):
        raise TypeError(
            f"initial_params must be a (nested) dict of numbers, got "
            f"{type(initial_params).__name__}: {initial_params!r:.80}"
        )
    flat = flatten_dict(initial_params)
    if not flat:
        raise ValueError("initial_params is empty; give at least one parameter to fit")
    values: dict[str, float] = {}
    for key, value in flat.items():
        if not is_real(value):
            raise TypeError(
                f"initial_params[{key!r}] must be a real number, got {value!r} "
                f"({type(value).__name__}); use a float"
            )
        if not math.isfinite(value):
            raise ValueError(f"initial_params[{key!r}] is {value}; give a finite start value")
        values[key] = float(value)

    if bounds is None:
        bounds = {}
    if not isinstance(bounds, Mapping):
        raise TypeError(
            f"bounds must be a (nested) dict of (lower, upper) pairs or None, got "
            f"{type(bounds).__name__}: {bounds!r:.80}"
        )
    flat_bounds: FlatBounds = {}
    for key, pair in flatten_dict(bounds).items():
        if key not in values:
            raise ValueError(
                f"bounds key {key!r} is not a parameter; the parameters are {list(values)}. "
                "Nest the bounds like initial_params"
            )
        if isinstance(pair, (str, bytes)) or not isinstance(pair, (Sequence, Iterable)):
            raise TypeError(
                f"bounds[{key!r}] must be a (lower, upper) pair, got {pair!r}; "
                "use None for a missing side"
            )
        sides = list(pair)
        if len(sides) != 2:
            raise ValueError(
                f"bounds[{key!r}] must be a (lower, upper) pair, got {pair!r} with "
                f"{len(sides)} entries; use None for a missing side"
            )
        lower, upper = (_bound_side(key, side, name) for side, name in zip(sides, "lu"))
        if lower is not None and upper is not None and lower >= upper:
            raise ValueError(f"bounds[{key!r}] = {pair!r} has lower >= upper; give lower < upper")
        value = values[key]
        if (lower is not None and value < lower) or (upper is not None and value > upper):
            raise ValueError(
                f"the initial value of {key!r} is {value}, outside its bounds "
                f"({lower}, {upper}); move it inside the bounds or widen them"
            )
        flat_bounds[key] = (lower, upper)
    return values, flat_bounds


def _bound_side(key: str, side: Any, which: str) -> float | None:
    name = "lower" if which == "l" else "upper"
    if side is None:
        return None
    if not is_real(side):
        raise TypeError(
            f"the {name} bound of {key!r} must be a real number or None, got {side!r} "
            f"({type(side).__name__})"
        )
    side = float(side)
    if math.isnan(side):
        raise ValueError(f"the {name} bound of {key!r} is NaN; use a number or None")
    if math.isinf(side):
        return None  # an infinite side is no bound
    return side


def outside_bounds(flat: Mapping[str, float], flat_bounds: Mapping[str, tuple]) -> str | None:
    """``"key=value is outside (lower, upper)"`` for the first value out of bounds, else ``None``.

    Examples
    --------
    >>> outside_bounds({"x": 2.0}, {"x": (None, 1.0)})
    'x=2.0 is outside (None, 1.0)'
    """
    for key, (lower, upper) in flat_bounds.items():
        value = flat[key]
        if (lower is not None and value < lower) or (upper is not None and value > upper):
            return f"{key}={value} is outside ({lower}, {upper})"
    return None


def bounded_keys(flat_bounds: Mapping[str, tuple]) -> list[str]:
    """The keys with at least one finite bound.

    Examples
    --------
    >>> bounded_keys({"a": (None, None), "b": (0.0, None)})
    ['b']
    """
    return [k for k, (lo, hi) in flat_bounds.items() if lo is not None or hi is not None]


def scipy_bounds(keys: Sequence[str], flat_bounds: Mapping[str, tuple]) -> list[tuple] | None:
    """``bounds=`` for ``scipy.optimize.minimize`` in the order of ``keys``, ``None`` if unbounded.

    Examples
    --------
    >>> scipy_bounds(["a", "b"], {"b": (0.0, None)})
    [(None, None), (0.0, None)]
    >>> scipy_bounds(["a"], {}) is None
    True
    """
    if not bounded_keys(flat_bounds):
        return None
    return [flat_bounds.get(key, (None, None)) for key in keys]


def nevergrad_parametrization(flat: Mapping[str, float], flat_bounds: Mapping[str, tuple]) -> Any:
    """A ``nevergrad.p.Dict`` of one bounded ``Scalar`` per flat key, starting at ``flat``.

    Examples
    --------
    >>> space = nevergrad_parametrization({"x": 1.0}, {"x": (0.0, 3.0)})
    >>> space.value
    {'x': 1.0}
    """
    import nevergrad as ng

    scalars = {}
    for key, value in flat.items():
        lower, upper = flat_bounds.get(key, (None, None))
        # Two-sided bounds also set sigma to a sixth of the width; one-sided ones only bound.
        scalars[key] = ng.p.Scalar(init=value, lower=lower, upper=upper)
    return ng.p.Dict(**scalars)


def usable_observations(
    observations: list, flat: Mapping[str, float], flat_bounds: Mapping[str, tuple]
) -> list[tuple[dict[str, float], Any]]:
    """The ``(flat values, loss)`` of the observations that fit the parameter space.

    Observations with non-finite values or values out of bounds are skipped with a WARNING.
    Observations made for other parameters (a history of another fit) raise one error naming
    the missing and extra names; ``load_observations(path, parameters=...,
    on_mismatch="common")`` keeps their common parameters instead.

    Raises
    ------
    ValueError
        An observation is not a ``(parameters, loss)`` pair, or observations have other
        parameters than ``flat``.
    TypeError
        Its parameters are not a dict.

    Examples
    --------
    >>> usable_observations([({"x": 0.5}, 1.0), ({"x": 9.0}, 0.0)], {"x": 0.0}, {"x": (0, 1)})
    [({'x': 0.5}, 1.0)]
    >>> usable_observations([({"y": 0.5}, 1.0)], {"x": 0.0}, {})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: initial_observations: 1 of 1 observations were made for other parameters than \
the fitted ones ['x']: missing ['x'] (fitted now, not in the observations), extra ['y'] (in \
the observations, not fitted now). To keep the common parameters, load them with ...
    """
    pairs = []
    for number, item in enumerate(observations):
        try:
            params, loss = item
        except (TypeError, ValueError):
            raise ValueError(
                f"initial_observations[{number}] must be a (parameters, loss) pair, got "
                f"{item!r:.80}"
            ) from None
        if not isinstance(params, Mapping):
            raise TypeError(
                f"initial_observations[{number}] parameters must be a dict, got "
                f"{type(params).__name__}"
            )
        pairs.append((flatten_dict(params), loss))
    source = getattr(observations, "path", None)
    mismatch = parameter_mismatch(
        (obs_flat for obs_flat, _ in pairs),
        flat,
        "initial_observations" if source is None else f"initial_observations from {source}",
        "To keep the common parameters, load them with load_observations(path, "
        "parameters=fitter.initial_parameters, on_mismatch='common'); or resume from a "
        "history of this fit.",
    )
    if mismatch is not None:
        raise ValueError(mismatch)
    usable = []
    for number, (obs_flat, loss) in enumerate(pairs):
        if not all(is_real(v) and math.isfinite(v) for v in obs_flat.values()):
            logger.warning(
                "skipping initial observation %d: non-numeric or non-finite parameter values %s",
                number,
                obs_flat,
            )
            continue
        values = {key: float(obs_flat[key]) for key in flat}
        outside = outside_bounds(values, flat_bounds)
        if outside is not None:
            logger.warning("skipping initial observation %d: %s", number, outside)
            continue
        usable.append((values, loss))
    return usable
