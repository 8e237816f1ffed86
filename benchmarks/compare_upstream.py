"""Compare chemfit with upstream chemfit 3.1.1 side by side, case by case, in one run.

Each case of ``benchmarks/upstream_cases.py`` runs once per round on each side: upstream in
``.venv-upstream`` (made by ``benchmarks/upstream_env.sh``), chemfit in ``.venv``, each in its own
subprocess (the MPI cases under that venv's ``mpiexec -n 2``). The side that goes first
alternates from round to round and from case to case, so that a change in the machine's load
does not favour one side. Both sides get the same loop counts (calibrated once, here, at the
start), hence the same work; the table after the figures shows that both computed the same
losses.

Printed: a Markdown table, per case and metric: upstream and chemfit min and median (over all
repeats of all rounds), the ratio chemfit / upstream of the medians and a verdict; for
speed-ups and ratios to a reference, "min" is the ratio of the min times and "median" that of
the median times. A side that fails or hangs shows FAILED or HANG in its cells (and is not run
again in later rounds after a hang); the reason follows the table.

Usage::

    .venv/bin/python benchmarks/compare_upstream.py [--cases mpi_cheap,pool_numpy]
        [--rounds 3] [--repeats 7] [--timeout 180] [--json]
    .venv/bin/python benchmarks/compare_upstream.py --from-json saved.json

``--json`` prints one JSON document (every raw time, both packages' versions and paths, the
losses, the rows of the table) instead of the table; ``--from-json`` prints its table. Only the standard library is imported here
(``upstream_cases.py`` imports :func:`summarize` from this module on both sides).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES_SCRIPT = ROOT / "benchmarks" / "upstream_cases.py"
SIDES = ("upstream", "chemfit")
DEFAULT_PYTHONS = {
    "upstream": ROOT / ".venv-upstream" / "bin" / "python",
    "chemfit": ROOT / ".venv" / "bin" / "python",
}
UPSTREAM_VERSION = "3.1.1"
MPI_RANKS = 2

# kind: (unit shown, scale of the raw seconds, lower is better)
KINDS = {
    "ms_per_call": ("ms per call", 1e3, True),
    "us_per_call": ("µs per call", 1e6, True),
    "speedup": ("speed-up", 1.0, False),
    "ratio_to_bare": ("x a bare map", 1.0, True),
    "cpu_fraction": ("core fraction", 1.0, True),
}
# Reference metrics: shown in the work check, not compared in the main table.
REFERENCE_METRICS = ("serial", "bare executor.map")
# Issue 14's targets: (case, metric) -> (comparison, bound)
TARGETS = {
    ("mpi_numpy", "MPIWrapperCOB"): (">=", 1.8),
    ("mpi_python", "MPIWrapperCOB"): (">=", 1.8),
    ("mpi_cheap", "idle worker rank"): ("<=", 0.05),
    ("pool_numpy", "default"): (">=", 1.8),
    ("pool_python", "default"): (">=", 1.8),
    ("loky_numpy", "default"): (">=", 1.8),
    ("loky_python", "default"): (">=", 1.8),
    ("own_executor_map", "map_with_context / bare"): ("<=", 2.0),
}
TOLERANCE = 0.05  # within 5 % of upstream's median counts as "at"


def summarize(kind: str, seconds: list[float], reference: list[float] | None = None) -> dict:
    """Min and median of a metric, in its unit.

    Examples
    --------
    >>> summarize("ms_per_call", [0.002, 0.001, 0.003])
    {'min': 1.0, 'median': 2.0}
    >>> summarize("speedup", [0.5, 1.0], reference=[1.0, 1.5])
    {'min': 2.0, 'median': 1.6666666666666667}
    """
    if kind == "speedup":
        low = min(reference) / min(seconds)
        mid = statistics.median(reference) / statistics.median(seconds)
    elif kind == "ratio_to_bare":
        low = min(seconds) / min(reference)
        mid = statistics.median(seconds) / statistics.median(reference)
    else:
        scale = KINDS[kind][1]
        low, mid = min(seconds) * scale, statistics.median(seconds) * scale
    return {"min": low, "median": mid}


# -- running one side ---------------------------------------------------------------------------


def side_env() -> dict:
    """The same environment for both sides: no PYTHONPATH, one thread per numeric library."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.pop("VIRTUAL_ENV", None)
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def process_table() -> dict[int, tuple[int, float]]:
    """``{pid: (parent pid, CPU seconds)}`` of every process (from /proc; empty elsewhere)."""
    table = {}
    tick = os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        table[int(stat.parent.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    return table


def descendants(pid: int, table: dict[int, tuple[int, float]] | None = None) -> set[int]:
    """The processes started by ``pid``, at any depth."""
    children: dict[int, list[int]] = {}
    for child, (parent, _) in (table or process_table()).items():
        children.setdefault(parent, []).append(child)
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


class OtherLoad:
    """CPU seconds used by processes outside this harness's process tree while it runs.

    A thread samples /proc every ``interval`` seconds. Processes ever seen in the tree (a run,
    its pool workers, MPI ranks) are never counted, even after they are orphaned; a process
    that appears later counts from zero. Near 0 on a quiet machine.
    """

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.mine: set[int] = {os.getpid()}
        self.names: dict[int, str] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        table = process_table()
        self.mine |= descendants(os.getpid(), table)
        for pid, (_, cpu) in table.items():
            if pid in self.mine:
                continue
            self.first.setdefault(pid, cpu if self.samples == 0 else 0.0)
            self.last[pid] = cpu
            if pid not in self.names and cpu > self.first[pid]:
                self.names[pid] = command_line(pid)
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> OtherLoad:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def cpu_seconds(self) -> float | None:
        if not self.last:
            return None  # no /proc
        return sum(self.last[pid] - self.first[pid] for pid in self.last if pid not in self.mine)

    def top(self, n: int = 3, at_least: float = 0.5) -> list[dict]:
        """The ``n`` other processes that used the most CPU (``at_least`` seconds)."""
        used = {pid: self.last[pid] - self.first[pid] for pid in self.names if pid not in self.mine}
        ranked = sorted(used, key=used.get, reverse=True)[:n]
        return [
            {"command": self.names[p][:120], "cpu_seconds": used[p]}
            for p in ranked
            if used[p] >= at_least
        ]


def command_line(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return raw.replace(b"\0", b" ").decode(errors="replace").strip() or f"[pid {pid}]"


def kill_tree(pid: int) -> None:
    """Kill a hung run: its process group, and its descendants that left the group (MPICH's
    hydra proxy starts its own group, the ranks under it)."""
    tree = descendants(pid)
    os.killpg(pid, signal.SIGKILL)
    for child in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


def run_script(python: Path, args: list[str], timeout: float, under_mpi: bool) -> dict:
    """Run ``upstream_cases.py`` with ``python``; its last JSON line, or ``{"error": ...}``."""
    cmd = [str(python), str(CASES_SCRIPT), *args]
    if under_mpi:
        cmd = [str(python.parent / "mpiexec"), "-n", str(MPI_RANKS), *cmd]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=CASES_SCRIPT.parent,
        env=side_env(),
        start_new_session=True,  # one process group: a hang is killed with all its children
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        proc.communicate()
        return {"error": f"HANG: no result after {timeout:g} s (killed)", "hang": True}
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = " | ".join(err.strip().splitlines()[-3:]) or "no output"
        return {"error": f"FAILED (exit {proc.returncode}): {tail}"}
    return json.loads(lines[-1])


# -- aggregating --------------------------------------------------------------------------------


def merge_runs(runs: list[dict]) -> dict:
    """One side's runs of a case, pooled: every metric's times over all rounds, summarized."""
    merged: dict = {"metrics": {}, "losses": {}, "serial_loss": None, "package": None}
    for run in runs:
        merged["package"] = run["package"]
        merged["serial_loss"] = run["serial_loss"]
        merged["losses"].update(run["losses"])
        merged["default_terms_per_task"] = run.get("default_terms_per_task")
        for name, entry in run["metrics"].items():
            pooled = merged["metrics"].setdefault(
                name, {"kind": entry["kind"], "seconds": [], "reference": []}
            )
            pooled["seconds"].extend(entry["seconds"])
            pooled["reference"].extend(entry.get("reference", []))
    for entry in merged["metrics"].values():
        entry.update(summarize(entry["kind"], entry["seconds"], entry["reference"] or None))
    return merged


def verdict(kind: str, upstream: float, chemfit: float) -> tuple[float, str]:
    """chemfit / upstream (of the medians) and whether chemfit is better, at or worse."""
    lower_is_better = KINDS[kind][2]
    if upstream == 0 or chemfit == 0:  # e.g. an idle rank's CPU time below the clock's tick
        ratio = chemfit / upstream if upstream else (1.0 if chemfit == 0 else float("inf"))
        gain = float("inf") if (chemfit == 0) == lower_is_better else 0.0
        return ratio, "at" if upstream == chemfit else ("better" if gain else "WORSE")
    ratio = chemfit / upstream
    gain = 1 / ratio if lower_is_better else ratio
    if gain > 1 + TOLERANCE:
        return ratio, "better"
    if gain >= 1 - TOLERANCE:
        return ratio, "at"
    return ratio, "WORSE"


def target_check(case: str, metric: str, value: float) -> str:
    if (case, metric) not in TARGETS:
        return ""
    op, bound = TARGETS[case, metric]
    met = value >= bound if op == ">=" else value <= bound
    return f"{op} {bound:g}: {'met' if met else 'NOT met'}"


def metric_label(name: str, side: dict) -> str:
    """``default/time`` -> ``default (terms_per_task=auto)``: the unit column tells the rest."""
    name = name.removesuffix("/time")
    if name == "default" and side.get("default_terms_per_task") is not None:
        return f"default (terms_per_task={side['default_terms_per_task']})"
    return name


def build_rows(case: str, sides: dict) -> list[dict]:
    """The table rows of a case: chemfit's metrics against upstream's (its one wrapper mode
    stands against each of chemfit's ``terms_per_task`` variants)."""
    rows = []
    up, ours = sides["upstream"], sides["chemfit"]
    names = list(ours.get("metrics") or {}) or list(up.get("metrics") or {})
    names.sort(key=lambda name: name.endswith("/time"))  # speed-ups first, then times
    for name in names:
        if name in REFERENCE_METRICS:
            continue
        up_metrics = up.get("metrics") or {}
        suffix = "/time" if name.endswith("/time") else ""
        up_entry = up_metrics.get(name) or up_metrics.get(f"default{suffix}")
        our_entry = (ours.get("metrics") or {}).get(name)
        kind = (our_entry or up_entry)["kind"]
        row = {
            "case": case,
            "metric": metric_label(name, ours),
            "unit": KINDS[kind][0],
            "upstream": up.get("error") or {k: up_entry[k] for k in ("min", "median")},
            "chemfit": ours.get("error") or {k: our_entry[k] for k in ("min", "median")},
        }
        if our_entry and up_entry and "error" not in up and "error" not in ours:
            row["ratio"], row["verdict"] = verdict(kind, up_entry["median"], our_entry["median"])
        if our_entry and "error" not in ours:
            row["target"] = target_check(case, name, our_entry["median"])
        rows.append(row)
    return rows


def loss_check(sides: dict) -> dict:
    """The case's losses on both sides (serial and through each wrapper) and their spread."""
    losses = []
    for side in SIDES:
        if "error" in sides[side]:
            continue
        losses.append(sides[side]["serial_loss"])
        losses.extend(sides[side]["losses"].values())
    if not losses:
        return {"agree": None}
    spread = max(losses) - min(losses)
    return {
        "upstream": sides["upstream"].get("serial_loss"),
        "chemfit": sides["chemfit"].get("serial_loss"),
        "max_abs_difference": spread,
        "agree": spread <= 1e-12 * max(1.0, abs(max(losses))),
    }


# -- printing -----------------------------------------------------------------------------------


def cell(value) -> str:
    if isinstance(value, str):
        return value.split(":")[0]  # HANG / FAILED (exit n)
    return f"{value:.3g}"


def print_report(report: dict) -> None:
    meta = report["meta"]
    print(
        f"chemfit {meta['chemfit']['version']} ({meta['chemfit']['path']}) against upstream "
        f"{meta['upstream']['version']} ({meta['upstream']['path']})"
    )
    print(
        f"{meta['rounds']} rounds x {meta['repeats']} repeats, {meta['cpus']} CPUs, "
        f"Python {meta['python']}, {meta['seconds']:.0f} s; loop counts {report['calibration']}"
    )
    other = meta.get("other_cpu_seconds")
    if other is not None:
        cores = other / meta["seconds"]
        warning = "" if cores < 0.1 else " (NOT a quiet machine: the figures are disturbed)"
        print(f"other processes used {other:.1f} CPU s meanwhile, {cores:.2f} cores{warning}")
        for proc in meta.get("other_processes", []):
            print(f"  {proc['cpu_seconds']:.1f} CPU s: {proc['command']}")
    print()
    print(
        "| case | metric | unit | upstream min | upstream median | chemfit min "
        "| chemfit median | chemfit/upstream | chemfit is | issue 14 target |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for case in report["cases"].values():
        for row in case["rows"]:
            up, ours = row["upstream"], row["chemfit"]
            up_cells = (
                [cell(up)] * 2 if isinstance(up, str) else [cell(up["min"]), cell(up["median"])]
            )
            our_cells = (
                [cell(ours)] * 2
                if isinstance(ours, str)
                else [cell(ours["min"]), cell(ours["median"])]
            )
            ratio = f"{row['ratio']:.2f}" if "ratio" in row else "-"
            print(
                f"| {row['case']} | {row['metric']} | {row['unit']} | {' | '.join(up_cells)} | "
                f"{' | '.join(our_cells)} | {ratio} | {row.get('verdict', '-')} | "
                f"{row.get('target', '')} |"
            )
    print()
    print("Same work on both sides (reference timings: medians; losses of the serial objective):")
    print()
    print(
        "| case | reference | upstream | chemfit | loss upstream | loss chemfit | all losses agree |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, case in report["cases"].items():
        sides, losses = case["sides"], case["losses"]
        for ref in REFERENCE_METRICS:
            entries = [(sides[s].get("metrics") or {}).get(ref) for s in SIDES]
            if not any(entries):
                continue
            kind = next(e for e in entries if e)["kind"]
            values = [cell(e["median"]) if e else "-" for e in entries]
            print(
                f"| {name} | {ref} ({KINDS[kind][0]}) | {values[0]} | {values[1]} | "
                f"{losses.get('upstream')!r} | {losses.get('chemfit')!r} | {losses['agree']} |"
            )
    errors = [
        (name, side, error)
        for name, case in report["cases"].items()
        for side in SIDES
        for error in case["sides"][side].get("errors", [])
    ]
    if errors:
        print()
        print("Failures:")
        for name, side, error in errors:
            print(f"- {name} ({side}): {error}")


# -- main ---------------------------------------------------------------------------------------


def check_package(side: str, package: dict, python: Path) -> None:
    """Stop when a side imported the wrong chemfit (the comparison would be meaningless)."""
    path = Path(package["path"])
    if side == "upstream":
        venv = python.parent.parent.resolve()
        ok = package["version"] == UPSTREAM_VERSION and venv in path.parents
    else:
        ok = ROOT / "chemfit" in (path, *path.parents)
    if not ok:
        raise SystemExit(f"the {side} side imported chemfit {package['version']} from {path}")


def run_rounds(
    args: argparse.Namespace,
    cases: list[str],
    listing: dict,
    pythons: dict[str, Path],
    iteration_args: list[str],
) -> tuple[dict, dict]:
    """Every case on both sides, ``args.rounds`` times, alternating which side goes first."""
    runs = {case: {side: [] for side in SIDES} for case in cases}
    errors = {case: {side: [] for side in SIDES} for case in cases}
    for round_index in range(args.rounds):
        for case_index, case in enumerate(cases):
            order = SIDES if (round_index + case_index) % 2 == 0 else SIDES[::-1]
            for side in order:
                if any("HANG" in e for e in errors[case][side]):
                    continue  # do not wait for the same hang again
                t0 = time.perf_counter()
                under_mpi = listing[case][1]
                cmd = [case, f"--repeats={args.repeats}", *iteration_args]
                result = run_script(pythons[side], cmd, args.timeout, under_mpi)
                status = result.get("error", "ok")
                print(
                    f"round {round_index + 1}/{args.rounds} {case:<17} {side:<8} "
                    f"{time.perf_counter() - t0:5.1f} s  {status}",
                    file=sys.stderr,
                    flush=True,
                )
                if "error" in result:
                    errors[case][side].append(result["error"])
                else:
                    check_package(side, result["package"], pythons[side])
                    runs[case][side].append(result)
    return runs, errors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", help="comma-separated case names (default: all)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per case and round")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds per case run")
    parser.add_argument("--upstream-python", type=Path, default=DEFAULT_PYTHONS["upstream"])
    parser.add_argument("--chemfit-python", type=Path, default=DEFAULT_PYTHONS["chemfit"])
    parser.add_argument("--json", action="store_true", help="print a JSON document instead")
    parser.add_argument("--from-json", type=Path, help="print the table of a saved --json run")
    args = parser.parse_args()
    if args.from_json:
        print_report(json.loads(args.from_json.read_text()))
        return 0
    pythons = {"upstream": args.upstream_python, "chemfit": args.chemfit_python}
    for side, python in pythons.items():
        if not python.exists():
            hint = " (run benchmarks/upstream_env.sh)" if side == "upstream" else " (make setup)"
            raise SystemExit(f"no python for the {side} side at {python}{hint}")

    started = time.perf_counter()
    with OtherLoad() as other_load:  # CPU used by other processes meanwhile
        listing = run_script(pythons["chemfit"], ["list"], args.timeout, False)
        calibration = run_script(pythons["chemfit"], ["calibrate"], args.timeout, False)
        for answer in (listing, calibration):
            if "error" in answer:
                raise SystemExit(answer["error"])
        cases = args.cases.split(",") if args.cases else list(listing)
        unknown = set(cases) - set(listing)
        if unknown:
            raise SystemExit(f"unknown cases {sorted(unknown)}; known: {', '.join(listing)}")
        iteration_args = [
            f"--{key.replace('_', '-')}={value}" for key, value in sorted(calibration.items())
        ]
        runs, errors = run_rounds(args, cases, listing, pythons, iteration_args)

    report: dict = {"calibration": calibration, "cases": {}}
    packages = {}
    for case in cases:
        sides = {}
        for side in SIDES:
            if runs[case][side]:
                sides[side] = merge_runs(runs[case][side])
                packages[side] = sides[side]["package"]
            else:
                sides[side] = {"error": errors[case][side][0]}
            sides[side]["errors"] = errors[case][side]
        report["cases"][case] = {
            "description": listing[case][0],
            "sides": sides,
            "losses": loss_check(sides),
            "rows": build_rows(case, sides),
        }
    unknown_package = {"version": "?", "path": "?"}
    report["meta"] = {
        "rounds": args.rounds,
        "repeats": args.repeats,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "seconds": time.perf_counter() - started,
        "other_cpu_seconds": other_load.cpu_seconds,  # on a quiet machine close to 0
        "other_processes": other_load.top(),
        **{side: packages.get(side, unknown_package) for side in SIDES},
    }
    if args.json:
        json.dump(report, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
