"""Small general-purpose helpers: protocol checks, folders, JSON files and bound checks.

:func:`atomic_write_text` is the single place where chemfit replaces a file atomically (R15):
the text goes to a temporary file in the target's folder, is flushed and fsynced, and then
``os.replace`` swaps it in, so a reader never sees a half-written file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import secrets
import threading
from collections.abc import Mapping
from numbers import Real
from pathlib import Path
from typing import Any

import numpy as np

from chemfit.core.flatdict import flatten_dict

__all__ = [
    "ExtendedJSONEncoder",
    "PicklesWithoutLock",
    "atomic_write_text",
    "check_params_near_bounds",
    "check_protocol",
    "check_timeout",
    "dump_dict_to_file",
    "next_free_folder",
]

logger = logging.getLogger(__name__)


class PicklesWithoutLock:
    """Mixin for objects guarding their state with ``self._lock``: pickling leaves the lock out
    (locks cannot be pickled) and unpickling gives a fresh one, so the object can travel to
    worker processes and MPI ranks.

    Examples
    --------
    >>> import copy  # copies go through __getstate__/__setstate__, as pickling does
    >>> class Counter(PicklesWithoutLock):
    ...     def __init__(self):
    ...         self._lock = threading.Lock()
    ...         self.count = 1
    >>> original = Counter()
    >>> original._lock.acquire()
    True
    >>> clone = copy.copy(original)
    >>> clone.count, clone._lock.acquire(blocking=False)  # a fresh, unlocked lock
    (1, True)
    """

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


def check_protocol(obj: Any | None, prot: type) -> None:
    """Raise ``TypeError`` unless ``obj`` is ``None`` or implements the protocol ``prot``.

    Parameters
    ----------
    obj : object or None
        The object to check; ``None`` always passes.
    prot : type
        A ``typing.Protocol`` decorated with ``@runtime_checkable`` (or any class).

    Raises
    ------
    TypeError
        When ``obj`` does not implement ``prot``, or ``prot`` cannot be checked at runtime.

    Examples
    --------
    >>> from chemfit.core.context import ExecutorLike
    >>> from concurrent.futures import ThreadPoolExecutor
    >>> check_protocol(None, ExecutorLike)
    >>> with ThreadPoolExecutor(1) as pool:
    ...     check_protocol(pool, ExecutorLike)
    >>> check_protocol(42, ExecutorLike)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    TypeError: 42 (int) does not implement the ExecutorLike protocol; ...
    """
    if obj is None:
        return
    try:
        ok = isinstance(obj, prot)
    except TypeError as err:
        raise TypeError(
            f"prot={prot!r} cannot be used for a runtime check ({err}); "
            "decorate the protocol with @typing.runtime_checkable"
        ) from err
    if not ok:
        name = getattr(prot, "__name__", repr(prot))
        raise TypeError(
            f"{obj!r} ({type(obj).__name__}) does not implement the {name} protocol; "
            f"pass an object that provides the methods of {name}"
        )


def check_timeout(timeout: Any, name: str = "timeout", *, allow_none: bool = True) -> float | None:
    """``timeout`` as a float (``None`` stays ``None`` where allowed): the one check of every
    "seconds" argument. Anything but a positive finite number is an error that names it.

    Examples
    --------
    >>> check_timeout(None), check_timeout(5)
    (None, 5.0)
    >>> check_timeout(0, "rank_timeout")
    Traceback (most recent call last):
    ...
    ValueError: rank_timeout must be a positive number of seconds or None, got 0
    >>> check_timeout("60", allow_none=False)
    Traceback (most recent call last):
    ...
    TypeError: timeout must be a number of seconds, got str: '60'
    """
    if timeout is None and allow_none:
        return None
    alternative = " or None" if allow_none else ""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(
            f"{name} must be a number of seconds{alternative}, got {type(timeout).__name__}: "
            f"{timeout!r}"
        )
    if not (math.isfinite(timeout) and timeout > 0):
        raise ValueError(
            f"{name} must be a positive number of seconds{alternative}, got {timeout!r}"
        )
    return float(timeout)


def next_free_folder(base: str | os.PathLike) -> Path:
    """Return ``base`` if it does not exist, else the first free ``base_0``, ``base_1``, ...

    Nothing is created.

    Examples
    --------
    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> next_free_folder(root / "run").name
    'run'
    >>> (root / "run").mkdir()
    >>> next_free_folder(root / "run").name
    'run_0'
    """
    base = Path(base)
    if not base.exists():
        return base
    i = 0
    while True:
        candidate = base.with_name(f"{base.name}_{i}")
        if not candidate.exists():
            return candidate
        i += 1


class ExtendedJSONEncoder(json.JSONEncoder):
    """JSON encoder that also writes paths (as strings) and numpy arrays and scalars.

    Anything else that JSON cannot represent still raises ``TypeError``.

    Examples
    --------
    >>> json.dumps({"p": Path("a/b"), "x": np.arange(2), "y": np.float32(0.5)},
    ...            cls=ExtendedJSONEncoder)
    '{"p": "a/b", "x": [0, 1], "y": 0.5}'
    """

    def default(self, o: Any) -> Any:
        if isinstance(o, os.PathLike):
            return os.fspath(o)
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, np.generic):
            return o.item()
        return super().default(o)


def _fsync_directory(folder: Path) -> None:
    """Persist a rename in ``folder`` (POSIX); silently skipped where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Replace the file at ``path`` by ``text`` atomically, creating missing parent folders.

    The text is written to a temporary file in the same folder, flushed and fsynced, and then
    moved over the target with ``os.replace``. Readers see either the old or the new content,
    never a partial file, and no temporary file is left behind, also when writing fails.

    Parameters
    ----------
    path : str or os.PathLike
        The target file.
    text : str
        The complete new content.
    encoding : str
        Text encoding, UTF-8 by default.

    Returns
    -------
    Path
        The target path.

    Examples
    --------
    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "sub" / "a.txt"
    >>> _ = atomic_write_text(target, "one")
    >>> _ = atomic_write_text(target, "two")
    >>> target.read_text(), sorted(p.name for p in target.parent.iterdir())
    ('two', ['a.txt'])
    """
    path = Path(path)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    data = text.encode(encoding)
    while True:
        tmp = folder / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            # mode 0o666 lets the umask decide the permissions, as for a normal file.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_directory(folder)
    return path


def dump_dict_to_file(file: str | os.PathLike, dictionary: Mapping) -> None:
    """Write ``dictionary`` as indented JSON to ``file``, atomically (R15).

    Parent folders are created. Paths and numpy values are encoded with
    :class:`ExtendedJSONEncoder`. If encoding fails, the target is left untouched.

    Examples
    --------
    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "out" / "d.json"
    >>> dump_dict_to_file(target, {"x": np.float64(1.5), "where": Path("a")})
    >>> json.loads(target.read_text())
    {'x': 1.5, 'where': 'a'}
    """
    text = json.dumps(dictionary, indent=4, cls=ExtendedJSONEncoder)
    atomic_write_text(file, text)


def check_params_near_bounds(
    params: Mapping[str, Any],
    bounds: Mapping[str, Any],
    relative_tol: float,
) -> list[tuple[str, float, float, float]]:
    """List the parameters that lie within ``relative_tol`` of a bound (or beyond it).

    A parameter with bounds ``(lower, upper)`` is reported when
    ``value < lower + tol`` or ``value > upper - tol``, where
    ``tol = relative_tol * (upper - lower)``. Only parameters with both bounds set are checked.
    A negative ``relative_tol`` loosens the check (only values clearly outside are reported).

    Parameters
    ----------
    params : Mapping
        Parameter values, possibly nested.
    bounds : Mapping
        ``(lower, upper)`` pairs with the same nesting; either side may be ``None``.
    relative_tol : float
        Tolerance relative to the width of the bounds.

    Returns
    -------
    list of tuple
        ``(flat_key, value, lower, upper)`` in parameter order.

    Examples
    --------
    >>> check_params_near_bounds({"a": 0.01, "b": {"c": 0.5}, "d": 9.0},
    ...                          {"a": (0.0, 1.0), "b": {"c": (0.0, 1.0)}, "d": (None, 10.0)},
    ...                          0.05)
    [('a', 0.01, 0.0, 1.0)]
    """
    if isinstance(relative_tol, bool) or not isinstance(relative_tol, Real):
        raise TypeError(
            f"relative_tol must be a real number, got {relative_tol!r} "
            f"({type(relative_tol).__name__}); pass e.g. 0.01"
        )
    if not math.isfinite(relative_tol):
        raise ValueError(f"relative_tol must be finite, got {relative_tol!r}; pass e.g. 0.01")
    flat_params = flatten_dict(params)
    flat_bounds = flatten_dict(bounds)
    problematic: list[tuple[str, float, float, float]] = []
    for key, value in flat_params.items():
        bound = flat_bounds.get(key)
        if bound is None:
            continue
        try:
            lower, upper = bound
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"bounds[{key!r}] must be a (lower, upper) pair, got {bound!r}; "
                "use None for a missing side"
            ) from err
        if lower is None or upper is None:
            continue
        tol = relative_tol * abs(upper - lower)
        if value < lower + tol or value > upper - tol:
            problematic.append((key, float(value), float(lower), float(upper)))
    return problematic
