"""Evaluation contexts and the executor protocols.

An :class:`EvaluateContext` carries the state of one evaluation: its parameters, loss, computed
quantities, free-form meta data and child contexts. It is designed to cross process, machine and
MPI-rank boundaries in two directions:

* **to a worker** (pickling, ``__getstate__``): parameters, ``config``, ``shared`` and ``meta``;
* **back to the caller** (:meth:`EvaluateContext.to_result_state`): parameters, loss, quantities
  and meta, which the caller applies to its own context with
  :meth:`EvaluateContext.apply_result_state`.

``temp`` never travels, ``shared`` travels out but never back, and ``executor`` never travels.
"""

from __future__ import annotations

import copy
import numbers
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any, Protocol, TypeVar, runtime_checkable

__all__ = [
    "ChildContextConfigurator",
    "EvaluateContext",
    "ExecutorLike",
    "FutureLike",
    "LossFunction",
]

T_co = TypeVar("T_co", covariant=True)


@runtime_checkable
class FutureLike(Protocol[T_co]):
    """What an executor's ``submit`` returns (``concurrent.futures.Future`` and friends)."""

    def result(self, timeout: float | None = None) -> T_co: ...

    def cancel(self) -> bool: ...


@runtime_checkable
class ExecutorLike(Protocol):
    """A ``concurrent.futures``-style executor.

    The stdlib pools, loky, Dask's ``client.get_executor()`` and ipyparallel's ``ViewExecutor``
    all satisfy it.
    """

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> FutureLike: ...

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterable[Any]: ...


class ChildContextConfigurator(Protocol):
    """Configures a freshly spawned child context. Always called with keywords."""

    def __call__(
        self,
        idx_child_ctx: int,
        child_ctx: EvaluateContext,
        num_children: int,
        parent_ctx: EvaluateContext,
    ) -> None: ...


LossFunction = Callable[[dict], float] | Callable[[dict, dict], float]


def _copy_config(config: Any) -> Any:
    """A deep copy of ``config``; an empty namespace (the common case) skips ``deepcopy``, which
    costs ~20 us per child and dominates combined objectives of many cheap terms."""
    if type(config) is SimpleNamespace and not vars(config):
        return SimpleNamespace()
    return copy.deepcopy(config)


class EvaluateContext:
    """The state of one evaluation of an objective function.

    Parameters
    ----------
    config : SimpleNamespace, optional
        Per-evaluation configuration. Deep-copied into children and sent to workers.
    shared : SimpleNamespace, optional
        Data shared by a context and all its children (the same object). Sent to workers,
        never back.
    executor : ExecutorLike, optional
        An executor that objectives may use for inner parallelism. Inherited by children,
        never sent anywhere.

    Attributes
    ----------
    parameters : dict | None
        The parameters of this evaluation.
    loss : float | None
        The scalar loss of this evaluation.
    quantities : dict | None
        What a quantity computer produced.
    meta : dict
        Free-form meta data; comes back from workers.
    temp : SimpleNamespace
        Scratch space; never serialised or reported.
    children : list[EvaluateContext]
        The child contexts of the last :meth:`spawn_children` call.

    Examples
    --------
    >>> ctx = EvaluateContext()
    >>> with ctx.child_contexts(2) as children:
    ...     for i, child in enumerate(children):
    ...         child.loss = float(i)
    >>> [c["loss"] for c in ctx.meta["children"]]
    [0.0, 1.0]
    """

    def __init__(
        self,
        config: SimpleNamespace | None = None,
        shared: SimpleNamespace | None = None,
        executor: Any | None = None,
    ) -> None:
        self.config = config if config is not None else SimpleNamespace()
        self.shared = shared if shared is not None else SimpleNamespace()
        self.executor = executor
        self._clear_evaluation_state()

    def _clear_evaluation_state(self) -> None:
        self.parameters: dict | None = None
        self.loss: Any = None
        self.quantities: dict | None = None
        self.meta: dict = {}
        self.temp = SimpleNamespace()
        self.children: list[EvaluateContext] = []

    # -- evaluation state -------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the last evaluation: parameters, loss, quantities, meta, temp and children.

        ``config``, ``shared`` and ``executor`` are kept.
        """
        self._clear_evaluation_state()

    def to_meta_data(self) -> dict:
        """The reportable state, as references (not copies).

        Returns
        -------
        dict
            ``{"quantities", "parameters", "loss", "meta"}``.
        """
        return {
            "quantities": self.quantities,
            "parameters": self.parameters,
            "loss": self.loss,
            "meta": self.meta,
        }

    # -- children ---------------------------------------------------------------------------

    def _new_child(self) -> EvaluateContext:
        return EvaluateContext(
            config=_copy_config(self.config), shared=self.shared, executor=self.executor
        )

    def spawn_children(
        self, n_children: int, configurator: ChildContextConfigurator | None = None
    ) -> list[EvaluateContext]:
        """Replace the children by ``n_children`` new contexts and configure them.

        Each child gets a deep copy of ``config`` and the same ``shared`` and ``executor``.
        The configurator then runs once per child, in index order.

        Examples
        --------
        >>> def label(idx_child_ctx, child_ctx, num_children, parent_ctx):
        ...     child_ctx.config.label = f"{idx_child_ctx + 1}/{num_children}"
        >>> [c.config.label for c in EvaluateContext().spawn_children(2, label)]
        ['1/2', '2/2']
        """
        # numbers.Integral accepts numpy integers too (e.g. sizes computed with numpy)
        if (
            isinstance(n_children, bool)
            or not isinstance(n_children, numbers.Integral)
            or n_children < 0
        ):
            raise ValueError(
                f"n_children must be a non-negative int, got {n_children!r}; "
                "pass the number of child evaluations"
            )
        n_children = int(n_children)
        self.children = [self._new_child() for _ in range(n_children)]
        if configurator is not None:
            for idx, child in enumerate(self.children):
                configurator(
                    idx_child_ctx=idx, child_ctx=child, num_children=n_children, parent_ctx=self
                )
        return self.children

    def collect_child_meta_data(self, recursive: bool = True) -> None:
        """Store the children's reportable state in ``meta["children"]``.

        With ``recursive`` the children collect their own children first. A childless context
        gets no ``"children"`` key.
        """
        if not self.children:
            return
        if recursive:
            for child in self.children:
                child.collect_child_meta_data(recursive=True)
        self.meta["children"] = [child.to_meta_data() for child in self.children]

    @contextmanager
    def child_contexts(
        self,
        n_children: int,
        configurator: ChildContextConfigurator | None = None,
        recursive: bool = True,
    ) -> Iterator[list[EvaluateContext]]:
        """Spawn children, yield them, and collect their meta data even if the block raises."""
        children = self.spawn_children(n_children, configurator)
        try:
            yield children
        finally:
            self.collect_child_meta_data(recursive=recursive)

    # -- travelling -------------------------------------------------------------------------

    def __getstate__(self) -> dict:
        """What travels to a worker: parameters, config, shared and meta."""
        return {
            "parameters": self.parameters,
            "config": self.config,
            "shared": self.shared,
            "meta": self.meta,
        }

    def __setstate__(self, state: dict) -> None:
        self.executor = None
        self._clear_evaluation_state()
        self.config = state.get("config", SimpleNamespace())
        self.shared = state.get("shared", SimpleNamespace())
        self.parameters = state.get("parameters")
        self.meta = state.get("meta", {})

    def to_wire(self) -> tuple | EvaluateContext:
        """What travels to a worker, compactly: the wire form of this context.

        A plain :class:`EvaluateContext` travels as the tuple ``(parameters, config, shared,
        meta)`` (what :meth:`__getstate__` holds, in fewer objects, which pickles faster); a
        subclass travels as itself, pickled with its own ``__getstate__``. The worker rebuilds
        it with :meth:`from_wire`. ``temp``, ``executor`` and ``children`` never travel.

        Examples
        --------
        >>> ctx = EvaluateContext()
        >>> ctx.parameters, ctx.meta["note"] = {"x": 1.0}, "sent"
        >>> parameters, config, shared, meta = ctx.to_wire()
        >>> parameters, meta
        ({'x': 1.0}, {'note': 'sent'})
        """
        if type(self) is EvaluateContext:
            return (self.parameters, self.config, self.shared, self.meta)
        return self

    @staticmethod
    def from_wire(wire: tuple | EvaluateContext) -> EvaluateContext:
        """The context that :meth:`to_wire` described, as unpickling would rebuild it.

        Examples
        --------
        >>> ctx = EvaluateContext.from_wire(({"x": 1.0}, None, None, {"a": 1}))
        >>> ctx.parameters, ctx.config, ctx.meta, ctx.loss, ctx.executor
        ({'x': 1.0}, None, {'a': 1}, None, None)
        """
        if not isinstance(wire, tuple):
            return wire
        parameters, config, shared, meta = wire
        ctx = EvaluateContext.__new__(EvaluateContext)
        ctx.executor = None
        ctx.parameters = parameters
        ctx.loss = None
        ctx.quantities = None
        ctx.meta = meta
        ctx.temp = SimpleNamespace()
        ctx.children = []
        ctx.config = config
        ctx.shared = shared
        return ctx

    def to_result_state(self) -> dict:
        """What travels back from a worker: parameters, loss, quantities and meta."""
        return {
            "parameters": self.parameters,
            "loss": self.loss,
            "quantities": self.quantities,
            "meta": self.meta,
        }

    def apply_result_state(self, state: dict) -> None:
        """Apply a worker's result state to this context; ``meta`` is replaced wholesale."""
        self.parameters = state["parameters"]
        self.loss = state["loss"]
        self.quantities = state["quantities"]
        self.meta = state["meta"]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(parameters={self.parameters!r}, loss={self.loss!r}, "
            f"meta_keys={sorted(map(str, self.meta))}, children={len(self.children)})"
        )
