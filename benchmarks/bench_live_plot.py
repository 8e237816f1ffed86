"""What the live plot costs a fast fit: chemfit_widgets.LivePlot on a 2000-evaluation fit.

A cheap 2-parameter objective is fitted with ``fit_nevergrad(budget=2000)`` (``OnePlusOne`` by
default: the fastest optimizer, so the plot's share is the largest) in one process, side by
side and interleaved:

* ``none``: the fit alone;
* ``png``: with a ``LivePlot(backend="png")`` as evaluation callback; frames are rendered to
  PNG in the fit's thread, plus the final frame after the fit (``plot.finish()``);
* ``ipympl``: with a ``LivePlot(backend="ipympl")``; a thread stands in for the browser and
  the kernel's main thread: it answers each frame request the way the front end does (ipympl
  then draws in that thread), so drawing competes with the fit for the GIL as in a notebook;
* ``dashboard``: a whole ``FitDashboard`` (serial executor, PNG plot, progress bar, best-loss
  text and table), started and waited for.

For each case the report gives the fit's wall time (until ``fit_nevergrad`` returns, and with
the final frame), the wall-time overhead relative to ``none`` (min and median over repeats;
on a busy machine this is dominated by timing noise), the frames drawn while the fit ran, the
time they took as a fraction of the fit's time (the plotting cost itself), the first-frame
latency (from the first evaluation to the end of the first frame that shows it), the longest
gap between frames while the fit ran, and the final frame drawn after the fit. Targets: the
first frame within 1 s, a frame at least every 2 s, plotting < 5 % of the fit.

``frame_cost`` then gives what one frame costs on each backend with 100, 10k and 100k
evaluations in the plot (min and median over repeats): the first frame with data after
``reset`` (it sets the loss axis' limits, so it redraws that axes) and a steady frame (one new
evaluation: only the data are drawn, thinned to at most ``max_points`` points).

Usage: ``python benchmarks/bench_live_plot.py [--repeats N] [--budget B] [--optimizer NAME]
[--cases none,png,ipympl,dashboard] [--sizes 100,10000,100000]``
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import logging
import math
import random
import statistics
import time

from chemfit import Fitter


def _cheap(parameters: dict) -> float:
    return (parameters["x"] - 1.0) ** 2 + (parameters["y"] + 0.5) ** 2


def _fitter() -> Fitter:
    return Fitter(_cheap, {"x": 0.0, "y": 0.0}, bounds={"x": (-5, 5), "y": (-5, 5)})


def _run_case(case: str, budget: int, optimizer: str, seed: int) -> dict:
    from chemfit_widgets import FitDashboard, LivePlot
    from chemfit_widgets.headless import HeadlessFrontEnd

    fitter = _fitter()
    kwargs = {"budget": budget, "optimizer_str": optimizer, "seed": seed, "progress": False}
    if case == "none":
        start = time.perf_counter()
        fitter.fit_nevergrad(**kwargs)
        fit = time.perf_counter() - start
        return {"fit": fit, "total": fit, "frames": 0, "draw_s": 0.0, "final_s": 0.0}
    first_record: list[float] = []
    fitter.register_evaluation_callback(
        lambda record: first_record or first_record.append(time.perf_counter())
    )
    if case == "dashboard":
        dash = FitDashboard(
            fitter,
            budget=budget,
            optimizer=optimizer,
            kind="serial",
            plot_options={"backend": "png"},
            fit_options={"seed": seed},
        )
        start = time.perf_counter()
        dash.start()
        dash.wait(timeout=600)
        total = time.perf_counter() - start
        final = dash.plot._cadence.last_cost or 0.0  # the dashboard draws the final frame itself
        out = {
            "fit": fitter.result.wall_time,
            "total": total,
            "frames": dash.plot.draw_count - 1,
            "draw_s": dash.plot.draw_seconds - final,
            "final_s": final,
            "latency": dash.plot.first_frame_latency,
            "max_gap": _max_gap(dash.plot, first_record, start + fitter.result.wall_time),
        }
        dash.close()
        return out
    plot = LivePlot(backend=case)
    front_end = HeadlessFrontEnd(plot._canvas) if case == "ipympl" else None
    # As the dashboard does at Start: the clock starts, the panels and axes are set up and the
    # empty frame is drawn (outside the drawing budget; here before the fit's clock starts).
    plot.reset(expected=budget, names=["x", "y"], bounds=fitter.bounds)
    if front_end is not None:
        front_end.drain()
    fitter.register_evaluation_callback(plot)
    start = time.perf_counter()
    fitter.fit_nevergrad(**kwargs)
    fit = time.perf_counter() - start
    frames, drawing = plot.draw_count, plot.draw_seconds  # frames drawn while the fit ran
    max_gap = _max_gap(plot, first_record, start + fit)
    plot.finish()
    if front_end is not None:
        front_end.drain()
    total = time.perf_counter() - start
    out = {
        "fit": fit,
        "total": total,
        "frames": frames,
        "draw_s": drawing,
        "final_s": plot.draw_seconds - drawing,
        "latency": plot.first_frame_latency,
        "max_gap": max_gap,
    }
    if front_end is not None:
        front_end.close()
    plot.close()
    return out


def _max_gap(plot, first_record: list[float], end: float) -> float:
    """The longest time without a frame, from the first evaluation to the fit's end."""
    if not first_record:
        return math.nan
    times = [first_record[0]] + [f.at for f in plot.frames if first_record[0] < f.at < end]
    return max(b - a for a, b in itertools.pairwise([*times, end]))


