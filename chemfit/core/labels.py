"""Short, human labels for objectives: what each term of a combined objective is.

A live plot or a table of per-term losses needs a few characters per term. An objective can
say what it is in three ways, tried in this order:

1. an explicit name: a ``name`` or ``label`` attribute, or ``"name"``, ``"label"`` or ``"tag"``
   in its ``static_meta_data`` (the ASE computers put their structure's tag there);
2. the function it wraps and the arguments bound to it: ``dimer(r=3.2)`` for
   ``WrappedObjectiveFunctor(dimer).bind(r=3.2)``; for ``computer.with_loss(loss, **kwargs)``
   the computer's function and arguments, then the loss function's bound keywords;
3. for an instance of a user's class, its name and up to three of its public scalar attributes.

:func:`term_labels` labels a whole list of terms and keeps only what tells them apart: the
function name when all terms share it, and arguments with the same value in every term, are
dropped (``r=3.2``, ``r=3.4``, ...). Nothing here evaluates an objective.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["term_label", "term_labels"]

_EXPLICIT_KEYS = ("name", "label", "tag")
_MAX_TEXT = 24  # longer string arguments are left out of a label
_MAX_ATTRIBUTES = 3


@dataclass
class _Description:
    """What can be said about one objective: an explicit name, or a name and arguments."""

    explicit: str | None = None
    name: str | None = None
    args: list[tuple[str | None, str]] = field(default_factory=list)
    #: the loss's bound arguments (reference values), said only when ``args`` do not tell apart
    loss_args: list[tuple[str | None, str]] = field(default_factory=list)

    def text(
        self, keep_name: bool = True, drop: frozenset = frozenset(), with_loss: bool = True
    ) -> str:
        if self.explicit:
            return self.explicit
        pairs = self.args + self.loss_args if with_loss else self.args
        args = ", ".join(f"{k}={v}" if k else v for k, v in pairs if (k, v) not in drop)
        name = self.name if keep_name else None
        if name and args:
            return f"{name}({args})"
        return name or args


def _format(value: Any) -> str | None:
    """A short text for a scalar argument, or ``None`` for anything else."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        number = float(value)
        return f"{number:.4g}" if math.isfinite(number) else str(number)
    if isinstance(value, str) and 0 < len(value) <= _MAX_TEXT:
        return value
    return None


def _function_name(func: Any) -> str | None:
    while isinstance(func, functools.partial):
        func = func.func
    name = getattr(func, "__name__", None)
    if not isinstance(name, str) or name.startswith("<"):  # <lambda>
        return None
    return name


def _bound_args(args: Iterable[Any], kwargs: Mapping[str, Any]) -> list[tuple[str | None, str]]:
    out: list[tuple[str | None, str]] = []
    for value in args:
        text = _format(value)
        if text is not None:
            out.append((None, text))
    for key, value in kwargs.items():
        text = _format(value)
        if text is not None:
            out.append((str(key), text))
    return out


def _partial_args(func: Any) -> list[tuple[str | None, str]]:
    """The arguments bound by (nested) ``functools.partial`` objects, outermost last."""
    if not isinstance(func, functools.partial):
        return []
    return _partial_args(func.func) + _bound_args(func.args, func.keywords)


def _explicit_name(obj: Any) -> str | None:
    for attribute in ("name", "label"):
        value = getattr(obj, attribute, None)
        if isinstance(value, str) and value.strip():
            return value.strip()
    meta = getattr(obj, "static_meta_data", None)
    if isinstance(meta, Mapping):
        for key in _EXPLICIT_KEYS:
            value = meta.get(key)
            if isinstance(value, str) and value.strip() and value != "tag_None":
                return value.strip()
    return None


