"""Shared by the Slurm tests: skip or fail without Slurm, and check that nothing is left.

Locally the Slurm tests skip when ``sbatch`` is missing or no node takes jobs; with
``CHEMFIT_REQUIRE_SLURM=1`` (set by ``.ci/run`` after ``.ci/slurm-up``) they fail instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

REQUIRE_VARIABLE = "CHEMFIT_REQUIRE_SLURM"


def slurm_problem() -> str | None:
    """Why no Slurm job can run here (``None``: Slurm is up with a node that takes jobs)."""
    if shutil.which("sbatch") is None:
        return "sbatch is not on PATH (start a test Slurm with .ci/slurm-up, as root)"
    try:
        done = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"sinfo failed: {exc}"
    states = done.stdout.split()
    if not any(s.startswith(("idle", "mixed", "alloc")) for s in states):
        return f"no Slurm node takes jobs (sinfo: {states or done.stderr.strip()})"
    return None


def require_slurm() -> None:
    """Skip (or, with CHEMFIT_REQUIRE_SLURM=1, fail) when Slurm cannot run jobs here."""
    problem = slurm_problem()
    if problem is None:
        return
    if os.environ.get(REQUIRE_VARIABLE) == "1":
        pytest.fail(f"{REQUIRE_VARIABLE}=1 but Slurm is not usable: {problem}")
    pytest.skip(problem)


def queued_jobs(prefix: str = "chemfit-") -> list[str]:
    """``id name state`` of this user's jobs in ``squeue`` whose name starts with ``prefix``."""
    done = subprocess.run(
        ["squeue", "-h", "--me", "-o", "%i %j %T"], capture_output=True, text=True, timeout=10
    )
    return [line for line in done.stdout.splitlines() if line.split()[1].startswith(prefix)]


def wait_no_jobs(seconds: float = 15, prefix: str = "chemfit-") -> list[str]:
    """The jobs still queued after up to ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        left = queued_jobs(prefix)
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.2)


def slurm_step_processes() -> list[str]:
    """Processes under a ``slurmstepd`` (a job's tasks) still running on this machine."""
    import psutil

    found = []
    for process in psutil.process_iter(["pid", "name", "cmdline"]):
        try:
            if process.info["name"] == "slurmstepd":
                for child in process.children(recursive=True):
                    found.append(f"{child.pid} {' '.join(child.cmdline())[:120]}")
        except psutil.Error:
            continue
    return found