def _summary(values: list[float]) -> dict:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return {"min": None, "median": None}
    return {"min": min(values), "median": statistics.median(values)}


def _frame_costs_once(backend: str, n: int, seed: int) -> tuple[float, list[float], int]:
    """(first frame, steady frames, points drawn) of one plot fed ``n`` evaluations."""
    from chemfit_widgets import LivePlot
    from chemfit_widgets.headless import HeadlessFrontEnd

    rng = random.Random(seed)
    plot = LivePlot(backend=backend, min_interval=3600.0)  # frames only when asked for
    front_end = HeadlessFrontEnd(plot._canvas) if backend == "ipympl" else None
    plot.reset(expected=n, names=["x", "y"], bounds={"x": (-5, 5), "y": (-5, 5)})
    if front_end is not None:
        front_end.drain()  # the empty frame of reset

    def draw() -> None:
        plot.redraw()
        if front_end is not None:
            front_end.drain()

    def add(i: int) -> None:
        x, y = rng.gauss(0, 1), rng.gauss(0, 1)
        plot._append(((x * x + y * y) / math.sqrt(i + 1), False, {"x": x, "y": y}, None))

    add(0)
    draw()
    first = plot.frames[-1].seconds
    for i in range(1, n):
        add(i)
    draw()  # converts the n records; may redraw axes
    draw()
    steady = []
    for i in range(n, n + 10):
        add(i)
        draw()
        steady.append(plot.frames[-1].seconds)
    points = plot.frames[-1].points
    if front_end is not None:
        front_end.close()
    plot.close()
    return first, steady, points


def _frame_costs(backend: str, n: int, repeats: int) -> dict:
    """The first frame with data after reset, and a steady frame, with ``n`` evaluations."""
    first, steady, points = [], [], 0
    for repeat in range(repeats):
        one, more, points = _frame_costs_once(backend, n, repeat)
        first.append(one)
        steady.extend(more)
    return {
        "first_frame_s": _summary(first),
        "steady_frame_s": _summary(steady),
        "points_drawn": points,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget", type=int, default=2000)
    parser.add_argument("--optimizer", default="OnePlusOne")
    parser.add_argument("--cases", default="none,png,ipympl,dashboard")
    parser.add_argument("--sizes", default="100,10000,100000")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    cases = args.cases.split(",")
    if "none" not in cases:
        cases.insert(0, "none")
    _run_case("none", 50, args.optimizer, 0)  # warm-up: imports and first-use caches
    for case in cases[1:]:
        _run_case(case, 50, args.optimizer, 0)
    runs: dict[str, list[dict]] = {case: [] for case in cases}
    for repeat in range(args.repeats):
        # Interleaved, in alternating order, so that drifts in machine load hit every case.
        for case in cases if repeat % 2 == 0 else cases[::-1]:
            runs[case].append(_run_case(case, args.budget, args.optimizer, seed=repeat))
    base = [r["fit"] for r in runs["none"]]
    report: dict = {
        "budget": args.budget,
        "optimizer": args.optimizer,
        "repeats": args.repeats,
        "target": "overhead < 0.05",
        "none_fit_s": _summary(base),
    }
    for case in cases[1:]:
        fits = [r["fit"] for r in runs[case]]
        totals = [r["total"] for r in runs[case]]
        report[case] = {
            "fit_s": _summary(fits),
            "with_final_frame_s": _summary(totals),
            "overhead": {
                "min_ratio": min(fits) / min(base) - 1.0,
                "median_ratio": statistics.median(fits) / statistics.median(base) - 1.0,
            },
            "overhead_with_final_frame": {
                "min_ratio": min(totals) / min(base) - 1.0,
                "median_ratio": statistics.median(totals) / statistics.median(base) - 1.0,
            },
            "frames_during_fit": _summary([r["frames"] for r in runs[case]]),
            "drawing_during_fit_s": _summary([r["draw_s"] for r in runs[case]]),
            # Drawing time over the fit's time: the cost, free of the machine's timing noise.
            "drawing_fraction_of_fit": _summary([r["draw_s"] / r["fit"] for r in runs[case]]),
            "final_frame_s": _summary([r["final_s"] for r in runs[case]]),
            "final_frame_fraction_of_fit": _summary([r["final_s"] / r["fit"] for r in runs[case]]),
            "first_frame_latency_s": _summary([r["latency"] for r in runs[case]]),
            "max_gap_between_frames_s": _summary([r["max_gap"] for r in runs[case]]),
        }
    backends = ["png"] + (["ipympl"] if importlib.util.find_spec("ipympl") else [])
    report["frame_cost"] = {
        backend: {
            n: _frame_costs(backend, n, args.repeats) for n in map(int, args.sizes.split(","))
        }
        for backend in backends
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