def _describe(obj: Any) -> _Description:
    explicit = _explicit_name(obj)
    if explicit:
        return _Description(explicit=explicit)
    computer = getattr(obj, "quantity_computer", None)
    loss = getattr(obj, "loss_function", None)
    if computer is not None and loss is not None:  # computer.with_loss(loss, **kwargs)
        inner = _describe(computer)
        if inner.explicit:
            return inner
        return _Description(
            name=inner.name or _function_name(loss),
            args=inner.args,
            loss_args=_partial_args(loss),
        )
    func = getattr(obj, "func", None)
    if callable(func) and hasattr(obj, "func_kwargs"):  # the wrappers of wrapping.py
        args = _partial_args(func) + _bound_args(
            getattr(obj, "func_args", ()), getattr(obj, "func_kwargs", {})
        )
        return _Description(name=_function_name(func), args=args)
    if isinstance(obj, functools.partial):
        return _Description(name=_function_name(obj), args=_partial_args(obj))
    terms = getattr(obj, "objective_functions", None)
    if isinstance(terms, list):  # a nested combined objective
        return _Description(name=f"combined ({len(terms)} terms)")
    if hasattr(obj, "__code__") or isinstance(obj, type):  # a function or a class
        return _Description(name=_function_name(obj))
    attributes = []
    for key, value in vars(obj).items() if hasattr(obj, "__dict__") else ():
        text = _format(value)
        if not key.startswith("_") and text is not None and text != "tag_None":
            attributes.append((key, text))
    name = type(obj).__name__
    return _Description(name=name, args=attributes[:_MAX_ATTRIBUTES])


def term_label(objective: Any) -> str | None:
    """A short label saying what ``objective`` is, or ``None`` when it cannot say.

    Parameters
    ----------
    objective : callable
        An objective functor, a quantity computer with a loss (``with_loss``), a wrapped or
        plain function, or an instance of a user's objective class.

    Returns
    -------
    str or None
        An explicit name, else ``function(arguments)``; ``None`` for a lambda without bound
        arguments.

    Examples
    --------
    >>> from chemfit.core.wrapping import WrappedObjectiveFunctor, WrappedQuantityComputer
    >>> def dimer(parameters, r):
    ...     return {"energy": parameters["eps"] / r}
    >>> term_label(WrappedQuantityComputer(dimer).bind(r=3.2).with_loss(lambda q: q["energy"]))
    'dimer(r=3.2)'
    >>> term_label(WrappedObjectiveFunctor(lambda p: 1.0))  # nothing to say
    >>> objective = WrappedObjectiveFunctor(lambda p: 1.0)
    >>> objective.static_meta_data["tag"] = "bulk fcc"
    >>> term_label(objective)
    'bulk fcc'
    """
    return _describe(objective).text() or None


def term_labels(terms: Any) -> list[str]:
    """One label per term, shortened to what tells the terms apart.

    Parameters
    ----------
    terms : CombinedObjectiveFunction or iterable of objectives
        A combined objective (its ``objective_functions``) or the terms themselves.

    Returns
    -------
    list of str
        Explicit names as they are; otherwise the function name is dropped when every
        described term shares it, and so is any argument with the same value in all of them.
        A term that cannot say what it is gets ``"term <index>"``; a label that would occur
        twice gets its index appended.

    Examples
    --------
    >>> from chemfit.core.combined import CombinedObjectiveFunction
    >>> from chemfit.core.wrapping import WrappedQuantityComputer
    >>> def dimer(parameters, r, scale=1.0):
    ...     return {"energy": scale * parameters["eps"] / r}
    >>> computer = WrappedQuantityComputer(dimer)
    >>> def squared(q, target):
    ...     return (q["energy"] - target) ** 2
    >>> cob = CombinedObjectiveFunction(
    ...     [computer.bind(r=r, scale=2.0).with_loss(squared, target=-1.0) for r in (3.2, 3.6)]
    ...     + [lambda p: p["eps"] ** 2]
    ... )
    >>> term_labels(cob)
    ['r=3.2', 'r=3.6', 'term 2']
    """
    objectives = getattr(terms, "objective_functions", terms)
    descriptions = [_describe(obj) for obj in objectives]
    described = [d for d in descriptions if not d.explicit and (d.name or d.args)]
    names = {d.name for d in described}
    keep_name = len(described) < 2 or len(names) > 1 or not all(d.args for d in described)
    drop: frozenset = frozenset()
    if len(described) >= 2:
        drop = frozenset.intersection(*(frozenset(d.args + d.loss_args) for d in described))
    # The model's own arguments (r=3.2) say what a term is; its reference value only when needed.
    short = [d.text(keep_name, drop, with_loss=False) for d in described]
    with_loss = len(set(short)) < len(short) or not all(short)
    labels = []
    for index, description in enumerate(descriptions):
        text = description.text(keep_name, drop, with_loss)
        if not text and (description.args or description.loss_args):  # all common: keep them
            text = description.text(keep_name, with_loss=with_loss)
        labels.append(text or f"term {index}")
    counts: dict[str, int] = {}
    for text in labels:
        counts[text] = counts.get(text, 0) + 1
    return [f"{text} [{i}]" if counts[text] > 1 else text for i, text in enumerate(labels)]
