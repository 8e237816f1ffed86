"""Nested parameter dicts and their flat, dot-separated views.

Parameters and bounds may be nested dicts; optimisers work on flat vectors. A nested dict
``{"lj": {"eps": 1.0}}`` has the flat key ``"lj.eps"``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["SEPARATOR", "flatten_dict", "unflatten_dict"]

SEPARATOR = "."


def flatten_dict(nested: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten a nested mapping to ``{"a.b": leaf}``, in insertion order.

    Examples
    --------
    >>> flatten_dict({"lj": {"eps": 1.0, "sigma": 2.0}, "k": 3})
    {'lj.eps': 1.0, 'lj.sigma': 2.0, 'k': 3}
    """
    flat: dict[str, Any] = {}
    for key, value in nested.items():
        if not isinstance(key, str):
            raise TypeError(
                f"parameter keys must be str, got {key!r} ({type(key).__name__}); rename it"
            )
        if SEPARATOR in key:
            raise ValueError(
                f"parameter key {key!r} contains {SEPARATOR!r}, which separates nested keys; "
                "nest the dict instead or rename the key"
            )
        full = f"{prefix}{SEPARATOR}{key}" if prefix else key
        if isinstance(value, Mapping):
            flat.update(flatten_dict(value, full))
        else:
            flat[full] = value
    return flat


def unflatten_dict(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Rebuild a nested dict from flat dot-separated keys.

    Examples
    --------
    >>> unflatten_dict({"lj.eps": 1.0, "lj.sigma": 2.0, "k": 3})
    {'lj': {'eps': 1.0, 'sigma': 2.0}, 'k': 3}
    """
    nested: dict[str, Any] = {}
    for flat_key, value in flat.items():
        *parents, leaf = flat_key.split(SEPARATOR)
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested
