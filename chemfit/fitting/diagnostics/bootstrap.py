"""Parameter uncertainty by refitting on resampled terms (the bootstrap).

Each resample draws the terms of a :class:`~chemfit.core.combined.CombinedObjectiveFunction`
with replacement: a term drawn ``k`` times gets ``k`` times its weight, a term not drawn is left
out. With ``resample="points"`` each term draws its own data points instead (terms that define
``resample(rng)``, see :class:`~chemfit.fitting.diagnostics.resampling.ResamplableTerm`). Every
refit is one task on the executor (whole fits run in parallel), a fit with its own
:class:`~chemfit.fitting.fitter.Fitter` that starts from the best point. Resample ``i`` of a
seed is always the same draw, so a bootstrap written to a JSON-lines ``path`` continues where an
interrupted one stopped; without a ``path``, ``fitter.result.diagnostics["bootstrap"]`` holds the
finished refits and a bootstrap started again continues from them.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from chemfit.core.combined import CombinedObjectiveFunction
from chemfit.core.context import EvaluateContext
from chemfit.execution.executor_utils import as_completed_with_context
from chemfit.fitting.diagnostics.evaluation import (
    FittedPoint,
    combined_objective,
    fitted_point,
)
from chemfit.fitting.diagnostics.resampling import missing_resample, resampled_objective
from chemfit.fitting.diagnostics.store import keep
from chemfit.fitting.fit_session import progress_bar
from chemfit.fitting.jsonl import append_line, float_from_json, json_float, read_jsonl, repair_tail
from chemfit.fitting.parameter_space import nested_floats

if TYPE_CHECKING:
    import pandas

__all__ = ["BootstrapResult", "PointRefitTask", "RefitTask", "bootstrap", "resample_counts"]

logger = logging.getLogger(__name__)

_FORMAT = "chemfit-bootstrap"


def resample_counts(seed: int, index: int, n_terms: int) -> list[int]:
    """How often each term is drawn in resample ``index`` (the same for the same seed).

    Examples
    --------
    >>> counts = resample_counts(0, 3, 5)
    >>> counts == resample_counts(0, 3, 5), sum(counts), len(counts)
    (True, 5, 5)
    """
    rng = np.random.default_rng([int(seed), int(index)])
    draws = rng.integers(0, n_terms, size=n_terms)
    return np.bincount(draws, minlength=n_terms).tolist()


def _optimizer_backend(optimizer: str) -> str:
    from chemfit.fitting.optimizer_lookup import check_scipy_method

    try:
        check_scipy_method(optimizer)
    except (ValueError, TypeError):
        return "nevergrad"
    return "scipy"


class RefitTask:
    """``task(counts, ctx)``: one bootstrap refit, run where the executor runs it.

    Builds the objective with the terms drawn ``counts`` times (weights times counts), fits it
    from ``start`` with at most ``budget`` evaluations and returns ``{"parameters": [...],
    "loss": ..., "n_evals": ..., "seconds": ...}`` (parameters in the order of ``names``).
    ``seed`` seeds a nevergrad optimizer; ``bootstrap()`` passes its own seed, so that running a
    bootstrap again, or continuing an interrupted one, gives the same refits.

    Examples
    --------
    >>> cob = CombinedObjectiveFunction([lambda p: (p["x"] - 1) ** 2, lambda p: (p["x"] - 3) ** 2])
    >>> task = RefitTask(cob, ["x"], [2.0], {}, budget=100)
    >>> out = task([2, 0], EvaluateContext())
    >>> round(out["parameters"][0], 3), out["n_evals"] <= 100
    (1.0, True)
    """

    def __init__(
        self,
        cob: CombinedObjectiveFunction,
        names: Sequence[str],
        start: Sequence[float],
        bounds: Mapping[str, Any],
        budget: int,
        optimizer: str = "Nelder-Mead",
        value_bad_params: float = 1e5,
        seed: int | None = None,
    ) -> None:
        self.cob = cob
        self.names = list(names)
        self.start = [float(v) for v in start]
        self.bounds = bounds
        self.budget = int(budget)
        self.optimizer = optimizer
        self.value_bad_params = float(value_bad_params)
        self.seed = None if seed is None else int(seed)

    def resampled(self, counts: Sequence[int]) -> CombinedObjectiveFunction:
        """The objective of one resample: the drawn terms, each weight times its count."""
        kept = [i for i, count in enumerate(counts) if count > 0]
        objective = self.cob.select(kept)
        objective.weights = [self.cob.weights[i] * counts[i] for i in kept]
        return objective

    def __call__(self, counts: Any, ctx: EvaluateContext) -> dict:
        from chemfit.fitting.fitter import Fitter

        start_time = time.perf_counter()
        fitter = Fitter(
            self.resampled(counts),
            nested_floats(zip(self.names, self.start)),
            bounds=self.bounds or None,
            value_bad_params=self.value_bad_params,
            swallow_exceptions=True,
            log_exceptions=False,
        )
        if _optimizer_backend(self.optimizer) == "scipy":

            def stop_at_budget(record: Any) -> None:
                if len(fitter.history) >= self.budget:
                    fitter.request_stop()

            fitter.register_evaluation_callback(stop_at_budget)
            fitter.fit_scipy(method=self.optimizer, progress=False, record_meta=False)
        else:
            fitter.fit_nevergrad(
                budget=self.budget,
                optimizer_str=self.optimizer,
                seed=self.seed,
                progress=False,
                record_meta=False,
            )
        result = fitter.result
        flat = _flat(result.best_parameters)
        return {
            "parameters": [flat[name] for name in self.names],
            "loss": float(result.best_loss),
            "n_evals": int(result.n_evals),
            "seconds": time.perf_counter() - start_time,
        }


class PointRefitTask(RefitTask):
    """``task(index, ctx)``: the refit of resample ``index`` of ``seed``, on resampled points.

    Every term is replaced by ``term.resample(rng)`` (its data points drawn with replacement,
    see :func:`~chemfit.fitting.diagnostics.resampling.resampled_objective`), in the worker:
    the terms' data travel once with the task. Otherwise as :class:`RefitTask`.

    Examples
    --------
    >>> class Mean:
    ...     def __init__(self, y):
    ...         self.y = np.asarray(y, float)
    ...     def __call__(self, p):
    ...         return float(np.sum((self.y - p["m"]) ** 2))
    ...     def resample(self, rng):
    ...         return Mean(rng.choice(self.y, len(self.y)))
    >>> cob = CombinedObjectiveFunction([Mean([1.0, 2.0, 3.0, 4.0])])
    >>> task = PointRefitTask(cob, ["m"], [2.5], {}, budget=100, seed=0)
    >>> out = task(1, EvaluateContext())
    >>> drawn = resampled_objective(cob, 0, 1).objective_functions[0].func.y
    >>> bool(abs(out["parameters"][0] - drawn.mean()) < 1e-3)
    True
    """

    def __init__(self, *args: Any, seed: int, **kwargs: Any) -> None:
        super().__init__(*args, seed=int(seed), **kwargs)

    def resampled(self, index: int) -> CombinedObjectiveFunction:  # type: ignore[override]
        """The objective of resample ``index``: each term's points drawn again."""
        return resampled_objective(self.cob, self.seed, index)


