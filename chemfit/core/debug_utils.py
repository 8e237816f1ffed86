"""Debugging aids: log the calls of a function or of every method of an object."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

__all__ = ["log_all_methods", "log_invocation"]

LogFunc = Callable[[str], Any]


def _describe_call(args: tuple, kwargs: dict) -> str:
    parts = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
    return ", ".join(parts)


def log_invocation(
    func: Callable[..., Any],
    log_func: LogFunc,
    log_args: bool = True,
    log_res: bool = True,
) -> Callable[..., Any]:
    """Wrap ``func`` so that each call is reported to ``log_func`` before and after it runs.

    Parameters
    ----------
    func : callable
        The function to wrap.
    log_func : callable
        Receives one message string per event, e.g. ``logger.debug`` or ``list.append``.
    log_args : bool
        Include the call arguments in the ``Pre`` message.
    log_res : bool
        Include the return value in the ``Post`` message.

    Returns
    -------
    callable
        The wrapper (with ``func``'s name and docstring). Exceptions are reported as
        ``Raised ...`` and re-raised unchanged.

    Examples
    --------
    >>> messages = []
    >>> add = log_invocation(lambda a, b=0: a + b, messages.append)
    >>> add(1, b=2)
    3
    >>> messages
    ['Pre <lambda>(1, b=2)', 'Post <lambda> -> 3']
    """
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))

    @functools.wraps(func)
    def wrapped_with_logging(*args: Any, **kwargs: Any) -> Any:
        log_func(f"Pre {name}({_describe_call(args, kwargs)})" if log_args else f"Pre {name}")
        try:
            res = func(*args, **kwargs)
        except BaseException as exc:
            log_func(f"Raised {name}: {type(exc).__name__}: {exc}")
            raise
        log_func(f"Post {name} -> {res!r}" if log_res else f"Post {name}")
        return res

    return wrapped_with_logging


class _MethodLoggingProxy:
    """Forwards attribute access to the wrapped object and logs its method calls."""

    __slots__ = ("_proxy_log_func", "_proxy_options", "_proxy_target")

    def __init__(self, target: Any, log_func: LogFunc, options: dict[str, Any]) -> None:
        object.__setattr__(self, "_proxy_target", target)
        object.__setattr__(self, "_proxy_log_func", log_func)
        object.__setattr__(self, "_proxy_options", options)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._proxy_target, name)
        if callable(attr) and not isinstance(attr, type):
            return log_invocation(attr, self._proxy_log_func, **self._proxy_options)
        return attr

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._proxy_target, name, value)

    def __delattr__(self, name: str) -> None:
        delattr(self._proxy_target, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return log_invocation(self._proxy_target, self._proxy_log_func, **self._proxy_options)(
            *args, **kwargs
        )

    def __dir__(self) -> list[str]:
        return dir(self._proxy_target)

    def __repr__(self) -> str:
        return f"log_all_methods({self._proxy_target!r})"


def log_all_methods(obj: Any, log_func: LogFunc, *args: Any, **kwargs: Any) -> Any:
    """Return a proxy of ``obj`` that logs every method call through ``log_func``.

    Reading, setting and deleting attributes pass through to ``obj``; calling a method (or the
    proxy itself, if ``obj`` is callable) goes through :func:`log_invocation`, to which the
    extra ``*args``/``**kwargs`` (``log_args``, ``log_res``) are forwarded.

    Examples
    --------
    >>> class Counter:
    ...     def __init__(self):
    ...         self.n = 0
    ...     def bump(self, k=1):
    ...         self.n += k
    ...         return self.n
    >>> messages = []
    >>> proxy = log_all_methods(Counter(), messages.append, log_args=False)
    >>> proxy.bump(2)
    2
    >>> proxy.n = 10
    >>> proxy.bump(), messages
    (11, ['Pre Counter.bump', 'Post Counter.bump -> 2', 'Pre Counter.bump', 'Post Counter.bump -> 11'])
    """
    options = dict(zip(("log_args", "log_res"), args))
    overlap = set(options) & set(kwargs)
    if overlap:
        raise TypeError(f"log_all_methods got multiple values for {sorted(overlap)}")
    if len(args) > 2:
        raise TypeError(
            f"log_all_methods takes at most 2 extra positional arguments (log_args, log_res), "
            f"got {len(args)}"
        )
    unknown = set(kwargs) - {"log_args", "log_res"}
    if unknown:
        raise TypeError(
            f"log_all_methods got unexpected keyword arguments {sorted(unknown)}; "
            "the options are log_args and log_res"
        )
    options.update(kwargs)
    return _MethodLoggingProxy(obj, log_func, options)
