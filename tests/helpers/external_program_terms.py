"""Module-level (picklable) pieces for tests/chemistry/test_file_based_computer.py, and its MPI
scenario.

Run ``mpiexec -n 2 python tests/helpers/external_program_terms.py BASE_DIR`` for the MPI
scenario: every rank builds the same combined objective of external-program terms, rank 0
evaluates it through ``MPIWrapperCOB`` and prints ``RESULT {json}``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SIMULATOR = Path(__file__).resolve().parent / "fake_simulator.py"


def simulator_cmd(parameters: dict, workdir: Path, mode: str = "ok") -> list[str]:
    """The command running the fake simulator in ``mode``."""
    return [sys.executable, str(SIMULATOR), mode]


def write_input(parameters: dict, workdir: Path) -> None:
    """Presubmit hook: the parameters as ``input.json``."""
    (workdir / "input.json").write_text(json.dumps(parameters))


def parse_out_json(output_files: list[Path]) -> dict:
    """Parser: the first output file as JSON."""
    return json.loads(output_files[0].read_text())


def parse_log(output_files: list[Path]) -> dict:
    """Parser: whether ``log.txt`` says done."""
    log = next(p for p in output_files if p.name == "log.txt")
    return {"done": log.read_text().strip() == "done"}


class CountingParser:
    """A JSON parser that counts its calls (in the calling process)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, output_files: list[Path]) -> dict:
        self.calls += 1
        return json.loads(output_files[0].read_text())


def energy_loss(quantities: dict) -> float:
    """Loss: the computed energy."""
    return quantities["energy"]


def build_external_cob(base: str):
    """Three external-program terms (the same on every rank)."""
    from chemfit.chemistry.external_program import ExternalProgramComputer
    from chemfit.core.combined import CombinedObjectiveFunction

    terms = []
    for shift in (0.0, 0.5, 1.0):
        computer = ExternalProgramComputer(
            [sys.executable, str(SIMULATOR), "ok"],
            ["out.json"],
            parse_out_json,
            input_templates={"input.json": '{{"x": {x:.6f}}}'},
            workdir_base=base,
            timeout=30,
        )
        terms.append(computer.with_loss(_shifted_loss, shift=shift))
    return CombinedObjectiveFunction(terms)


def _shifted_loss(quantities: dict, shift: float) -> float:
    return quantities["energy"] + shift


def _mpi_main(base: str) -> None:
    from mpi4py import MPI

    from chemfit.core.context import EvaluateContext
    from chemfit.execution.mpi_wrapper_cob import MPIWrapperCOB

    cob = build_external_cob(base)
    with MPIWrapperCOB(cob) as mpi:
        if mpi.rank == 0:
            ctx = EvaluateContext()
            value = mpi({"x": 3.0}, ctx)
            serial = cob({"x": 3.0})
            workdirs = [c["meta"]["external_program"]["workdir"] for c in ctx.meta["children"]]
            print(
                "RESULT "
                + json.dumps(
                    {
                        "value": value,
                        "serial": serial,
                        "size": MPI.COMM_WORLD.Get_size(),
                        "workdirs": workdirs,
                    }
                ),
                flush=True,
            )
        else:
            mpi.worker_loop()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    _mpi_main(sys.argv[1])
