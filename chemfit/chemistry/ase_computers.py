"""Quantity computers that evaluate structures with a parameterised ASE calculator (extra ``ase``).

Each computer is built from plain callables: an atoms factory (the structure), an optional atoms
post-processor, a calculator factory (attaches a fresh calculator) and a parameter applier (writes
the fit parameters into it). The structures are built once, under a lock, and cached; every call
works on copies, so one computer can serve several threads, and it pickles for process pools,
loky, ipyparallel and MPI ranks (the cache travels with it once built).

ASE is imported when a computer is created, never when this module is imported.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from numbers import Number
from typing import Any

import numpy as np

from chemfit.chemistry._optional import require_ase
from chemfit.chemistry.ase_atoms import PathAtomsFactory, count_images
from chemfit.chemistry.ase_processors import DefaultQuantityProcessor
from chemfit.core.context import EvaluateContext
from chemfit.core.objectives import QuantityComputer
from chemfit.core.utils import PicklesWithoutLock

__all__ = [
    "MinimizationASEComputer",
    "MultiStructureASEComputer",
    "SinglePointASEComputer",
    "run_calculation",
    "structure_summary",
]

logger = logging.getLogger(__name__)


def _check_callable(value: Any, argument: str, what: str, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not callable(value):
        raise TypeError(
            f"{argument} must be a callable {what}, got {value!r:.80} ({type(value).__name__})"
        )


def _as_processors(quantity_processors: Any) -> list[Callable[..., dict]]:
    if quantity_processors is None:
        return [DefaultQuantityProcessor()]
    if callable(quantity_processors):
        return [quantity_processors]
    processors = list(quantity_processors)
    if not processors:
        raise ValueError(
            "quantity_processors is empty; pass None for the default processor or at least one "
            "processor(calc, atoms) -> dict"
        )
    for i, proc in enumerate(processors):
        _check_callable(proc, f"quantity_processors[{i}]", "processor(calc, atoms) -> dict")
    return processors


def run_calculation(atoms: Any) -> None:
    """Compute the energy, and the forces and stress when the calculator implements them.

    The stress is only asked for fully periodic cells. Results land in ``atoms.calc.results``.

    Examples
    --------
    >>> from ase import Atoms
    >>> from ase.calculators.emt import EMT
    >>> atoms = Atoms("Cu2", positions=[[0, 0, 0], [0, 0, 2.3]], calculator=EMT())
    >>> run_calculation(atoms)
    >>> sorted(k for k in atoms.calc.results if k in ("energy", "forces", "stress"))
    ['energy', 'forces']
    """
    atoms.get_potential_energy()
    implemented = getattr(atoms.calc, "implemented_properties", ())
    if "forces" in implemented:
        atoms.get_forces()
    if "stress" in implemented and atoms.pbc.all() and atoms.cell.rank == 3:
        atoms.get_stress()


def structure_summary(atoms: Any, tag: str | None = None) -> dict:
    """Plain-float summary of one evaluated structure, for ``ctx.meta`` and live plots.

    Examples
    --------
    >>> from ase import Atoms
    >>> from ase.calculators.singlepoint import SinglePointCalculator
    >>> atoms = Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]])
    >>> atoms.calc = SinglePointCalculator(atoms, energy=-4.0, forces=[[0, 0, 1.0], [0, 0, -1.0]])
    >>> structure_summary(atoms, tag="h2")
    {'tag': 'h2', 'n_atoms': 2, 'energy': -4.0, 'energy_per_atom': -2.0, 'fmax': 1.0}
    """
    results = atoms.calc.results
    n_atoms = len(atoms)
    energy = float(results["energy"])
    summary: dict = {"tag": tag, "n_atoms": n_atoms, "energy": energy}
    summary["energy_per_atom"] = energy / n_atoms if n_atoms else float("nan")
    forces = results.get("forces")
    summary["fmax"] = (
        float(np.sqrt((np.asarray(forces) ** 2).sum(axis=1)).max())
        if forces is not None and len(forces)
        else None
    )
    return summary


class _ASEComputer(PicklesWithoutLock, QuantityComputer):
    """Shared machinery: callables, the cached structures and preparing a working copy."""

    def __init__(
        self,
        calc_factory: Callable[[Any], None],
        param_applier: Callable[[Any, dict], None],
        atoms_factories: Sequence[Callable[[], Any]],
        atoms_post_processor: Callable[[Any], None] | None = None,
        tag: str | None = None,
    ) -> None:
        super().__init__()
        require_ase()
        _check_callable(calc_factory, "calc_factory", "calc_factory(atoms) setting atoms.calc")
        _check_callable(param_applier, "param_applier", "param_applier(atoms, params)")
        for i, factory in enumerate(atoms_factories):
            _check_callable(factory, f"atoms factory {i}", "atoms_factory() -> Atoms")
        _check_callable(
            atoms_post_processor, "atoms_post_processor", "post_processor(atoms)", optional=True
        )
        self.calc_factory = calc_factory
        self.param_applier = param_applier
        self.atoms_post_processor = atoms_post_processor
        self._atoms_factories = list(atoms_factories)
        self.tag = tag or "tag_None"
        self.static_meta_data = {"tag": self.tag, "type": type(self).__name__}
        self._lock = threading.Lock()
        self._structures: list[Any] | None = None

    # -- the cached structures ------------------------------------------------------------

    def _build_structures(self) -> list[Any]:
        from ase import Atoms

        structures = []
        for i, factory in enumerate(self._atoms_factories):
            atoms = factory()
            if not isinstance(atoms, Atoms):
                raise TypeError(
                    f"atoms factory {i} ({factory!r:.80}) returned {type(atoms).__name__}, "
                    "expected an ase.Atoms"
                )
            structures.append(atoms)
        return structures

    def preload(self) -> _ASEComputer:
        """Build (and cache) the structures now; returns ``self``.

        Useful before sending the computer to process workers: the cache is pickled with it,
        so the workers need not read the structure files.
        """
        self._get_structures()
        return self

    def _get_structures(self) -> list[Any]:
        if self._structures is None:
            with self._lock:
                if self._structures is None:
                    self._structures = self._build_structures()
        return self._structures

    def _prepare(self, base_atoms: Any, parameters: dict) -> Any:
        """A working copy of ``base_atoms``: post-processed, calculator attached, parameters set."""
        atoms = base_atoms.copy()
        if self.atoms_post_processor is not None:
            self.atoms_post_processor(atoms)
        self.calc_factory(atoms)
        if atoms.calc is None:
            raise ValueError(
                f"calc_factory {self.calc_factory!r:.80} did not attach a calculator; "
                "it must set atoms.calc"
            )
        self.param_applier(atoms, parameters)
        return atoms

    def _process(self, processors: list[Callable[..., dict]], atoms: Any) -> dict:
        quantities: dict = {}
        for processor in processors:
            produced = processor(atoms.calc, atoms)
            if not isinstance(produced, dict):
                raise TypeError(
                    f"quantity processor {processor!r:.80} returned {type(produced).__name__}, "
                    "expected a dict"
                )
            quantities.update(produced)
        return quantities


class SinglePointASEComputer(_ASEComputer):
    """Energy, forces and stress (whatever the calculator provides) of one structure.

    Parameters
    ----------
    calc_factory : CalculatorFactory
        ``calc_factory(atoms)`` attaches a fresh calculator to ``atoms``.
    param_applier : ParameterApplier
        ``param_applier(atoms, params)`` writes the parameters into ``atoms.calc``.
    atoms_factory : AtomsFactory
        Returns the structure, e.g. :class:`~chemfit.chemistry.ase_atoms.PathAtomsFactory`.
        Called once; the result is cached.
    atoms_post_processor : AtomsPostProcessor, optional
        Modifies each working copy before the calculator is attached.
    quantity_processors : list of QuantityProcessor, optional
        ``processor(calc, atoms) -> dict``; their dicts are merged in order. They replace the
        default :class:`~chemfit.chemistry.ase_processors.DefaultQuantityProcessor`.
    tag : str, optional
        A label, stored with the class name as static meta data.

    Notes
    -----
    Each call works on a copy in ``ctx.temp.atoms`` and writes a plain-float summary of the
    structure (tag, ``n_atoms``, energy, energy per atom, maximum force) to
    ``ctx.meta["structure"]``.

    Examples
    --------
    >>> from ase import Atoms
    >>> from ase.calculators.morse import MorsePotential
    >>> def morse(atoms):
    ...     atoms.calc = MorsePotential()
    >>> def apply(atoms, params):
    ...     atoms.calc.set(**params)
    >>> def dimer():
    ...     return Atoms("Cu2", positions=[[0, 0, 0], [0, 0, 2.5]])
    >>> computer = SinglePointASEComputer(morse, apply, dimer, tag="dimer")
    >>> objective = computer.with_loss(lambda q: q["energy"])
    >>> round(objective({"epsilon": 0.3, "r0": 2.5, "rho0": 4.0}), 6)
    -0.3
    """

    def __init__(
        self,
        calc_factory: Callable[[Any], None],
        param_applier: Callable[[Any, dict], None],
        atoms_factory: Callable[[], Any],
        atoms_post_processor: Callable[[Any], None] | None = None,
        quantity_processors: Iterable[Callable[..., dict]] | None = None,
        tag: str | None = None,
    ) -> None:
        _check_callable(atoms_factory, "atoms_factory", "atoms_factory() -> Atoms")
        super().__init__(calc_factory, param_applier, [atoms_factory], atoms_post_processor, tag)
        self.atoms_factory = atoms_factory
        self.quantity_processors = _as_processors(quantity_processors)

    @property
    def atoms(self) -> Any:
        """The cached base structure (built on first access); calls work on copies."""
        return self._get_structures()[0]

    def prepare_ctx(self, parameters: dict, ctx: EvaluateContext) -> Any:
        """Put a prepared working copy of the structure into ``ctx.temp.atoms`` and return it."""
        ctx.temp.atoms = self._prepare(self.atoms, parameters)
        return ctx.temp.atoms

    def _compute(self, parameters: dict, ctx: EvaluateContext) -> dict:
        atoms = self.prepare_ctx(parameters, ctx)
        run_calculation(atoms)
        ctx.meta["structure"] = structure_summary(atoms, self.tag)
        return self._process(self.quantity_processors, atoms)


class MinimizationASEComputer(SinglePointASEComputer):
    """Like :class:`SinglePointASEComputer`, but relaxes the atomic positions first.

    The relaxation uses ASE's ``BFGS`` (no log file); the quantities are those of the relaxed
    geometry. Override :meth:`make_optimizer` to use another ASE optimizer.

    Parameters
    ----------
    dt : float
        Kept for compatibility with upstream chemfit; BFGS takes no time step.
    fmax : float
        Force convergence criterion (eV/Å).
    max_steps : int
        Maximum number of optimizer steps.
    **kwargs
        Passed to :class:`SinglePointASEComputer`.

    Notes
    -----
    Each call writes ``ctx.meta["minimization"] = {"converged": bool, "n_steps": int}``;
    a relaxation that does not converge within ``max_steps`` is also logged at WARNING.

    Examples
    --------
    >>> from ase import Atoms
    >>> from ase.calculators.morse import MorsePotential
    >>> from chemfit.chemistry.ase_processors import PositionsProcessor
    >>> from chemfit.core.context import EvaluateContext
    >>> def morse(atoms):
    ...     atoms.calc = MorsePotential()
    >>> def apply(atoms, params):
    ...     atoms.calc.set(**params)
    >>> def dimer():
    ...     return Atoms("Cu2", positions=[[0, 0, 0], [0, 0, 2.8]])
    >>> computer = MinimizationASEComputer(
    ...     fmax=1e-4, calc_factory=morse, param_applier=apply, atoms_factory=dimer,
    ...     quantity_processors=[DefaultQuantityProcessor(), PositionsProcessor()])
    >>> ctx = EvaluateContext()
    >>> q = computer({"epsilon": 0.3, "r0": 2.5, "rho0": 4.0}, ctx)
    >>> ctx.meta["minimization"]["converged"], round(float(q["positions"][1, 2] - q["positions"][0, 2]), 3)
    (True, 2.5)
    """

    def __init__(
        self, dt: float = 1e-2, fmax: float = 1e-5, max_steps: int = 2000, **kwargs: Any
    ) -> None:
        if not isinstance(fmax, Number) or not fmax > 0:
            raise ValueError(f"fmax must be a positive number (eV/Å), got {fmax!r}")
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(f"max_steps must be a positive int, got {max_steps!r}")
        self.dt = dt
        self.fmax = float(fmax)
        self.max_steps = max_steps
        super().__init__(**kwargs)

    def make_optimizer(self, atoms: Any) -> Any:
        """The ASE optimizer that relaxes ``atoms`` (``BFGS(atoms, logfile=None)``)."""
        from ase.optimize import BFGS

        return BFGS(atoms, logfile=None)

    def _compute(self, parameters: dict, ctx: EvaluateContext) -> dict:
        atoms = self.prepare_ctx(parameters, ctx)
        optimizer = self.make_optimizer(atoms)
        converged = bool(optimizer.run(fmax=self.fmax, steps=self.max_steps))
        n_steps = int(optimizer.nsteps)
        ctx.meta["minimization"] = {"converged": converged, "n_steps": n_steps}
        if not converged:
            logger.warning(
                "relaxation of %s did not reach fmax=%g within %d steps (parameters %s)",
                self.tag,
                self.fmax,
                self.max_steps,
                parameters,
            )
        run_calculation(atoms)
        ctx.meta["structure"] = structure_summary(atoms, self.tag)
        return self._process(self.quantity_processors, atoms)


def _stack(values: list[Any]) -> Any:
    """Numbers become an array; anything else stays a list."""
    if all(isinstance(v, (Number, np.number)) and not isinstance(v, bool) for v in values):
        return np.array(values)
    return values


class MultiStructureASEComputer(_ASEComputer):
    """Evaluate several structures (a curve: energy-volume, binding curve, ...) in one call.

    Parameters
    ----------
    calc_factory, param_applier, atoms_post_processor
        As for :class:`SinglePointASEComputer`; each structure gets its own calculator.
    atoms_factories : sequence of AtomsFactory
        One factory per structure.
    quantity_processors : list of QuantityProcessor, optional
        Applied to every structure; default :class:`DefaultQuantityProcessor`.
    tags : sequence of str, optional
        One label per structure; default each structure's ``info["tag"]`` or its position.
    tag : str, optional
        A label for the whole set (static meta data).

    Notes
    -----
    The quantities hold, per key produced for every structure, the values in structure order:
    numbers as an array (``"energy"``, ``"n_atoms"``), anything else as a list (``"forces"``),
    plus ``"tags"``. ``ctx.meta["structures"]`` gets one plain-float summary per structure, and
    ``ctx.temp.atoms`` the list of evaluated copies.

    Examples
    --------
    >>> from ase import Atoms
    >>> from ase.calculators.morse import MorsePotential
    >>> def morse(atoms):
    ...     atoms.calc = MorsePotential()
    >>> def apply(atoms, params):
    ...     atoms.calc.set(**params)
    >>> def dimer_at(d):
    ...     return lambda: Atoms("Cu2", positions=[[0, 0, 0], [0, 0, d]])
    >>> curve = MultiStructureASEComputer(morse, apply, [dimer_at(d) for d in (2.3, 2.5, 2.8)])
    >>> q = curve({"epsilon": 0.3, "r0": 2.5, "rho0": 4.0})
    >>> q["energy"].round(3), q["n_atoms"]
    (array([-0.257, -0.3  , -0.256]), array([2, 2, 2]))
    """

    def __init__(
        self,
        calc_factory: Callable[[Any], None],
        param_applier: Callable[[Any, dict], None],
        atoms_factories: Sequence[Callable[[], Any]],
        atoms_post_processor: Callable[[Any], None] | None = None,
        quantity_processors: Iterable[Callable[..., dict]] | None = None,
        tags: Sequence[str] | None = None,
        tag: str | None = None,
    ) -> None:
        if callable(atoms_factories) or isinstance(atoms_factories, (str, bytes)):
            raise TypeError(
                "atoms_factories must be a sequence of factories, got a single "
                f"{type(atoms_factories).__name__}; wrap it in a list"
            )
        factories = list(atoms_factories)
        if not factories:
            raise ValueError("atoms_factories is empty; pass at least one atoms factory")
        if tags is not None:
            tags = [str(t) for t in tags]
            if len(tags) != len(factories):
                raise ValueError(
                    f"tags has {len(tags)} entries but there are {len(factories)} structures; "
                    "pass one tag per structure or None"
                )
        super().__init__(calc_factory, param_applier, factories, atoms_post_processor, tag)
        self.quantity_processors = _as_processors(quantity_processors)
        self._tags = tags

    @classmethod
    def from_file(
        cls,
        path: Any,
        calc_factory: Callable[[Any], None],
        param_applier: Callable[[Any, dict], None],
        **kwargs: Any,
    ) -> MultiStructureASEComputer:
        """One structure per image of a file (each read by a :class:`PathAtomsFactory`).

        Examples
        --------
        >>> import tempfile
        >>> from pathlib import Path
        >>> from ase import Atoms
        >>> from ase.calculators.emt import EMT
        >>> from ase.io import write
        >>> path = Path(tempfile.mkdtemp()) / "curve.xyz"
        >>> write(path, [Atoms("Cu2", positions=[[0, 0, 0], [0, 0, d]]) for d in (2.2, 2.4)])
        >>> def emt(atoms):
        ...     atoms.calc = EMT()
        >>> curve = MultiStructureASEComputer.from_file(path, emt, lambda atoms, p: None)
        >>> len(curve({})["energy"])
        2
        """
        n_images = count_images(path)
        factories = [PathAtomsFactory(path, index=i) for i in range(n_images)]
        return cls(calc_factory, param_applier, factories, **kwargs)

    @property
    def n_structures(self) -> int:
        """Number of structures."""
        return len(self._atoms_factories)

    @property
    def structures(self) -> list[Any]:
        """The cached base structures (built on first access)."""
        return self._get_structures()

    @property
    def tags(self) -> list[str]:
        """The structures' labels."""
        if self._tags is not None:
            return list(self._tags)
        return [str(a.info.get("tag", i)) for i, a in enumerate(self.structures)]

    def _compute(self, parameters: dict, ctx: EvaluateContext) -> dict:
        tags = self.tags
        per_structure: list[dict] = []
        summaries: list[dict] = []
        working: list[Any] = []
        for base, tag in zip(self.structures, tags):
            atoms = self._prepare(base, parameters)
            run_calculation(atoms)
            working.append(atoms)
            summaries.append(structure_summary(atoms, tag))
            per_structure.append(self._process(self.quantity_processors, atoms))
        ctx.temp.atoms = working
        ctx.meta["structures"] = summaries
        common = set(per_structure[0]).intersection(*per_structure[1:])
        quantities = {
            key: _stack([q[key] for q in per_structure])
            for key in per_structure[0]
            if key in common
        }
        quantities["tags"] = tags
        return quantities
