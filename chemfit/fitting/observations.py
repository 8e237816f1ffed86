"""Earlier evaluations read back for a new fit: :func:`load_observations` and its checks.

A fit resumes from the JSON-lines file of a
:class:`~chemfit.fitting.callbacks.JSONLinesHistory` with
``initial_observations=load_observations(path)``. What is read back:

* each line's parameters and loss; a line whose ``status`` is ``"failed"`` or ``"lost"`` has no
  loss (``None``), so the fit tells it as a bad value and it never becomes the best;
* the index after the file's last record (:attr:`Observations.next_index`), so that the new
  fit's records, appended to the same file, go on with the numbers instead of starting at 0;
* with ``parameters=``, the check that the file was written for the parameters fitted now:
  one error naming the missing and extra names, or (``on_mismatch="common"``) the observations
  reduced to the common parameters.

:func:`parameter_mismatch` is the one message for observations of other parameters, also used
when a fit is given such observations directly.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from chemfit.core.flatdict import flatten_dict, unflatten_dict
from chemfit.fitting.jsonl import float_from_json, read_jsonl
from chemfit.fitting.validation import is_validation_line

__all__ = ["Observations", "load_observations", "parameter_mismatch"]

logger = logging.getLogger(__name__)

_STATUSES = ("ok", "failed", "lost")
_MISMATCH_CHOICES = ("raise", "common")


class Observations(list):
    """``(parameters, loss)`` pairs read from a history file: a list that also knows where the
    file's record numbers end (it prints as a plain list).

    Attributes
    ----------
    next_index : int
        The index after the file's records (the largest ``index`` plus one, at least the
        number of records). A fit given these observations numbers its records from here on.
    path : pathlib.Path or None
        The file they were read from.

    Examples
    --------
    >>> observations = Observations([({"x": 1.0}, 2.0)], next_index=7)
    >>> observations == [({"x": 1.0}, 2.0)], observations.next_index
    (True, 7)
    """

    def __init__(
        self, items: Iterable = (), *, next_index: int = 0, path: Path | None = None
    ) -> None:
        super().__init__(items)
        self.next_index = int(next_index)
        self.path = path


def _parameters(value: Any, what: str) -> dict:
    if not isinstance(value, Mapping):
        raise ValueError(f"{what} must be an object of parameter values, got {value!r}")
    nested = {}
    for key, leaf in value.items():
        where = f"{what}.{key}"
        nested[key] = (
            _parameters(leaf, where) if isinstance(leaf, Mapping) else float_from_json(leaf, where)
        )
    return nested


def _observation(data: Any) -> tuple[dict, float | None, int | None] | None:
    """``(parameters, loss, index)`` of one line; a failed or lost evaluation has no loss;
    ``None`` for a validation loss (``Fitter(validation=...)``), which is no observation."""
    if is_validation_line(data):
        return None
    if not isinstance(data, Mapping) or "parameters" not in data or "loss" not in data:
        raise ValueError(
            f"expected an object with the keys 'parameters' and 'loss', got {str(data)[:80]!r}"
        )
    status = data.get("status", "ok")
    if status not in _STATUSES:
        raise ValueError(f"status must be one of {list(_STATUSES)}, got {status!r}")
    params = _parameters(data["parameters"], "parameters")
    loss = float_from_json(data["loss"], "loss")
    index = data.get("index")
    if isinstance(index, bool) or not isinstance(index, int):
        index = None
    return params, (None if status != "ok" else loss), index


def parameter_mismatch(
    observed: Iterable[Iterable[str]], fitted: Iterable[str], where: str, fix: str
) -> str | None:
    """The message for observations made with other parameters than ``fitted``, or ``None``.

    ``observed`` holds the flat parameter names of each observation. The message says how
    many differ and names the fitted parameters they lack (missing) and those they have but
    the fit does not (extra), then ``fix``.

    Examples
    --------
    >>> print(parameter_mismatch([["a", "b"], ["a", "c"]], ["a", "b"], "fit.jsonl",
    ...                          "Start a new file."))
    fit.jsonl: 1 of 2 observations were made for other parameters than the fitted ones \
