"""Combined objective functions: weighted terms, one child context each, and a reduction.

A :class:`CombinedObjectiveFunction` (COB) evaluates each of its terms in its own child context,
multiplies the value by the term's weight, and reduces the kept values to one loss.

Reductions come in two shapes, both :class:`typing.Protocol` seams:

* a :class:`Reducer` takes the list of weighted terms (``sum``, ``max``, ``np.mean`` and the
  reducers below all are);
* an :class:`Aggregator` also gets the kept children's quantities and the parent context.

The protocols are runtime-checkable, but ``isinstance`` only checks for ``__call__``; a
reduction is classified by its signature (see :attr:`CombinedObjectiveFunction.reduction`).
An :class:`ExceptionHandler` decides what a failing term contributes: re-raise, ``nan`` or
``None`` (the term is skipped).

The combined objective owns its evaluation recipe (:meth:`CombinedObjectiveFunction.evaluate`):
prepare the context, spawn and configure the children, run the terms, collect the children,
filter and reduce. A parallel wrapper supplies only how the terms run (``run_terms``), so its
value and ``ctx.meta`` are the serial ones by construction.
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from chemfit.core.context import ChildContextConfigurator, EvaluateContext
from chemfit.core.objectives import ObjectiveFunctor, ensure_context
from chemfit.core.wrapping import WrappedObjectiveFunctor

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "Aggregator",
    "CombinedObjectiveFunction",
    "ExceptionHandler",
    "Reducer",
    "WrappedReducer",
    "mean_reducer",
    "nan_exception_handler",
    "raising_exception_handler",
    "root_mean_reducer",
    "skip_exception_handler",
    "sum_reducer",
    "transform_generic_callables",
]

logger = logging.getLogger(__name__)


# -- protocols ----------------------------------------------------------------------------------


@runtime_checkable
class Reducer(Protocol):
    """Reduces the kept, weighted terms to one value.

    Examples
    --------
    >>> def largest(terms):
    ...     return max(terms)
    >>> CombinedObjectiveFunction([lambda p: 1.0, lambda p: 3.0], reduction=largest)({})
    3.0
    """

    def __call__(self, terms: list[float]) -> float: ...


@runtime_checkable
class Aggregator(Protocol):
    """Reduces the kept terms, seeing the kept children's quantities and the parent context.

    Examples
    --------
    >>> def count_and_sum(terms, quantities, ctx):
    ...     ctx.meta["n_kept"] = len(terms)
    ...     return sum(terms)
    >>> ctx = EvaluateContext()
    >>> CombinedObjectiveFunction([lambda p: 1.0, lambda p: 2.0], reduction=count_and_sum)({}, ctx)
    3.0
    >>> ctx.meta["n_kept"]
    2
    """

    def __call__(
        self, terms: list[float], quantities: list[dict], ctx: EvaluateContext
    ) -> float: ...


@runtime_checkable
class ExceptionHandler(Protocol):
    """Decides what a term that raised contributes.

    It gets the exception, the term's child context and the term's index, and returns a value
    (used unweighted), ``None`` (the term is skipped) or raises.

    Examples
    --------
    >>> def zero_on_error(exception, ctx, idx):
    ...     ctx.meta["error"] = repr(exception)
    ...     return 0.0
    >>> def broken(parameters):
    ...     raise RuntimeError("no convergence")
    >>> CombinedObjectiveFunction([broken, lambda p: 2.0], exception_handler=zero_on_error)({})
    2.0
    """

    def __call__(self, exception: Exception, ctx: EvaluateContext, idx: int) -> float | None: ...


#: How a parallel wrapper runs the terms of one call (see
#: :meth:`CombinedObjectiveFunction.evaluate`): ``run_terms(parameters, children)`` returns one
#: value per term, in term order.
_RunTerms = Callable[[dict, list[EvaluateContext]], Sequence[float | None]]


# -- reducers -----------------------------------------------------------------------------------


def sum_reducer(terms: Sequence[float]) -> float:
    """The sum of the terms (``0.0`` for no terms).

    Examples
    --------
    >>> sum_reducer([1.0, 2.5])
    3.5
    """
    return float(sum(terms))


def mean_reducer(terms: Sequence[float]) -> float:
    """The mean of the terms; NaN for no terms.

    Examples
    --------
    >>> mean_reducer([1.0, 2.0])
    1.5
    >>> mean_reducer([])
    nan
    """
    if len(terms) == 0:
        return math.nan
    return float(sum(terms)) / len(terms)


def root_mean_reducer(terms: Sequence[float]) -> float:
    """The square root of the mean of the terms; NaN for no terms.

    With squared errors as terms this is the root-mean-square error.

    Examples
    --------
    >>> root_mean_reducer([1.0, 4.0, 4.0])
    1.7320508075688772
    >>> root_mean_reducer([])
    nan
    """
    return math.sqrt(mean_reducer(terms))


# -- exception handlers -------------------------------------------------------------------------


def raising_exception_handler(exception: Exception, ctx: EvaluateContext, idx: int) -> float | None:
    """Re-raise the term's exception unchanged (the default).

    Examples
    --------
    >>> raising_exception_handler(KeyError("x"), EvaluateContext(), 0)
    Traceback (most recent call last):
    ...
    KeyError: 'x'
    """
    raise exception


def nan_exception_handler(exception: Exception, ctx: EvaluateContext, idx: int) -> float | None:
    """Return NaN for a failing term, so the total becomes NaN; logs a WARNING.

    Examples
    --------
    >>> nan_exception_handler(RuntimeError("boom"), EvaluateContext(), 3)
    nan
    """
    logger.warning(
        "term %d raised %s: %s; its value is NaN", idx, type(exception).__name__, exception
    )
    return math.nan


def skip_exception_handler(exception: Exception, ctx: EvaluateContext, idx: int) -> float | None:
    """Skip a failing term (return ``None``); logs a WARNING.

    Examples
    --------
    >>> skip_exception_handler(RuntimeError("boom"), EvaluateContext(), 3) is None
    True
    """
    logger.warning("term %d raised %s: %s; skipping it", idx, type(exception).__name__, exception)
    return None


# -- reduction classification -------------------------------------------------------------------


class WrappedReducer(Aggregator):
    """Adapts a :class:`Reducer` to the :class:`Aggregator` signature.

    The result is cast to ``float``. Picklable when the reducer is.

    Parameters
    ----------
    reducer : Reducer
        Called with the list of kept terms.

    Examples
    --------
    >>> import numpy as np
    >>> aggregator = WrappedReducer(np.mean)
    >>> aggregator([1.0, 2.0], [None, None], EvaluateContext())
    1.5
    >>> aggregator.to_reducer() is np.mean
    True
    """

    def __init__(self, reducer: Reducer | Callable[[list[float]], Any]) -> None:
        if not callable(reducer):
            raise TypeError(
                f"reducer must be callable, got {reducer!r} ({type(reducer).__name__}); "
                "pass a function of the list of terms"
            )
        self.reducer = reducer

    def __call__(self, terms: list[float], quantities: list[dict], ctx: EvaluateContext) -> float:
        return float(self.reducer(list(terms)))

    def to_reducer(self) -> Reducer:
        """The wrapped reducer."""
        return self.reducer

    def __repr__(self) -> str:
        return f"WrappedReducer({getattr(self.reducer, '__name__', self.reducer)!r})"


def _binds(signature: inspect.Signature, n_args: int) -> bool:
    try:
        signature.bind(*([None] * n_args))
    except TypeError:
        return False
    return True


def _as_aggregator(reduction: Any) -> Aggregator:
    """Classify ``reduction`` as a reducer (wrapped) or an aggregator; else ``TypeError``."""
    if isinstance(reduction, WrappedReducer):
        return reduction
    if not callable(reduction):
        raise TypeError(
            f"reduction must be callable, got {reduction!r} ({type(reduction).__name__}); "
            "pass a reducer f(terms) or an aggregator f(terms, quantities, ctx)"
        )
    try:
        signature = inspect.signature(reduction)
    except (TypeError, ValueError):
        # builtins such as max have no signature; they take one iterable
        return WrappedReducer(reduction)
    if _binds(signature, 1):
        return WrappedReducer(reduction)
    if _binds(signature, 3):
        return reduction
    raise TypeError(
        f"reduction {reduction!r} has signature {signature}, which accepts neither (terms) nor "
        "(terms, quantities, ctx); pass a reducer f(terms) or an aggregator "
        "f(terms, quantities, ctx)"
    )


# -- terms and weights --------------------------------------------------------------------------


def transform_generic_callables(seq: Iterable[Any]) -> list[ObjectiveFunctor]:
    """Objective functors are kept; other callables ``f(parameters)`` are wrapped.

    Examples
    --------
    >>> terms = transform_generic_callables([lambda p: p["x"]])
    >>> type(terms[0]).__name__, terms[0]({"x": 2.0})
    ('WrappedObjectiveFunctor', 2.0)
    """
    result: list[ObjectiveFunctor] = []
    for idx, func in enumerate(seq):
        if isinstance(func, ObjectiveFunctor):
            result.append(func)
        elif callable(func):
            result.append(WrappedObjectiveFunctor(func))
        else:
            raise TypeError(
                f"objective function {idx} is not callable: {func!r} ({type(func).__name__}); "
                "pass ObjectiveFunctors or functions f(parameters) -> float"
            )
    return result


def _validated_weights(
    weights: Iterable[Any], n_expected: int, name: str, what: str = "objective functions"
) -> list[float]:
    """Weights as floats; ``ValueError`` unless there are ``n_expected``, all finite and >= 0."""
    values: list[float] = []
    for idx, w in enumerate(weights):
        try:
            if isinstance(w, (str, bytes)):
                raise TypeError
            w = float(w)
        except (TypeError, ValueError):
            raise TypeError(
                f"{name}[{idx}] must be a real number, got {w!r} ({type(w).__name__}); pass floats"
            ) from None
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"{name}[{idx}] must be finite and >= 0, got {w!r}; fix that weight")
        values.append(w)
    if len(values) != n_expected:
        raise ValueError(
            f"{name} has {len(values)} entries but there are {n_expected} {what}; "
            f"pass one weight per entry of {what}"
        )
    return values


def _is_scalar_weight(weights: Any) -> bool:
    return isinstance(weights, numbers.Real) or (
        hasattr(weights, "ndim") and getattr(weights, "ndim", None) == 0
    )


# -- the combined objective ---------------------------------------------------------------------


class CombinedObjectiveFunction(ObjectiveFunctor):
    """A weighted combination of objective functions.

    Each term is evaluated in its own child context; its value times its weight is a *term*.
    The kept terms are reduced to the loss (by default their sum).

    Parameters
    ----------
    objective_functions : sequence of callables
        Objective functors, or plain functions ``f(parameters) -> float`` (wrapped as
        :class:`~chemfit.core.wrapping.WrappedObjectiveFunctor`).
    weights : sequence of float, optional
        One finite weight >= 0 per term; default 1.0 each.
    child_context_configurator : ChildContextConfigurator, optional
        Configures each child context before the terms run; gets absolute term indices.
    reduction : Reducer or Aggregator, default sum_reducer
        See :attr:`reduction`.
    exception_handler : ExceptionHandler, default raising_exception_handler
        Decides what a term that raises contributes; its value is not weighted.

    Attributes
    ----------
    objective_functions : list[ObjectiveFunctor]
    weights : list[float]
    child_context_configurator : ChildContextConfigurator | None
    exception_handler : ExceptionHandler
    static_meta_data : dict
        Merged into ``ctx.meta`` at the start of every call (empty by default).

    Notes
    -----
    After a call, ``ctx.meta`` holds ``"n_terms"``, ``"children"`` (one
    ``{"quantities", "parameters", "loss", "meta"}`` dict per term, with unweighted losses;
    nested COBs nest their children) and ``"skipped_indices"``.

    Examples
    --------
    >>> cob = CombinedObjectiveFunction(
    ...     [lambda p: p["x"] ** 2, lambda p: (p["x"] - 1.0) ** 2], weights=[1.0, 2.0]
    ... )
    >>> ctx = EvaluateContext()
    >>> cob({"x": 2.0}, ctx)
    6.0
    >>> ctx.meta["n_terms"], [c["loss"] for c in ctx.meta["children"]], ctx.meta["skipped_indices"]
    (2, [4.0, 1.0], [])
    """

    def __init__(
        self,
        objective_functions: Iterable[Callable[..., Any]],
        weights: Iterable[float] | None = None,
        child_context_configurator: ChildContextConfigurator | None = None,
        reduction: Reducer | Aggregator | Callable[..., Any] = sum_reducer,
        exception_handler: ExceptionHandler = raising_exception_handler,
    ) -> None:
        if callable(objective_functions):
            raise TypeError(
                f"objective_functions must be a sequence of callables, got the single callable "
                f"{objective_functions!r}; wrap it in a list"
            )
        self.objective_functions: list[ObjectiveFunctor] = transform_generic_callables(
            objective_functions
        )
        n = len(self.objective_functions)
        self.weights: list[float] = (
            [1.0] * n if weights is None else _validated_weights(weights, n, "weights")
        )
        if child_context_configurator is not None and not callable(child_context_configurator):
            raise TypeError(
                "child_context_configurator must be callable or None, got "
                f"{child_context_configurator!r}; pass a function "
                "(idx_child_ctx, child_ctx, num_children, parent_ctx) -> None"
            )
        self.child_context_configurator = child_context_configurator
        self.reduction = reduction
        if not callable(exception_handler):
            raise TypeError(
                f"exception_handler must be callable, got {exception_handler!r}; pass e.g. "
                "raising_exception_handler, nan_exception_handler or skip_exception_handler"
            )
        self.exception_handler = exception_handler
        self.static_meta_data: dict = {}

    # -- configuration ----------------------------------------------------------------------

    @property
    def reduction(self) -> Aggregator:
        """The reduction, as an :class:`Aggregator`.

        Assigning classifies the value again: a callable that accepts ``(terms)``, or a builtin
        without a signature, is a reducer and is held as a :class:`WrappedReducer`; a callable
        that accepts only ``(terms, quantities, ctx)`` is an aggregator; anything else raises
        ``TypeError``. The reduction's result is cast to ``float``.

        Examples
        --------
        >>> cob = CombinedObjectiveFunction([lambda p: 1.0, lambda p: 5.0])
        >>> cob.reduction = max
        >>> cob.reduction, cob({})
        (WrappedReducer('max'), 5.0)
        """
        return self._reduction

    @reduction.setter
    def reduction(self, value: Reducer | Aggregator | Callable[..., Any]) -> None:
        self._reduction = _as_aggregator(value)

    def n_terms(self) -> int:
        """The number of terms.

        Examples
        --------
        >>> CombinedObjectiveFunction([lambda p: 1.0] * 3).n_terms()
        3
        """
        return len(self.objective_functions)

    def add(
        self,
        obj_funcs: Callable[..., Any] | Iterable[Callable[..., Any]],
        weights: Sequence[float] | float = 1.0,
    ) -> Self:
        """Append one objective function or a sequence of them, in place.

        Parameters
        ----------
        obj_funcs : callable or sequence of callables
            The new terms (plain functions are wrapped).
        weights : float or sequence of float, default 1.0
            One weight for all new terms, or one per new term.

        Returns
        -------
        Self
            ``self``, for chaining.

        Examples
        --------
        >>> cob = CombinedObjectiveFunction([lambda p: 1.0])
        >>> cob.add(lambda p: 2.0, 3.0).add([lambda p: 1.0, lambda p: 1.0], [0.5, 0.5]).weights
        [1.0, 3.0, 0.5, 0.5]
        >>> cob({})
        8.0
        """
        new_funcs = transform_generic_callables([obj_funcs] if callable(obj_funcs) else obj_funcs)
        if _is_scalar_weight(weights):
            new_weights = _validated_weights([weights] * len(new_funcs), len(new_funcs), "weights")
        else:
            new_weights = _validated_weights(weights, len(new_funcs), "weights")
        self.objective_functions.extend(new_funcs)
        self.weights.extend(new_weights)
        return self

    @classmethod
    def add_flat(
        cls,
        cobs: Sequence[CombinedObjectiveFunction],
        weights: Sequence[float] | None = None,
        **kwargs: Any,
    ) -> Self:
        """A new, flat COB holding the terms of several COBs.

        Each COB's weights are scaled by its factor in ``weights`` (default 1.0). The reduction,
        handler and configurator are the class defaults unless given in ``kwargs``, which go to
        ``__init__``.

        Examples
        --------
        >>> a = CombinedObjectiveFunction([lambda p: 1.0], weights=[2.0])
        >>> b = CombinedObjectiveFunction([lambda p: 1.0, lambda p: 1.0])
        >>> flat = CombinedObjectiveFunction.add_flat([a, b], weights=[1.0, 0.5])
        >>> flat.weights, flat({})
        ([2.0, 0.5, 0.5], 3.0)
        """
        cobs = list(cobs)
        for idx, cob in enumerate(cobs):
            if not isinstance(cob, CombinedObjectiveFunction):
                raise TypeError(
                    f"cobs[{idx}] must be a CombinedObjectiveFunction, got {type(cob).__name__}; "
                    "use add() for single objective functions"
                )
        factors = (
            [1.0] * len(cobs)
            if weights is None
            else _validated_weights(weights, len(cobs), "weights", "combined objectives")
        )
        funcs: list[ObjectiveFunctor] = []
        total_weights: list[float] = []
        for cob, factor in zip(cobs, factors):
            funcs.extend(cob.objective_functions)
            total_weights.extend(w * factor for w in cob.weights)
        return cls(funcs, total_weights, **kwargs)

    def select(self, indices: Iterable[int] | slice) -> Self:
        """A new COB with the chosen terms and their weights.

        The reduction, exception handler and configurator are the same objects; the
        configurator then sees indices within the selection.

        Examples
        --------
        >>> cob = CombinedObjectiveFunction([lambda p: 1.0, lambda p: 2.0, lambda p: 4.0])
        >>> cob.select([0, 2])({}), cob.select(slice(1, None)).n_terms()
        (5.0, 2)
        """
        n = self.n_terms()
        if isinstance(indices, slice):
            chosen = list(range(n))[indices]
        else:
            chosen = []
            for idx in indices:
                if isinstance(idx, bool) or not isinstance(idx, numbers.Integral):
                    raise TypeError(
                        f"indices must be ints, got {idx!r} ({type(idx).__name__}); "
                        "pass term indices"
                    )
                if not -n <= idx < n:
                    raise ValueError(
                        f"term index {idx} is out of range for a COB with {n} terms; "
                        f"pass indices in [0, {n})"
                    )
                chosen.append(int(idx) % n)
        new = copy.copy(self)
        new.objective_functions = [self.objective_functions[i] for i in chosen]
        new.weights = [self.weights[i] for i in chosen]
        new.static_meta_data = copy.deepcopy(self.static_meta_data)
        return new

    # -- evaluation steps -------------------------------------------------------------------

    def prepare_context(
        self, parameters: dict, ctx: EvaluateContext | None = None
    ) -> EvaluateContext:
        """Start an evaluation: validate, set ``ctx.parameters`` and ``ctx.meta["n_terms"]``.

        Merges :attr:`static_meta_data` into ``ctx.meta`` first. Raises ``ValueError`` for an
        empty COB or weights that do not fit the terms. Returns ``ctx`` (a new one if ``None``).

        Examples
        --------
        >>> ctx = CombinedObjectiveFunction([lambda p: 1.0]).prepare_context({"x": 1.0})
        >>> ctx.parameters, ctx.meta
        ({'x': 1.0}, {'n_terms': 1})
        """
        n = self.n_terms()
        if n == 0:
            raise ValueError(
                "cannot evaluate a CombinedObjectiveFunction with no terms; add objective "
                "functions first (add())"
            )
        _validated_weights(self.weights, n, "weights")
        ctx = ensure_context(ctx)
        ctx.parameters = parameters
        ctx.meta.update(self.static_meta_data)
        ctx.meta["n_terms"] = n
        return ctx

    def evaluate_term(self, parameters: dict, idx: int, ctx: EvaluateContext) -> float | None:
        """Evaluate term ``idx`` in its child context ``ctx``.

        Returns the term's value times its weight. When the term raises an ``Exception``, the
        :attr:`exception_handler` decides: its value is returned unweighted, ``None`` means
        "skip", and it may re-raise. This method is self-contained, so a parallel wrapper can
        run it anywhere (another thread, process or MPI rank) with an unpickled child context.

        Examples
        --------
        >>> cob = CombinedObjectiveFunction([lambda p: p["x"]], weights=[3.0])
        >>> child = EvaluateContext()
        >>> cob.evaluate_term({"x": 2.0}, 0, child), child.loss
        (6.0, 2.0)
        """
        try:
            value = self.objective_functions[idx](parameters, ctx)
        except Exception as exception:
            return self.exception_handler(exception, ctx, idx)
        return value * self.weights[idx]

    def run_term(self, parameters: dict, idx: int, child: EvaluateContext) -> float | None:
        """Evaluate term ``idx`` in ``child`` and collect the child's own children into its meta.

        :meth:`evaluate_term`, then ``child.collect_child_meta_data()`` (also when the term's
        exception handler raises). A term that runs sub-evaluations of its own (it spawns
        children of ``child``) thus has them in ``child.meta["children"]``, which travels back
        with ``child.to_result_state()`` when the term ran in another process or on another
        rank. Parallel wrappers run this where the term runs.

        Examples
        --------
        >>> from chemfit.core.wrapping import WrappedObjectiveFunctor
        >>> def two_sub_evaluations(parameters, ctx):
        ...     for i, grandchild in enumerate(ctx.spawn_children(2)):
        ...         grandchild.loss = float(i)
        ...     return 1.0
        >>> cob = CombinedObjectiveFunction([WrappedObjectiveFunctor(two_sub_evaluations, True)])
        >>> child = EvaluateContext()
        >>> cob.run_term({}, 0, child), [g["loss"] for g in child.meta["children"]]
        (1.0, [0.0, 1.0])
        """
        try:
            return self.evaluate_term(parameters, idx, child)
        finally:
            child.collect_child_meta_data(recursive=True)

    def filter_terms(self, terms: Sequence[float | None], ctx: EvaluateContext) -> list[float]:
        """Drop skipped terms (``None``); write ``ctx.meta["skipped_indices"]``.

        ``terms`` must hold all terms in index order, as :meth:`evaluate_term` returned them.

        Examples
        --------
        >>> ctx = EvaluateContext()
        >>> CombinedObjectiveFunction([]).filter_terms([1.0, None, 2.0], ctx)
        [1.0, 2.0]
        >>> ctx.meta
        {'skipped_indices': [1]}
        """
        ctx.meta["skipped_indices"] = [idx for idx, term in enumerate(terms) if term is None]
        return [term for term in terms if term is not None]

    def apply_reduction(self, terms: Sequence[float], ctx: EvaluateContext) -> float:
        """Reduce the kept terms to a float.

        The aggregator gets the kept terms, the quantities of the kept children (read from
        ``ctx.children``, skipping ``ctx.meta["skipped_indices"]``) and ``ctx``. When no term
        was kept, no reduction runs: the result is NaN and a WARNING lists the skipped indices.
        Call it after :meth:`filter_terms`.

        Examples
        --------
        >>> ctx = EvaluateContext()
        >>> cob = CombinedObjectiveFunction([lambda p: 1.0], reduction=max)
        >>> cob.apply_reduction([1.0, 3.0], ctx)
        3.0
        """
        skipped = list(ctx.meta.get("skipped_indices", []))
        if len(terms) == 0:
            logger.warning(
                "all %d terms were skipped (skipped_indices=%s); the loss is NaN",
                len(skipped),
                skipped,
            )
            return math.nan
        skipped_set = set(skipped)
        children = ctx.children
        kept = [i for i in range(len(terms) + len(skipped)) if i not in skipped_set]
        quantities = [children[i].quantities if i < len(children) else None for i in kept]
        return float(self._reduction(list(terms), quantities, ctx))

    def evaluate_terms(self, parameters: dict, ctx: EvaluateContext) -> list[float]:
        """Evaluate all terms serially and return the kept ones.

        Runs :meth:`prepare_context`, then :meth:`evaluate_term` for every term inside
        ``ctx.child_contexts(n, self.child_context_configurator)`` (so the children, with the
        terms' own sub-evaluations, are collected into ``ctx.meta["children"]`` even if a term
        raises), then
        :meth:`filter_terms`. :meth:`evaluate` runs these steps and reduces.

        Examples
        --------
        >>> cob = CombinedObjectiveFunction([lambda p: 1.0, lambda p: 2.0], weights=[1.0, 2.0])
        >>> ctx = EvaluateContext()
        >>> cob.evaluate_terms({}, ctx), sorted(ctx.meta)
        ([1.0, 4.0], ['children', 'n_terms', 'skipped_indices'])
        """
        return self._kept_terms(parameters, ctx, self._run_terms_serially)

    def _run_terms_serially(
        self, parameters: dict, children: list[EvaluateContext]
    ) -> list[float | None]:
        # run_term without its early collect: these children are collected (recursively, so
        # with the terms' own sub-evaluations) when the child_contexts block ends
        evaluate_term = self.evaluate_term
        return [evaluate_term(parameters, idx, child) for idx, child in enumerate(children)]

    def _kept_terms(
        self, parameters: dict, ctx: EvaluateContext | None, run_terms: _RunTerms
    ) -> list[float]:
        """The recipe up to the reduction: prepare, spawn and configure, run, collect, filter."""
        ctx = self.prepare_context(parameters, ctx)
        n_terms = self.n_terms()
        with ctx.child_contexts(n_terms, self.child_context_configurator) as children:
            terms = run_terms(parameters, children)
            if len(terms) != n_terms:
                raise ValueError(
                    f"run_terms returned {len(terms)} values for {n_terms} terms; return one "
                    "value per term in term order (None for a skipped term)"
                )
        return self.filter_terms(terms, ctx)

    def evaluate(
        self,
        parameters: dict,
        ctx: EvaluateContext | None = None,
        *,
        run_terms: _RunTerms | None = None,
    ) -> float:
        """Evaluate the objective; ``run_terms`` says how the terms run (default: here, in order).

        The recipe: :meth:`prepare_context`; spawn ``n_terms()`` children of ``ctx`` and run the
        configurator on them (absolute indices); ``run_terms(parameters, children)``; collect
        the children into ``ctx.meta["children"]`` (also when a step raises);
        :meth:`filter_terms`; :meth:`apply_reduction`, whose value becomes ``ctx.loss``.

        ``run_terms`` must return one value per term in term order (what :meth:`run_term`
        returned, ``None`` for a skipped term). A term that ran elsewhere, on a copy of its
        child, is applied back with ``children[idx].apply_result_state(state)`` before
        ``run_terms`` returns or raises. When terms fail, ``run_terms`` applies the states of
        those that ran and raises the exception of the lowest term index, as a serial call
        would. Then value and ``ctx.meta`` equal the serial ones (R20).

        Parameters
        ----------
        parameters : dict
            The parameters.
        ctx : EvaluateContext, optional
            The context; a new one if ``None``.
        run_terms : callable, optional
            ``run_terms(parameters, children) -> list[float | None]``; default: each term in
            this thread, in order (as :meth:`run_term` would).

        Returns
        -------
        float
            The loss, also stored in ``ctx.loss``.

        Examples
        --------
        >>> from concurrent.futures import ThreadPoolExecutor
        >>> cob = CombinedObjectiveFunction([lambda p: p["x"], lambda p: 2 * p["x"]])
        >>> def on_threads(parameters, children):
        ...     with ThreadPoolExecutor(2) as pool:
        ...         futures = [
        ...             pool.submit(cob.run_term, parameters, idx, child)
        ...             for idx, child in enumerate(children)
        ...         ]
        ...         return [future.result() for future in futures]
        >>> ctx = EvaluateContext()
        >>> cob.evaluate({"x": 1.5}, ctx, run_terms=on_threads), ctx.meta["n_terms"]
        (4.5, 2)
        """
        ctx = ensure_context(ctx)
        if run_terms is None:  # through evaluate_terms, which subclasses may override
            kept = self.evaluate_terms(parameters, ctx)
        else:
            kept = self._kept_terms(parameters, ctx, run_terms)
        ctx.loss = self.apply_reduction(kept, ctx)
        return ctx.loss

    def __call__(self, parameters: dict, ctx: EvaluateContext | None = None) -> float:
        """Evaluate all terms and reduce them; sets ``ctx.parameters``, ``ctx.loss`` and meta.

        The same as :meth:`evaluate` without ``run_terms``. Raises ``ValueError`` for an empty
        COB. Exceptions of the terms go to the :attr:`exception_handler`; those of the
        configurator and the reduction propagate unchanged.
        """
        return self.evaluate(parameters, ctx)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n_terms={self.n_terms()}, reduction={self._reduction!r}, "
            f"exception_handler={getattr(self.exception_handler, '__name__', self.exception_handler)})"
        )
