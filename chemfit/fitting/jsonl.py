"""The JSON and JSON-lines format of fit records, in one place.

* :func:`json_float` / :func:`float_from_json`: the codec of non-finite floats (``"nan"``,
  ``"inf"``, ``"-inf"``), so that files stay strict JSON;
* :func:`to_jsonable`: any data as strict-JSON data (numpy arrays and scalars, paths, sets);
* :class:`NumpyEncoder`: a ``json`` encoder for meta data that writes anything;
* :func:`read_jsonl`: the tolerant reader of a JSON-lines file (blank lines ignored, a truncated
  last line skipped with a WARNING, any other bad line a ``ValueError`` naming file and line),
  used by ``FitHistory.from_jsonl`` and ``load_observations``;
* :func:`repair_tail` and :func:`append_line`: how ``JSONLinesHistory`` appends.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "NumpyEncoder",
    "append_line",
    "float_from_json",
    "json_float",
    "read_jsonl",
    "repair_tail",
    "to_jsonable",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_NON_FINITE = {"nan": math.nan, "inf": math.inf, "+inf": math.inf, "-inf": -math.inf}
_PLAIN_KEY_TYPES = (str, int, float, bool, type(None))


def json_float(value: float | None) -> float | str | None:
    """A float as strict-JSON data: non-finite values become ``"nan"``, ``"inf"`` or ``"-inf"``.

    Examples
    --------
    >>> json_float(0.5), json_float(float("-inf")), json_float(None)
    (0.5, '-inf', None)
    """
    if value is None:
        return None
    value = float(value)
    if math.isfinite(value):
        return value
    if math.isnan(value):
        return "nan"
    return "inf" if value > 0 else "-inf"


def float_from_json(value: Any, what: str = "a value") -> float | None:
    """The inverse of :func:`json_float`: a number, ``null`` or a non-finite spelling.

    ``"nan"``, ``"inf"``, ``"+inf"`` and ``"-inf"`` are read in any case; booleans and other
    strings raise ``ValueError`` naming ``what``.

    Examples
    --------
    >>> float_from_json("NaN"), float_from_json(2), float_from_json(None)
    (nan, 2.0, None)
    >>> float_from_json("one", "loss")
    Traceback (most recent call last):
    ...
    ValueError: loss must be a number, null, 'nan', 'inf' or '-inf', got 'one'
    """
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lower() in _NON_FINITE:
        return _NON_FINITE[value.strip().lower()]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a number, null, 'nan', 'inf' or '-inf', got {value!r}")
    return float(value)


def _numpy_value(obj: Any) -> Any:
    """``obj.tolist()`` for numpy arrays and scalars (without importing numpy), else ``obj``."""
    tolist = getattr(obj, "tolist", None)
    if callable(tolist) and type(obj).__module__ == "numpy":
        return tolist()
    return obj


def to_jsonable(obj: Any) -> Any:
    """Convert ``obj`` into data that :func:`json.dumps` writes as strict JSON.

    Mappings become dicts with ``str`` keys, sequences and sets become lists, numpy arrays and
    scalars become lists and Python numbers, non-finite floats become ``"nan"``/``"inf"``/
    ``"-inf"``, paths become strings, and anything else becomes its ``repr``.

    Examples
    --------
    >>> import numpy as np
    >>> to_jsonable({"a": np.arange(2), 1: (np.float32(0.5), float("nan"))})
    {'a': [0, 1], '1': [0.5, 'nan']}
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return json_float(obj)
    if isinstance(obj, Mapping):
        return {str(key): to_jsonable(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(value) for value in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    plain = _numpy_value(obj)
    return repr(obj) if plain is obj else to_jsonable(plain)


def _json_key(key: Any) -> Any:
    """A dict key JSON accepts: numpy scalars become Python scalars, anything else its repr."""
    key = _numpy_value(key)
    return key if isinstance(key, _PLAIN_KEY_TYPES) else repr(key)


def _fix_keys(obj: Any, path_ids: set[int]) -> Any:
    """Copy ``obj`` where needed so that every dict key is one JSON accepts.

    Containers are only rebuilt when something inside them changed. A reference cycle raises
    ``ValueError``, as ``json`` itself does.
    """
    if isinstance(obj, dict):
        container_items: Iterator = iter(obj.items())
    elif isinstance(obj, (list, tuple)):
        container_items = iter(enumerate(obj))
    else:
        return obj
    if id(obj) in path_ids:
        raise ValueError("Circular reference detected")
    path_ids.add(id(obj))
    try:
        changed = False
        fixed_items = []
        for key, value in container_items:
            new_value = _fix_keys(value, path_ids)
            new_key = _json_key(key) if isinstance(obj, dict) else key
            changed = changed or new_value is not value or new_key is not key
            fixed_items.append((new_key, new_value))
    finally:
        path_ids.discard(id(obj))
    if not changed:
        return obj
    if isinstance(obj, dict):
        return dict(fixed_items)
    return [value for _, value in fixed_items]


class NumpyEncoder(json.JSONEncoder):
    """JSON encoder for meta data: it writes anything.

    numpy arrays become (nested) lists, numpy scalars become Python numbers, paths become
    strings, dict keys JSON cannot hold become their ``repr``, and any other object is written
    as its ``repr`` instead of raising ``TypeError``.

    Examples
    --------
    >>> import numpy as np
    >>> json.dumps({"x": np.arange(3), "e": np.float32(0.5), np.int64(7): {1, 2}},
    ...            cls=NumpyEncoder)
    '{"x": [0, 1, 2], "e": 0.5, "7": "{1, 2}"}'
    """

    def default(self, o: Any) -> Any:
        if isinstance(o, os.PathLike):
            return os.fspath(o)
        plain = _numpy_value(o)
        if plain is not o:
            return _fix_keys(plain, set())  # object arrays may hold dicts
        return repr(o)

    def iterencode(self, o: Any, _one_shot: bool = False) -> Iterator[str]:
        return super().iterencode(_fix_keys(o, set()), _one_shot)


def read_jsonl(
    path: str | os.PathLike, parse: Callable[[Any], T], what: str = "evaluation record"
) -> list[T]:
    """``parse(data)`` for every JSON line of ``path``, in file order.

    Blank lines are ignored. A last line that is not valid JSON (a process killed while
    writing it) is skipped with a WARNING; any other line that is not valid JSON, or that
    ``parse`` rejects with ``TypeError``/``ValueError``, raises ``ValueError`` naming the file
    and the line.

    Examples
    --------
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "fit.jsonl"
    >>> _ = path.write_text('{"a": 1}\\n\\n{"a": 2}\\n{"a"')
    >>> read_jsonl(path, lambda data: data["a"])
    [1, 2]
    """
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    parsed = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        lineno = i + 1
        try:
            data = json.loads(line)
        except ValueError as exc:
            if i == last:
                logger.warning("%s: skipping the truncated last line %d (%s)", path, lineno, exc)
                continue
            raise ValueError(
                f"{path}, line {lineno}: not valid JSON ({exc}); each line must hold one {what}"
            ) from exc
        try:
            parsed.append(parse(data))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}, line {lineno}: not an {what}: {exc}") from exc
    return parsed


def repair_tail(path: Path) -> None:
    """Make an existing JSON-lines file end with a newline, dropping a truncated last line.

    Examples
    --------
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "fit.jsonl"
    >>> _ = path.write_text('{"a": 1}\\n{"a"')
    >>> repair_tail(path)
    >>> path.read_text()
    '{"a": 1}\\n'
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    if not data or data.endswith(b"\n"):
        return
    cut = data.rfind(b"\n") + 1
    tail = data[cut:]
    try:
        json.loads(tail)
    except ValueError:
        logger.warning("%s: dropping the truncated last line %r before appending", path, tail[:80])
        with path.open("r+b") as fh:
            fh.truncate(cut)
        return
    with path.open("ab") as fh:
        fh.write(b"\n")


def append_line(path: Path, data: Any) -> None:
    """Append ``data`` as one JSON line (with :class:`NumpyEncoder`) in a single write, flushed.

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> path = Path(tempfile.mkdtemp()) / "fit.jsonl"
    >>> append_line(path, {"x": np.ones(2)})
    >>> path.read_text()
    '{"x": [1.0, 1.0]}\\n'
    """
    line = json.dumps(data, cls=NumpyEncoder) + "\n"
    with path.open("a", encoding="utf-8") as fh:
        fh.write(line)
        fh.flush()