['a', 'b']: missing ['b'] (fitted now, not in the observations), extra ['c'] (in the \
observations, not fitted now). Start a new file.
    >>> parameter_mismatch([["a"]], ["a"], "fit.jsonl", "") is None
    True
    """
    fitted_set = set(fitted)
    missing: set[str] = set()
    extra: set[str] = set()
    n_total = n_other = 0
    for names in observed:
        names = set(names)
        n_total += 1
        if names != fitted_set:
            n_other += 1
            missing |= fitted_set - names
            extra |= names - fitted_set
    if not n_other:
        return None
    parts = []
    if missing:
        parts.append(f"missing {sorted(missing)} (fitted now, not in the observations)")
    if extra:
        parts.append(f"extra {sorted(extra)} (in the observations, not fitted now)")
    return (
        f"{where}: {n_other} of {n_total} observations were made for other parameters than the "
        f"fitted ones {sorted(fitted_set)}: {', '.join(parts)}. {fix}"
    ).rstrip()


def _common(
    observations: list[tuple[dict, float | None]], fitted: Mapping[str, Any], path: Path
) -> list[tuple[dict, float | None]]:
    """Each observation with the fitted parameters only: extra ones dropped, missing ones
    taken from ``fitted``."""
    common = []
    n_changed = 0
    for number, (params, loss) in enumerate(observations):
        flat = flatten_dict(params)
        if set(flat) == set(fitted):
            common.append((params, loss))
            continue
        if not set(flat) & set(fitted):
            raise ValueError(
                f"{path}: observation {number} has no parameter in common with the fitted ones "
                f"{sorted(fitted)} (it has {sorted(flat)}); these observations belong to "
                "another fit"
            )
        n_changed += 1
        values = {key: flat.get(key, fitted[key]) for key in fitted}
        common.append((unflatten_dict(values), loss))
    if n_changed:
        logger.warning(
            "%s: %d of %d observations kept with the common parameters only (on_mismatch="
            "'common'): their losses were computed with other parameters, so they only guide "
            "the fit",
            path,
            n_changed,
            len(observations),
        )
    return common


def load_observations(
    path: str | os.PathLike,
    parameters: Mapping[str, Any] | None = None,
    *,
    on_mismatch: Literal["raise", "common"] = "raise",
) -> Observations:
    """Read a :class:`~chemfit.fitting.callbacks.JSONLinesHistory` file as ``(parameters,
    loss)`` pairs, in file order.

    The result can be passed as ``initial_observations`` to ``Fitter.fit_nevergrad`` to resume
    a fit. Blank lines are ignored. A truncated last line (a process killed while writing) is
    skipped with a WARNING; any other bad line raises ``ValueError`` naming the file and line.
    A failed or lost evaluation (``status`` ``"failed"`` or ``"lost"``) is read with the loss
    ``None``: the fit tells it as its bad value, and it never becomes the best. The result
    also knows the index after the file's last record (``next_index``): a fit given it numbers
    its records from there, so a history appended to the same file has no index twice.

    Parameters
    ----------
    path : str or os.PathLike
        The history file.
    parameters : dict, optional
        The parameters fitted now (for example ``fitter.initial_parameters``; nested like
        them). With them, every observation is checked to have exactly their names.
    on_mismatch : {"raise", "common"}
        What to do, with ``parameters``, when observations have other names: ``"raise"`` one
        ``ValueError`` naming the missing and extra names; ``"common"`` keep the common
        parameters: extra names are dropped and missing ones take their value from
        ``parameters`` (the losses were computed with other parameters, so they only guide
        the fit; a WARNING says how many observations were changed).

    Returns
    -------
    Observations
        A list of ``(parameters, loss)``: nested parameters (leaves as floats) and the loss
        told for them (``None`` for a failed or lost evaluation), with ``next_index``.

    Raises
    ------
    ValueError
        A bad line, or (with ``parameters`` and ``on_mismatch="raise"``) observations of other
        parameters.

    Examples
    --------
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "fit.jsonl"
    >>> _ = path.write_text(
    ...     '{"index": 0, "parameters": {"a": {"b": 1}}, "loss": 0.5}\\n'
    ...     '{"index": 1, "parameters": {"a": {"b": 2}}, "loss": 1e5, "status": "failed"}\\n'
    ...     '{"parame')
    >>> observations = load_observations(path)
    >>> observations, observations.next_index
    ([({'a': {'b': 1.0}}, 0.5), ({'a': {'b': 2.0}}, None)], 2)

    Observations made for other parameters:

    >>> load_observations(path, {"a": {"b": 0.0, "c": 3.0}})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: ...: 2 of 2 observations were made for other parameters than the fitted ones \
['a.b', 'a.c']: missing ['a.c'] (fitted now, not in the observations). Pass \
on_mismatch='common' to keep the common parameters (missing ones take their value from \
parameters, extra ones are dropped), or resume from a history of this fit.
    >>> load_observations(path, {"a": {"b": 0.0, "c": 3.0}}, on_mismatch="common")[0]
    ({'a': {'b': 1.0, 'c': 3.0}}, 0.5)
    """
    if on_mismatch not in _MISMATCH_CHOICES:
        raise ValueError(
            f"on_mismatch must be one of {list(_MISMATCH_CHOICES)}, got {on_mismatch!r}"
        )
    path = Path(path)
    rows = [row for row in read_jsonl(path, _observation) if row is not None]
    next_index = len(rows)
    for _, _, index in rows:
        if index is not None and index >= next_index:
            next_index = index + 1
    observations = [(params, loss) for params, loss, _ in rows]
    if parameters is not None:
        fitted = flatten_dict(parameters)
        if on_mismatch == "common":
            observations = _common(observations, fitted, path)
        else:
            message = parameter_mismatch(
                (flatten_dict(params) for params, _ in observations),
                fitted,
                str(path),
                "Pass on_mismatch='common' to keep the common parameters (missing ones take "
                "their value from parameters, extra ones are dropped), or resume from a "
                "history of this fit.",
            )
            if message is not None:
                raise ValueError(message)
    return Observations(observations, next_index=next_index, path=path)
