"""ASE quantity computers, their losses, the reference-data reader and the neighbour list we use.

Everything runs real ASE calculators (EMT, MorsePotential) on small copper structures.
"""

from __future__ import annotations

import logging
import pickle
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

ase = pytest.importorskip("ase")

from ase import Atoms  # noqa: E402
from ase.build import bulk  # noqa: E402
from ase.calculators.singlepoint import SinglePointCalculator  # noqa: E402
from ase.io import write  # noqa: E402
from ase.neighborlist import neighbor_list  # noqa: E402

from chemfit.chemistry.ase_atoms import PathAtomsFactory, read_reference_data  # noqa: E402
from chemfit.chemistry.ase_computers import (  # noqa: E402
    MinimizationASEComputer,
    MultiStructureASEComputer,
    SinglePointASEComputer,
)
from chemfit.chemistry.ase_eos import EquationOfStateError, LatticeConstantASEComputer  # noqa: E402
from chemfit.chemistry.ase_processors import (  # noqa: E402
    DefaultQuantityProcessor,
    PositionsProcessor,
)
from chemfit.chemistry.ase_protocols import (  # noqa: E402
    AtomsFactory,
    CalculatorFactory,
    ParameterApplier,
    QuantityProcessor,
)
from chemfit.chemistry.losses import (  # noqa: E402
    energy_error,
    energy_rmse,
    force_rmse,
    lattice_constant_error,
    relative_energy_rmse,
)
from chemfit.core.context import EvaluateContext  # noqa: E402
from chemfit.fitting.fitter import Fitter  # noqa: E402
from tests.helpers import ase_factories_and_calculators as h  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def single_point(factory=h.cu_dimer, calc=h.emt_factory, applier=h.apply_nothing, **kwargs):
    return SinglePointASEComputer(calc, applier, factory, **kwargs)