def _flat(parameters: Mapping[str, Any]) -> dict[str, float]:
    from chemfit.core.flatdict import flatten_dict

    return {key: float(value) for key, value in flatten_dict(parameters).items()}


@dataclass
class BootstrapResult:
    """The refits of a bootstrap (what ``Fitter.bootstrap()`` returns).

    Attributes
    ----------
    parameters : pandas.DataFrame
        One row per resample (index: the resample number), one column per flat parameter.
    losses : pandas.Series
        The best loss of each refit (on its resampled objective).
    counts : list[list[int]]
        How often each term was drawn, per resample (same order as the rows).
    best : pandas.Series
        The best parameters of the fit the resamples started from.
    seed : int
        Resample ``i`` is ``resample_counts(seed, i, n_terms)``.
    budget : int
        Objective evaluations per refit.
    optimizer : str
        A scipy ``minimize`` method or a nevergrad optimizer.
    resample : str
        ``"terms"`` (terms drawn with replacement) or ``"points"`` (each term's data points).
    requested : int
        How many resamples were asked for; fewer rows mean an interrupted bootstrap, which
        ``Fitter.bootstrap()`` continues.

    Examples
    --------
    >>> import pandas
    >>> result = BootstrapResult.from_records(
    ...     ["a", "b"], [1.0, 2.0], seed=0, budget=10, optimizer="Nelder-Mead",
    ...     records=[{"resample": i, "counts": [1], "parameters": [1.0 + d, 2.0 - d], "loss": 0.0}
    ...              for i, d in enumerate([-0.1, 0.0, 0.1])])
    >>> result.std().round(6).tolist(), round(float(result.corr().loc["a", "b"]), 6)
    ([0.1, 0.1], -1.0)
    >>> [round(v, 3) for v in result.interval(lambda p: p["a"] + p["b"])]
    [3.0, 3.0]
    """

    parameters: pandas.DataFrame
    losses: pandas.Series
    counts: list[list[int]]
    best: pandas.Series
    seed: int
    budget: int
    optimizer: str
    records: list[dict] = field(default_factory=list, repr=False)
    resample: str = "terms"
    requested: int = 0

    @classmethod
    def from_records(
        cls,
        names: Sequence[str],
        best: Sequence[float],
        *,
        seed: int,
        budget: int,
        optimizer: str,
        records: Sequence[Mapping[str, Any]],
        resample: str = "terms",
        requested: int | None = None,
    ) -> BootstrapResult:
        """Build from the records of the refits (as written to the JSON-lines file)."""
        import pandas

        records = sorted(records, key=lambda record: record["resample"])
        index = pandas.Index([int(r["resample"]) for r in records], name="resample")
        rows = [
            [math.nan if v is None else float_from_json(v) for v in r["parameters"]]
            if r.get("parameters") is not None
            else [math.nan] * len(names)
            for r in records
        ]
        losses = [
            math.nan if r.get("loss") is None else float_from_json(r["loss"]) for r in records
        ]
        return cls(
            parameters=pandas.DataFrame(
                np.array(rows, dtype=float).reshape(len(records), len(names)),
                index=index,
                columns=list(names),
            ),
            losses=pandas.Series(losses, index=index, name="loss", dtype=float),
            counts=[list(r["counts"]) for r in records],
            best=pandas.Series(np.asarray(best, dtype=float), index=list(names), name="best"),
            seed=int(seed),
            budget=int(budget),
            optimizer=str(optimizer),
            records=[dict(r) for r in records],
            resample=str(resample),
            requested=len(records) if requested is None else int(requested),
        )

    @property
    def complete(self) -> bool:
        """Whether every requested refit finished (``False`` after an interrupt)."""
        return len(self) >= self.requested

    def __len__(self) -> int:
        return len(self.parameters)

    def std(self, ddof: int = 1) -> pandas.Series:
        """The standard deviation of each parameter over the resamples."""
        return self.parameters.std(ddof=ddof)

    def corr(self) -> pandas.DataFrame:
        """The correlation matrix of the parameters over the resamples."""
        return self.parameters.corr()

    def mean(self) -> pandas.Series:
        """The mean of each parameter over the resamples."""
        return self.parameters.mean()

    def values(self, fn: Callable[[dict], float] | str) -> np.ndarray:
        """``fn(parameters)`` for each resample (nested parameters, as the objective takes
        them), or the column of a flat parameter name."""
        if isinstance(fn, str):
            if fn not in self.parameters.columns:
                raise ValueError(
                    f"{fn!r} is not a parameter; the parameters are {list(self.parameters)}"
                )
            return self.parameters[fn].to_numpy(dtype=float)
        names = list(self.parameters.columns)
        return np.array(
            [float(fn(nested_floats(zip(names, row)))) for row in self.parameters.to_numpy()],
            dtype=float,
        )

    def interval(
        self, fn: Callable[[dict], float] | str, level: float = 0.95
    ) -> tuple[float, float]:
        """The percentile interval of a derived property ``fn(parameters) -> float``.

        ``level`` of the resamples' values lie between ``low`` and ``high`` (NaN values, from
        failed refits or ``fn``, are left out). ``fn`` may also be a flat parameter name.
        """
        if not 0.0 < level < 1.0:
            raise ValueError(f"level must lie between 0 and 1, got {level!r}; e.g. 0.95")
        values = self.values(fn)
        values = values[np.isfinite(values)]
        if values.size == 0:
            raise ValueError("no resample gave a finite value; check the refits (losses)")
        tail = 100.0 * (1.0 - level) / 2.0
        low, high = np.percentile(values, [tail, 100.0 - tail])
        return float(low), float(high)

    def to_dict(self) -> dict:
        """JSON-safe data: the header and the refit records."""
        return {
            "format": _FORMAT,
            "names": list(self.parameters.columns),
            "best": [json_float(v) for v in self.best],
            "seed": self.seed,
            "budget": self.budget,
            "optimizer": self.optimizer,
            "records": [dict(r) for r in self.records],
            "resample": self.resample,
            "requested": self.requested,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BootstrapResult:
        """Rebuild from :meth:`to_dict` output."""
        return cls.from_records(
            data["names"],
            [float_from_json(v) for v in data["best"]],
            seed=data["seed"],
            budget=data["budget"],
            optimizer=data["optimizer"],
            records=data["records"],
            resample=data.get("resample", "terms"),
            requested=data.get("requested"),
        )

    def __repr__(self) -> str:
        spread = ", ".join(
            f"{name}={mean:.6g}+-{std:.2g}"
            for name, mean, std in zip(self.parameters.columns, self.mean(), self.std())
        )
        return f"BootstrapResult({len(self)} resamples: {spread})"


# -- the file of finished refits -------------------------------------------------------------


def _header(
    point: FittedPoint, n_terms: int, seed: int, budget: int, optimizer: str, resample: str
) -> dict:
    return {
        "format": _FORMAT,
        "names": point.names,
        "best": [json_float(v) for v in point.vector()],
        "n_terms": n_terms,
        "seed": seed,
        "budget": budget,
        "optimizer": optimizer,
        "resample": resample,
    }


def _read_file(path: Path) -> tuple[dict | None, list[dict]]:
    if not path.exists() or not path.read_text(encoding="utf-8").strip():
        return None, []
    lines = read_jsonl(path, dict, what="bootstrap record")
    header, records = lines[0], lines[1:]
    if header.get("format") != _FORMAT:
        raise ValueError(
            f"{path} is not a chemfit bootstrap file (its first line has no "
            f"'format': '{_FORMAT}'); pass another path= or delete the file"
        )
    return header, records


def _check_header(path: Path, header: dict, expected: dict, seed_given: bool) -> None:
    header = {"resample": "terms", **header}  # files written before resample="points"
    for key in ("names", "n_terms", "resample") + (("seed",) if seed_given else ()):
        if header.get(key) != expected[key]:
            raise ValueError(
                f"{path} holds a bootstrap with {key}={header.get(key)!r}, but this one has "
                f"{key}={expected[key]!r}; pass another path= (or delete the file) to start a "
                "new bootstrap"
            )
    for key in ("budget", "optimizer"):
        if header.get(key) != expected[key]:
            logger.warning(
                "%s: the earlier refits used %s=%r, the new ones %r",
                path,
                key,
                header.get(key),
                expected[key],
            )
    if "best" in header and header["best"] != expected["best"]:
        logger.warning(
            "%s: the earlier refits started from the best point %s, the new ones start from %s "
            "(the fit has moved on since); pass another path= to refit all from the new point",
            path,
            header["best"],
            expected["best"],
        )


# -- bootstrap() --------------------------------------------------------------------------------


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


_RESAMPLE = ("terms", "points")


def bootstrap(
    fitter: Any,
    n: int,
    executor: Any = None,
    budget: int = 200,
    seed: int | None = None,
    *,
    optimizer: str = "Nelder-Mead",
    path: str | os.PathLike | None = None,
    progress: bool | None = None,
    resample: str = "terms",
) -> BootstrapResult:
    """Refit on ``n`` resamples of the terms; each refit is one task on ``executor``.

    Parameters
    ----------
    fitter : Fitter
        After a fit, with a :class:`~chemfit.core.combined.CombinedObjectiveFunction` (or a
        parallel wrapper of one, whose ``cob`` is refitted serially in each task).
    n : int
        The number of resamples (when continuing: in total, the finished ones included).
    executor : optional
        Where the refits run, all submitted at once; ``None`` runs them here, one by one.
    budget : int
        Objective evaluations per refit.
    seed : int, optional
        Resample ``i`` is ``resample_counts(seed, i, n_terms)`` (with ``resample="points"``:
        drawn by ``numpy.random.default_rng([seed, i])``); default a random seed (when
        continuing: the earlier one's).
    optimizer : str
        A ``scipy.optimize.minimize`` method (default Nelder-Mead, robust and local: refits
        start from the best point) or a nevergrad optimizer name, seeded by ``seed``.
    path : str or PathLike, optional
        A JSON-lines file of finished refits: each is appended as it finishes, and a
        bootstrap started again with the same file continues after the ones it holds (with
        a warning when the fit's best point has moved since the file was begun).
    progress : bool, optional
        A progress bar of refits (as for ``fit_nevergrad``).
    resample : {"terms", "points"}
        ``"terms"``: draw the terms with replacement. ``"points"``: keep every term and its
        weight, and let each draw its own data points with ``term.resample(rng)`` (see
        :class:`~chemfit.fitting.diagnostics.resampling.ResamplableTerm`); ``TypeError``
        names the terms without that method.

    Returns
    -------
    BootstrapResult
        ``parameters`` (a DataFrame, one row per resample), ``std()``, ``corr()`` and
        ``interval(fn, level)``. It is also kept as ``fitter.result.diagnostics["bootstrap"]``,
        with the finished refits of an interrupted bootstrap: without ``path``, a bootstrap
        started again with the same settings (``seed`` left out or the same) and the same
        best point continues from them. A finished bootstrap is replaced by the next one.

    Examples
    --------
    >>> from chemfit.fitting.fitter import Fitter
    >>> cob = CombinedObjectiveFunction(
    ...     [lambda p, y=y: (p["m"] - y) ** 2 for y in [1.0, 2.0, 3.0, 4.0]])
    >>> fitter = Fitter(cob, {"m": 0.0})
    >>> _ = fitter.fit_scipy()
    >>> result = bootstrap(fitter, 20, seed=1, budget=60)
    >>> result.parameters.shape, bool(0.2 < result.std()["m"] < 0.9)
    ((20, 1), True)
    >>> fitter.result.diagnostics["bootstrap"] is result
    True
    """
    n = _check_int("n", n, 1)
    budget = _check_int("budget", budget, 1)
    if seed is not None:
        seed = _check_int("seed", seed, 0)
    if resample not in _RESAMPLE:
        raise ValueError(f"resample must be one of {_RESAMPLE}, got {resample!r}")
    point = fitted_point(fitter, "bootstrap()")
    cob = _resampled_cob(point, resample)
    n_terms = cob.n_terms()
    file = None if path is None else Path(path)
    header, records = _read_file(file) if file is not None else (None, [])
    seed_given = seed is not None
    if file is None:
        held = _unfinished(fitter, point, n_terms, seed, budget, optimizer, resample)
        if held is not None:
            header, records = {"seed": held.seed}, [dict(r) for r in held.records]
    if seed is None:
        seed = int(header["seed"]) if header else int(np.random.SeedSequence().entropy % 2**63)
    expected = _header(point, n_terms, int(seed), budget, optimizer, resample)
    if file is not None:
        if header is None:
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_text("", encoding="utf-8")
            append_line(file, expected)
        else:
            _check_header(file, header, expected, seed_given)
            repair_tail(file)
    done = {int(r["resample"]) for r in records}
    todo = [i for i in range(n) if i not in done]
    if done:
        where = file if file is not None else "fitter.result"
        logger.info("bootstrap: %d refits read from %s, %d to run", len(done), where, len(todo))
    arguments = (
        cob,
        point.names,
        point.vector(),
        fitter.bounds,
        budget,
        optimizer,
        getattr(fitter, "value_bad_params", 1e5),
    )
    if resample == "points":
        task: RefitTask = PointRefitTask(*arguments, seed=int(seed))
        counts = {i: [1] * n_terms for i in todo}
        items = {i: i for i in todo}
    else:
        task = RefitTask(*arguments, seed=int(seed))
        counts = {i: resample_counts(int(seed), i, n_terms) for i in todo}
        items = counts

    def result() -> BootstrapResult:
        return BootstrapResult.from_records(
            point.names,
            point.vector(),
            seed=int(seed),
            budget=budget,
            optimizer=optimizer,
            records=[r for r in records if int(r["resample"]) < n],
            resample=resample,
            requested=n,
        )

    bar = progress_bar(progress, n, "bootstrap", initial=len([i for i in done if i < n]))
    if bar is not None:
        bar.unit = "refit"
        bar.refresh()
    try:
        for i, outcome in _run(task, todo, items, executor):
            record = {"resample": i, "counts": counts[i]}
            if isinstance(outcome, BaseException):
                logger.warning(
                    "bootstrap: refit %d failed (%s: %s)", i, type(outcome).__name__, outcome
                )
                record.update(
                    parameters=None, loss=None, error=f"{type(outcome).__name__}: {outcome}"
                )
            else:
                record.update(
                    parameters=outcome["parameters"],
                    loss=json_float(outcome["loss"]),
                    n_evals=outcome["n_evals"],
                    seconds=outcome["seconds"],
                )
            records.append(record)
            if file is not None:
                append_line(file, record)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        keep(fitter, "bootstrap", result())  # also the refits of an interrupted bootstrap
    return fitter.result.diagnostics["bootstrap"]


def _resampled_cob(point: FittedPoint, resample: str) -> CombinedObjectiveFunction:
    """The combined objective to resample; ``TypeError`` when it cannot be resampled so."""
    cob = combined_objective(point.objective)
    if cob is None:
        raise TypeError(
            "bootstrap() resamples the terms of a CombinedObjectiveFunction, but the fitter's "
            f"objective is a {type(point.objective).__name__}; make it a "
            "CombinedObjectiveFunction with one term per datum (or group of data)"
        )
    if resample == "points":
        missing = missing_resample(cob)
        if missing:
            raise TypeError(
                "bootstrap(resample='points') needs every term to draw its own data points "
                f"with a method resample(rng) -> term, but {len(missing)} of {cob.n_terms()} "
                f"terms do not define it: {missing}; add the method to them (see "
                "chemfit.fitting.diagnostics.ResamplableTerm) or use resample='terms'"
            )
    return cob


def _unfinished(
    fitter: Any,
    point: FittedPoint,
    n_terms: int,
    seed: int | None,
    budget: int,
    optimizer: str,
    resample: str,
) -> BootstrapResult | None:
    """The interrupted bootstrap ``fitter.result`` holds, when this one continues it."""
    held = fitter.result.diagnostics.get("bootstrap")
    if not isinstance(held, BootstrapResult) or held.complete:
        return None
    same = (
        list(held.parameters.columns) == point.names
        and all(len(c) == n_terms for c in held.counts)
        and (seed is None or seed == held.seed)
        and (held.budget, held.optimizer, held.resample) == (budget, optimizer, resample)
        and held.best.tolist() == point.vector().tolist()
    )
    if not same:
        logger.info(
            "bootstrap: fitter.result holds an unfinished bootstrap with other settings or "
            "from another best point; starting a new one"
        )
        return None
    return held


def _run(task: RefitTask, todo: list[int], items: Mapping[int, Any], executor: Any) -> Any:
    """``(resample, outcome or exception)`` as the refits finish (``task(items[i], ctx)``)."""
    if executor is None:
        for i in todo:
            try:
                yield i, task(items[i], EvaluateContext())
            except Exception as exc:
                yield i, exc
        return
    ctxs = [EvaluateContext() for _ in todo]
    with as_completed_with_context(
        executor, task, [items[i] for i in todo], ctxs=ctxs, return_exceptions=True
    ) as finished:
        for position, outcome in finished:
            yield todo[position], outcome
