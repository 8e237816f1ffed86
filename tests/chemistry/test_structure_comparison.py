"""Kabsch RMSD as a function, a quantity (processor and computer) and a loss."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from chemfit.chemistry.kabsch import rmsd
from chemfit.chemistry.structure_comparison import (
    KabschRMSDComputer,
    KabschRMSDProcessor,
    kabsch_rmsd,
    kabsch_rmsd_loss,
)
from chemfit.core.context import EvaluateContext
from chemfit.core.wrapping import WrappedQuantityComputer


def _cluster(seed: int, n: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3)) * 2.0


@pytest.mark.parametrize("seed", range(4))
def test_rigid_motions_give_zero(seed):
    P = _cluster(seed)
    Q = P @ Rotation.random(random_state=seed).as_matrix() + [1.0, -2.0, 3.0]
    assert kabsch_rmsd(P, Q) == pytest.approx(0.0, abs=1e-10)
    assert rmsd(P, Q) > 0.1  # without superposition they differ


def test_known_deformation():
    P = _cluster(0)
    noise = np.random.default_rng(1).normal(size=P.shape) * 0.05
    noise -= noise.mean(axis=0)  # no net translation
    Q = (P + noise) @ Rotation.from_euler("z", 40, degrees=True).as_matrix()
    value = kabsch_rmsd(P, Q)
    assert 0 < value <= rmsd(P, P + noise) + 1e-12  # the optimum is at most the known fit
    assert value == pytest.approx(rmsd(P, P + noise), rel=0.2)


def test_mirror_images_and_weights():
    P = _cluster(2)
    mirrored = P * [-1.0, 1.0, 1.0]
    assert kabsch_rmsd(P, mirrored) > 0.1
    assert kabsch_rmsd(P, mirrored, allow_reflection=True) == pytest.approx(0.0, abs=1e-10)
    Q = P.copy()
    Q[0] += 5.0  # one outlier
    weights = np.ones(len(P))
    weights[0] = 0.0
    assert kabsch_rmsd(P, Q, weights=weights) == pytest.approx(0.0, abs=1e-10)
    assert kabsch_rmsd(P, Q) > 0.5


def test_bad_inputs_raise_value_error():
    with pytest.raises(ValueError, match="same shape"):
        kabsch_rmsd(_cluster(0, 5), _cluster(0, 6))
    with pytest.raises(ValueError, match="at least as many points"):
        kabsch_rmsd(np.zeros((2, 3)), np.ones((2, 3)))
    with pytest.raises(ValueError, match="reference_positions"):
        KabschRMSDProcessor(np.zeros(3))
    with pytest.raises(ValueError, match="no 'positions'"):
        kabsch_rmsd_loss({"energy": 1.0}, _cluster(0))
    with pytest.raises(TypeError, match="callable"):
        KabschRMSDComputer(42, _cluster(0))


def _rotated_copy(positions: np.ndarray) -> np.ndarray:
    return positions @ Rotation.from_euler("xyz", [10, 20, 30], degrees=True).as_matrix() + 3.0


def test_processor_on_atoms():
    ase = pytest.importorskip("ase")
    reference = _cluster(3, 5)
    atoms = ase.Atoms("Cu5", positions=_rotated_copy(reference))
    out = KabschRMSDProcessor(reference, key="rmsd_to_ref")(None, atoms)
    assert out["rmsd_to_ref"] == pytest.approx(0.0, abs=1e-10)
    weighted = KabschRMSDProcessor(reference, weights=atoms.get_masses())(None, atoms)
    assert weighted["kabsch_rmsd"] == pytest.approx(0.0, abs=1e-10)


def _stretched(parameters: dict, reference: np.ndarray) -> dict:
    return {"positions": _rotated_copy(reference) * [parameters["s"], 1.0, 1.0]}


def test_computer_and_loss_on_any_quantity_computer():
    reference = _cluster(4)
    inner = WrappedQuantityComputer(_stretched, func_kwargs={"reference": reference})
    computer = KabschRMSDComputer(inner, reference)
    ctx = EvaluateContext()
    quantities = computer({"s": 1.0}, ctx)
    assert quantities["kabsch_rmsd"] == pytest.approx(0.0, abs=1e-10)
    assert ctx.meta["kabsch_rmsd"] == quantities["kabsch_rmsd"]
    assert "positions" in quantities
    objective = computer.with_loss(kabsch_rmsd_loss, reference_positions=reference)
    losses = [objective({"s": s}) for s in (1.0, 1.1, 1.3)]
    assert losses[0] == pytest.approx(0.0, abs=1e-10)
    assert losses[0] < losses[1] < losses[2]
    assert objective({"s": 1.3}) == pytest.approx(computer({"s": 1.3})["kabsch_rmsd"])


def test_relaxed_geometry_against_a_reference():
    """A Morse Cu3 relaxes to an equilateral triangle with every side at r0."""
    pytest.importorskip("ase")
    from chemfit.chemistry.ase_computers import MinimizationASEComputer
    from chemfit.chemistry.ase_processors import PositionsProcessor
    from tests.helpers import ase_factories_and_calculators as h

    side = h.MORSE["r0"]
    triangle = np.array([[0.0, 0.0, 0.0], [side, 0.0, 0.0], [side / 2, side * np.sqrt(3) / 2, 0.0]])
    line = np.array([[0.0, 0.0, 0.0], [side, 0.0, 0.0], [2 * side, 0.0, 0.0]])
    relax = MinimizationASEComputer(
        fmax=1e-5,
        calc_factory=h.morse_factory,
        param_applier=h.apply_morse,
        atoms_factory=h.cu_trimer,
        quantity_processors=[PositionsProcessor(), KabschRMSDProcessor(triangle)],
    )
    quantities = relax(h.MORSE)
    assert quantities["kabsch_rmsd"] < 1e-4
    assert kabsch_rmsd_loss(quantities, line) > 0.5
    start = h.cu_trimer().get_positions()
    assert kabsch_rmsd(start, triangle) > 0.1  # the relaxation did the work