# -- optional dependency -------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_ase_is_imported_only_when_a_computer_is_made_and_its_absence_names_the_extra():
    code = textwrap.dedent(
        """
        import sys
        class Blocker:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "ase":
                    raise ImportError(f"{name} is blocked")
        sys.meta_path.insert(0, Blocker())
        import chemfit, chemfit.ase_objective_function as aof
        import chemfit.chemistry.losses, chemfit.chemistry.structure_comparison
        import chemfit.chemistry.ase_eos
        assert "ase" not in sys.modules
        try:
            aof.SinglePointASEComputer(lambda a: None, lambda a, p: None, lambda: None)
        except ImportError as exc:
            assert "chemfit[ase]" in str(exc), exc
            print("OK")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=100, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "OK"


def test_contract_path_and_protocols():
    from chemfit import ase_objective_function as contract

    assert contract.SinglePointASEComputer is SinglePointASEComputer
    assert contract.MinimizationASEComputer is MinimizationASEComputer
    for name in (
        "CalculatorFactory",
        "ParameterApplier",
        "AtomsPostProcessor",
        "AtomsFactory",
        "QuantityProcessor",
        "PathAtomsFactory",
        "DefaultQuantityProcessor",
    ):
        assert name in contract.__all__
    assert isinstance(h.emt_factory, CalculatorFactory)
    assert isinstance(h.apply_morse, ParameterApplier)
    assert isinstance(h.cu_dimer, AtomsFactory)
    assert isinstance(DefaultQuantityProcessor(), QuantityProcessor)


# -- PathAtomsFactory and reference data ---------------------------------------------------


def _write_images(path: Path, n: int) -> list[Atoms]:
    images = []
    for i in range(n):
        atoms = h.cu_dimer(2.2 + 0.1 * i)
        atoms.calc = SinglePointCalculator(atoms, energy=-1.0 - i, forces=np.full((2, 3), 0.1 * i))
        atoms.info["tag"] = f"d{i}"
        images.append(atoms)
    write(path, images, format="extxyz")
    return images


def test_path_atoms_factory_reads_exactly_one_image(tmp_path, monkeypatch):
    single = tmp_path / "one.xyz"
    _write_images(single, 1)
    multi = tmp_path / "three.xyz"
    _write_images(multi, 3)
    assert len(PathAtomsFactory(single)()) == 2
    second = PathAtomsFactory(multi, index=1)()
    assert second.get_distance(0, 1) == pytest.approx(2.3)
    assert len(PathAtomsFactory(multi, index=slice(2, 3))()) == 2
    with pytest.raises(ValueError, match="holds 3 images"):
        PathAtomsFactory(multi)()
    with pytest.raises(ValueError, match="holds 2 images"):
        PathAtomsFactory(multi, index=":2")()
    with pytest.raises(FileNotFoundError):
        PathAtomsFactory(tmp_path / "missing.xyz")()
    # relative paths are resolved when the factory is made
    monkeypatch.chdir(tmp_path)
    factory = PathAtomsFactory("one.xyz")
    monkeypatch.chdir(ROOT)
    assert len(factory()) == 2
    assert pickle.loads(pickle.dumps(factory)).path == factory.path


def test_read_reference_data(tmp_path):
    path = tmp_path / "refs.xyz"
    _write_images(path, 3)
    ref = read_reference_data(path)
    np.testing.assert_allclose(ref["energy"], [-1.0, -2.0, -3.0])
    np.testing.assert_array_equal(ref["n_atoms"], [2, 2, 2])
    assert ref["tags"] == ["d0", "d1", "d2"]
    np.testing.assert_allclose(ref["forces"][2], np.full((2, 3), 0.2))
    bare = tmp_path / "bare.xyz"
    write(bare, h.cu_dimer())
    with pytest.raises(ValueError, match=r"image 0 of .*bare\.xyz has no stored energy"):
        read_reference_data(bare)


# -- SinglePointASEComputer ----------------------------------------------------------------


def test_single_point_energy_forces_and_meta_match_ase():
    computer = single_point(tag="dimer")
    ctx = EvaluateContext()
    quantities = computer({}, ctx)
    assert quantities["energy"] == pytest.approx(h.energy_of(h.cu_dimer()))
    assert isinstance(quantities["energy"], float)
    assert quantities["forces"].shape == (2, 3)
    assert quantities["n_atoms"] == 2
    assert "stress" not in quantities  # not periodic
    assert ctx.meta["tag"] == "dimer" and ctx.meta["type"] == "SinglePointASEComputer"
    assert ctx.meta["structure"]["energy"] == pytest.approx(quantities["energy"])
    assert ctx.meta["structure"]["fmax"] == pytest.approx(np.abs(quantities["forces"]).max())
    # the call worked on a copy
    assert ctx.temp.atoms is not computer.atoms and computer.atoms.calc is None
    assert single_point().static_meta_data == {"tag": "tag_None", "type": "SinglePointASEComputer"}


def test_single_point_on_a_crystal_has_stress():
    quantities = single_point(h.cu_fcc_cubic)({})
    assert quantities["stress"].shape == (6,)
    assert quantities["n_atoms"] == 4


def test_parameters_reach_the_calculator():
    computer = single_point(calc=h.morse_factory, applier=h.apply_morse, factory=h.cu_dimer)
    at_minimum = computer({**h.MORSE, "r0": 2.5})
    assert at_minimum["energy"] == pytest.approx(-h.MORSE["epsilon"])
    assert computer({**h.MORSE, "epsilon": 1.0, "r0": 2.5})["energy"] == pytest.approx(-1.0)


def test_quantity_processors_filter_and_replace_the_default():
    filtered = single_point(quantity_processors=[DefaultQuantityProcessor(["forces", "energies"])])
    assert "forces" not in filtered({}) and "energy" in filtered({})
    only_positions = single_point(quantity_processors=[PositionsProcessor()])
    assert set(only_positions({})) == {"positions"}
    with pytest.raises(TypeError, match="returned list"):
        single_point(quantity_processors=[lambda calc, atoms: [1]])({})
    with pytest.raises(ValueError, match="empty"):
        single_point(quantity_processors=[])
    with pytest.raises(TypeError, match="filter_keys"):
        DefaultQuantityProcessor("forces")


def test_post_processor_acts_on_the_working_copy():
    computer = single_point(atoms_post_processor=h.shift_atoms)
    ctx = EvaluateContext()
    computer({}, ctx)
    np.testing.assert_allclose(ctx.temp.atoms.positions[0], [1.0, 2.0, 3.0])
    np.testing.assert_allclose(computer.atoms.positions[0], [0.0, 0.0, 0.0])


def test_bad_callables_are_rejected():
    with pytest.raises(TypeError, match="calc_factory"):
        SinglePointASEComputer(None, h.apply_nothing, h.cu_dimer)
    with pytest.raises(TypeError, match="param_applier"):
        SinglePointASEComputer(h.emt_factory, 1, h.cu_dimer)
    with pytest.raises(TypeError, match="atoms_factory"):
        SinglePointASEComputer(h.emt_factory, h.apply_nothing, h.cu_dimer())
    with pytest.raises(TypeError, match=r"expected an ase\.Atoms"):
        single_point(h.not_atoms)({})
    with pytest.raises(ValueError, match="did not attach a calculator"):
        single_point(calc=h.no_calc_factory)({})


class CountingFactory:
    def __init__(self):
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self):
        with self.lock:
            self.calls += 1
        return h.cu_dimer()


@pytest.mark.timeout(60)
def test_structures_are_built_once_and_threads_share_the_computer():
    factory = CountingFactory()
    computer = single_point(factory, calc=h.morse_factory, applier=h.apply_morse)
    params = [{**h.MORSE, "r0": 2.3 + 0.01 * i} for i in range(40)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(computer, params))
    assert factory.calls == 1
    assert [r["energy"] for r in results] == [computer(p)["energy"] for p in params]


@pytest.mark.timeout(60)
def test_computers_pickle_and_run_in_a_process_pool():
    computer = single_point(h.cu_dimer, calc=h.morse_factory, applier=h.apply_morse)
    computer({**h.MORSE})  # build the cache; it travels with the pickle
    clone = pickle.loads(pickle.dumps(computer))
    assert clone({**h.MORSE})["energy"] == computer({**h.MORSE})["energy"]
    lattice = LatticeConstantASEComputer(h.morse_factory, h.apply_morse, h.cu_fcc_cubic)
    params = [{**h.MORSE, "epsilon": e} for e in (0.3, 0.4)]
    with ProcessPoolExecutor(max_workers=2) as pool:
        remote = list(pool.map(computer, params))
        remote_lattice = list(pool.map(lattice, params))
    assert [r["energy"] for r in remote] == [computer(p)["energy"] for p in params]
    assert [r["lattice_constant"] for r in remote_lattice] == [
        lattice(p)["lattice_constant"] for p in params
    ]


# -- MinimizationASEComputer ---------------------------------------------------------------


def test_minimization_relaxes_and_records_convergence():
    computer = MinimizationASEComputer(
        fmax=1e-4,
        calc_factory=h.morse_factory,
        param_applier=h.apply_morse,
        atoms_factory=h.cu_trimer,
        quantity_processors=[DefaultQuantityProcessor(), PositionsProcessor()],
        tag="trimer",
    )
    ctx = EvaluateContext()
    quantities = computer(h.MORSE, ctx)
    assert ctx.meta["minimization"]["converged"] is True
    assert ctx.meta["minimization"]["n_steps"] > 0
    assert ctx.meta["type"] == "MinimizationASEComputer"
    positions = quantities["positions"]
    sides = [np.linalg.norm(positions[i] - positions[j]) for i, j in ((0, 1), (1, 2), (0, 2))]
    np.testing.assert_allclose(sides, sides[0], atol=1e-3)  # equilateral
    assert np.abs(quantities["forces"]).max() < 1e-3
    assert (
        quantities["energy"]
        < single_point(h.cu_trimer, h.morse_factory, h.apply_morse)(h.MORSE)["energy"]
    )


def test_minimization_that_runs_out_of_steps_is_flagged(caplog):
    computer = MinimizationASEComputer(
        max_steps=1,
        calc_factory=h.morse_factory,
        param_applier=h.apply_morse,
        atoms_factory=h.cu_trimer,
    )
    ctx = EvaluateContext()
    with caplog.at_level(logging.WARNING, logger="chemfit.chemistry.ase_computers"):
        computer(h.MORSE, ctx)
    assert ctx.meta["minimization"] == {"converged": False, "n_steps": 1}
    assert any("did not reach fmax" in m for m in caplog.messages)
    with pytest.raises(ValueError, match="fmax"):
        MinimizationASEComputer(
            fmax=0,
            calc_factory=h.morse_factory,
            param_applier=h.apply_morse,
            atoms_factory=h.cu_dimer,
        )
    with pytest.raises(ValueError, match="max_steps"):
        MinimizationASEComputer(
            max_steps=0,
            calc_factory=h.morse_factory,
            param_applier=h.apply_morse,
            atoms_factory=h.cu_dimer,
        )


# -- MultiStructureASEComputer -------------------------------------------------------------


def test_multi_structure_from_file_matches_single_points(tmp_path):
    path = tmp_path / "curve.xyz"
    _write_images(path, 4)
    curve = MultiStructureASEComputer.from_file(path, h.emt_factory, h.apply_nothing, tag="c")
    ctx = EvaluateContext()
    quantities = curve({}, ctx)
    expected = [single_point(PathAtomsFactory(path, index=i))({})["energy"] for i in range(4)]
    np.testing.assert_allclose(quantities["energy"], expected)
    np.testing.assert_array_equal(quantities["n_atoms"], [2, 2, 2, 2])
    assert len(quantities["forces"]) == 4 and quantities["forces"][0].shape == (2, 3)
    assert quantities["tags"] == ["d0", "d1", "d2", "d3"] == curve.tags
    assert [s["tag"] for s in ctx.meta["structures"]] == ["d0", "d1", "d2", "d3"]
    assert ctx.meta["structures"][1]["energy"] == pytest.approx(expected[1])
    assert curve.n_structures == 4 and len(ctx.temp.atoms) == 4


def test_multi_structure_validation():
    factories = [h.cu_dimer, h.cu_trimer]
    with pytest.raises(ValueError, match="one tag per structure"):
        MultiStructureASEComputer(h.emt_factory, h.apply_nothing, factories, tags=["a"])
    with pytest.raises(TypeError, match="wrap it in a list"):
        MultiStructureASEComputer(h.emt_factory, h.apply_nothing, h.cu_dimer)
    with pytest.raises(ValueError, match="empty"):
        MultiStructureASEComputer(h.emt_factory, h.apply_nothing, [])
    mixed = MultiStructureASEComputer(h.emt_factory, h.apply_nothing, factories, tags=["2", "3"])
    quantities = mixed({})
    np.testing.assert_array_equal(quantities["n_atoms"], [2, 3])
    assert quantities["tags"] == ["2", "3"]


# -- LatticeConstantASEComputer ------------------------------------------------------------


def _scan_minimum(factory, parameters, calc=h.morse_factory, applier=h.apply_morse) -> float:
    """The lattice constant from a dense direct scan and a local parabola."""
    lattice_constants = np.linspace(3.3, 3.9, 121)
    energies = []
    for a in lattice_constants:
        atoms = factory(a)
        calc(atoms)
        applier(atoms, parameters)
        energies.append(atoms.get_potential_energy())
    i = int(np.argmin(energies))
    c = np.polyfit(lattice_constants[i - 3 : i + 4], energies[i - 3 : i + 4], 2)
    return -c[1] / (2 * c[0])


def test_lattice_constant_agrees_with_a_direct_scan():
    computer = LatticeConstantASEComputer(h.morse_factory, h.apply_morse, h.cu_fcc_cubic, tag="L")
    ctx = EvaluateContext()
    params = {"epsilon": 0.34, "r0": 2.87, "rho0": 3.8}
    quantities = computer(params, ctx)
    expected = _scan_minimum(h.cu_fcc_cubic, params)
    assert quantities["lattice_constant"] == pytest.approx(expected, abs=2e-3)
    assert quantities["volume"] == pytest.approx(quantities["lattice_constant"] ** 3, rel=1e-9)
    assert quantities["n_atoms"] == 4
    assert quantities["bulk_modulus"] > 0 and quantities["bulk_modulus_GPa"] > 10
    assert quantities["energy"] <= min(quantities["scan_energies"]) + 1e-6
    meta = ctx.meta["eos"]
    assert meta["lattice_constant"] == quantities["lattice_constant"]
    assert meta["window_shifts"] == 0 and len(meta["scan_volumes"]) == 7
    assert ctx.meta["type"] == "LatticeConstantASEComputer"


def test_emt_copper_lattice_constant():
    computer = LatticeConstantASEComputer(h.emt_factory, h.apply_nothing, h.cu_fcc_cubic)
    assert computer({})["lattice_constant"] == pytest.approx(
        _scan_minimum(h.cu_fcc_cubic, {}, h.emt_factory, h.apply_nothing), abs=2e-3
    )


def test_the_strain_window_moves_to_the_minimum():
    params = {"epsilon": 0.34, "r0": 2.87, "rho0": 3.8}
    start_far = LatticeConstantASEComputer(h.morse_factory, h.apply_morse, h.cu_fcc_squeezed)
    ctx = EvaluateContext()
    far = start_far(params, ctx)["lattice_constant"]
    near = LatticeConstantASEComputer(h.morse_factory, h.apply_morse, h.cu_fcc_cubic)(params)
    assert ctx.meta["eos"]["window_shifts"] > 0
    assert far == pytest.approx(near["lattice_constant"], abs=3e-3)
    with pytest.raises(EquationOfStateError, match="window shifts"):
        LatticeConstantASEComputer(
            h.morse_factory, h.apply_morse, h.cu_fcc_squeezed, max_window_shifts=0
        )(params)


def test_non_cubic_cells_need_the_input_lattice_constant():
    params = {"epsilon": 0.34, "r0": 2.87, "rho0": 3.8}
    cubic = LatticeConstantASEComputer(h.morse_factory, h.apply_morse, h.cu_fcc_cubic)(params)
    primitive = LatticeConstantASEComputer(
        h.morse_factory, h.apply_morse, h.cu_fcc_primitive, lattice_constant=3.6
    )(params)
    assert primitive["lattice_constant"] == pytest.approx(cubic["lattice_constant"], abs=1e-6)
    assert primitive["n_atoms"] == 1
    with pytest.raises(ValueError, match="not cubic"):
        LatticeConstantASEComputer(h.morse_factory, h.apply_morse, h.cu_fcc_primitive)(params)
    with pytest.raises(ValueError, match="periodic in 3 dimensions"):
        LatticeConstantASEComputer(h.morse_factory, h.apply_morse, h.cu_dimer)(params)


def test_no_minimum_raises_equation_of_state_error():
    computer = LatticeConstantASEComputer(h.volume_factory, h.apply_nothing, h.cu_fcc_cubic)
    with pytest.raises(EquationOfStateError, match="no energy minimum"):
        computer({})


def test_lattice_constant_argument_validation():
    make = lambda **kw: LatticeConstantASEComputer(  # noqa: E731
        h.emt_factory, h.apply_nothing, h.cu_fcc_cubic, **kw
    )
    with pytest.raises(ValueError, match="strains"):
        make(strains=[0.0, 0.01])
    with pytest.raises(ValueError, match="strains"):
        make(strains=[0.02, 0.01, 0.0, -0.01, -0.02])
    with pytest.raises(ValueError, match="eos"):
        make(eos="parabola-ish")
    with pytest.raises(ValueError, match="lattice_constant"):
        make(lattice_constant=-1.0)
    with pytest.raises(ValueError, match="max_window_shifts"):
        make(max_window_shifts=-1)
    sj = make(eos="sj", strains=np.linspace(-0.04, 0.04, 5))({})
    assert sj["lattice_constant"] == pytest.approx(make()({})["lattice_constant"], abs=2e-3)


# -- losses --------------------------------------------------------------------------------


def test_energy_losses():
    q = {"energy": -7.0, "n_atoms": 2}
    assert energy_error(q, -6.5) == pytest.approx(0.5)
    assert energy_error(q, -3.0, per_atom=True, squared=True) == pytest.approx(0.25)
    curve = {"energy": np.array([-7.0, -8.0, -9.0]), "n_atoms": np.array([1, 2, 3])}
    assert energy_rmse(curve, [-7.0, -8.0, -9.0]) == 0.0
    assert energy_rmse(curve, [-7.0, -4.0, -4.0], per_atom=True) == pytest.approx(
        np.sqrt(1.0 / 3.0)
    )
    with pytest.raises(ValueError, match="energy_rmse for several"):
        energy_error(curve, 1.0)
    with pytest.raises(ValueError, match="one reference per structure"):
        energy_rmse(curve, [1.0, 2.0])
    with pytest.raises(ValueError, match="no 'energy'"):
        energy_rmse({"forces": []}, [1.0])


def test_relative_energy_rmse_ignores_the_offset():
    q = {"energy": np.array([0.3, -1.0, -0.5, 0.0])}
    reference = q["energy"] + 12.0
    assert relative_energy_rmse(q, reference) == pytest.approx(0.0, abs=1e-12)
    assert relative_energy_rmse(q, reference, reference_index=-1) == pytest.approx(0.0, abs=1e-12)
    bent = reference + np.array([0.0, 0.0, 0.0, 0.4])
    assert relative_energy_rmse(q, bent, reference_index=0) == pytest.approx(0.2)
    assert relative_energy_rmse(q, bent) == pytest.approx(np.std([0, 0, 0, 0.4]))
    with pytest.raises(ValueError, match="out of range"):
        relative_energy_rmse(q, reference, reference_index=4)
    with pytest.raises(ValueError, match="at least 2 points"):
        relative_energy_rmse({"energy": 1.0}, [1.0])


def test_force_rmse_single_and_several_structures():
    f1 = np.array([[0.0, 0.0, 1.0], [0.0, 0.0, -1.0]])
    f2 = np.array([[3.0, 4.0, 0.0]])
    assert force_rmse({"forces": f1}, f1) == 0.0
    assert force_rmse({"forces": f1}, np.zeros((2, 3))) == pytest.approx(1.0)
    several = force_rmse({"forces": [f1, f2]}, [np.zeros((2, 3)), np.zeros((1, 3))])
    assert several == pytest.approx(np.sqrt((1 + 1 + 25) / 3))
    with pytest.raises(ValueError, match="shapes"):
        force_rmse({"forces": f1}, np.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        force_rmse({"forces": np.zeros((2, 2))}, np.zeros((2, 2)))


def test_lattice_constant_error():
    q = {"lattice_constant": 3.5}
    assert lattice_constant_error(q, 3.6) == pytest.approx(0.1 / 3.6)
    assert lattice_constant_error(q, 3.6, relative=False, squared=True) == pytest.approx(0.01)
    with pytest.raises(ValueError, match="positive"):
        lattice_constant_error(q, 0.0)


def test_losses_on_real_quantities_and_as_objectives():
    computer = single_point(h.cu_dimer, calc=h.morse_factory, applier=h.apply_morse)
    objective = computer.with_loss(energy_error, reference_energy=-0.2)
    assert objective(h.MORSE) == pytest.approx(abs(computer(h.MORSE)["energy"] + 0.2))
    forces = computer(h.MORSE)["forces"]
    assert computer.with_loss(force_rmse, reference_forces=forces)(h.MORSE) == 0.0


@pytest.mark.timeout(60)
def test_a_morse_dimer_fit_recovers_its_parameters():
    """Energies made with known Morse parameters are fitted back (binding-curve loss)."""
    factories = [lambda d=d: h.cu_dimer(d) for d in np.linspace(2.0, 4.0, 9)]
    curve = MultiStructureASEComputer(h.morse_factory, h.apply_morse, factories)
    truth = {"epsilon": 0.35, "r0": 2.6, "rho0": 4.0}
    reference = curve(truth)["energy"]
    objective = curve.with_loss(relative_energy_rmse, reference_energies=reference)

    def rebuild(p):
        return {"epsilon": p["epsilon"], "r0": p["r0"], "rho0": 4.0}

    fitter = Fitter(
        lambda p: objective(rebuild(p)),
        {"epsilon": 0.5, "r0": 2.4},
        bounds={"epsilon": (0.05, 2.0), "r0": (2.0, 3.2)},
    )
    best = fitter.fit_scipy(method="Nelder-Mead", options={"xatol": 1e-7, "fatol": 1e-10})
    assert best["epsilon"] == pytest.approx(0.35, rel=1e-3)
    assert best["r0"] == pytest.approx(2.6, rel=1e-4)


# -- neighbour list ------------------------------------------------------------------------


def _pairs(result):
    i, j, d, shifts = result
    return sorted(zip(i.tolist(), j.tolist(), np.round(d, 9).tolist(), map(tuple, shifts)))


def _systems():
    rattled = bulk("Cu", "fcc", a=3.6, cubic=True)
    rattled.rattle(0.2, seed=1)
    rattled.positions += 5.0  # not wrapped into the cell
    slab = bulk("Cu", "fcc", a=3.6, cubic=True)
    slab.pbc = [True, True, False]
    skewed = bulk("Cu", "hcp", a=2.55, c=4.2)
    return [
        bulk("Cu", "fcc", a=3.4, cubic=True),
        bulk("Cu", "fcc", a=3.6),
        rattled,
        slab,
        skewed,
        h.cu_dimer(),
        h.cu_trimer(),
    ]


@pytest.mark.parametrize("cutoff", [2.6, 5.0, 7.7])
def test_fast_neighbor_list_matches_ase(cutoff):
    """The fits hand fast_neighbor_list (matscipy's, or ASE's without a full cell) to ASE's
    MorsePotential: it must give ASE's pairs."""
    from chemfit.chemistry.neighbor_list import fast_neighbor_list

    for atoms in _systems():
        assert _pairs(fast_neighbor_list("ijdS", atoms, cutoff)) == _pairs(
            neighbor_list("ijdS", atoms, cutoff)
        ), atoms
