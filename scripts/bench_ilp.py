"""Benchmark the bit-allocation MILP (``hf_adaquant.allocation.solve_allocation``) on large synthetic instances.

Times L=500 layers x K=16 options (weight bits {2,3,4,8} x activation bits {2,4,6,8}) over several size / BOPs
budgets, seeds and two sensitivity generators, checks that HiGHS proved optimality (status optimal, mip_gap 0) and
that the budgets hold, and writes ``benchmarks/results/ilp_solver.json`` and ``benchmarks/results/ilp_solver.md``.

Usage::

    python scripts/bench_ilp.py [--layers 500] [--seeds 0 1 2] [--out-dir benchmarks/results]
    python scripts/bench_ilp.py --compare-presolve   # the exact reductions on / off -> ilp_presolve.{json,md}
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import scipy

REPO = Path(__file__).resolve().parents[1]
from hf_adaquant.allocation import AllocationProblem, BitOption, solve_allocation

logger = logging.getLogger("bench_ilp")

WEIGHT_BITS = (2, 3, 4, 8)
ACT_BITS = (2, 4, 6, 8)
SIZE_BUDGETS = (0.07, 0.09, 0.125, 0.16, 0.2)  # fraction of the FP32 weight size
BOPS_BUDGETS = (None, 0.025, 0.01)  # fraction of the FP32 BOPs (W2A2 = 0.0039, W8A8 = 0.0625)


def make_problem(num_layers: int, seed: int, generator: str) -> AllocationProblem:
    """Synthetic problem.

    ``structured``: sensitivity ~ a_l * 4^-w + b_l * 4^-a with log-normal layer factors and 10 % noise (monotone in
    bits, like real measurements). ``random``: i.i.d. uniform sensitivities (no structure; harder for the solver).
    """
    rng = np.random.default_rng(seed)
    options = [BitOption(w, a) for w in WEIGHT_BITS for a in ACT_BITS]
    wb = np.array([o.weight_bits for o in options], dtype=np.float64)
    ab = np.array([o.activation_bits for o in options], dtype=np.float64)
    if generator == "structured":
        alpha = rng.lognormal(0.0, 1.0, size=(num_layers, 1))
        beta = rng.lognormal(-1.0, 1.0, size=(num_layers, 1))
        sens = alpha * 4.0 ** (2 - wb) + beta * 4.0 ** (2 - ab)
        sens = sens * rng.lognormal(0.0, 0.1, size=sens.shape)
    elif generator == "random":
        sens = rng.random((num_layers, len(options)))
    else:
        raise ValueError(f"unknown generator {generator!r}")
    return AllocationProblem(
        layer_names=[f"layer{i}" for i in range(num_layers)],
        options=options,
        sensitivity=sens,
        num_params=np.round(rng.lognormal(11.0, 1.5, size=num_layers)).astype(np.int64) + 1,
        macs=np.round(rng.lognormal(16.0, 1.5, size=num_layers)) + 1.0,
    )


def instances(num_layers: int, seeds: list[int], generators: list[str]
              ) -> Iterator[tuple[str, int, AllocationProblem, float | None, float]]:
    """Every benchmarked instance, as (generator, seed, problem, BOPs budget, size budget), in report order."""
    for generator in generators:
        for seed in seeds:
            problem = make_problem(num_layers, seed, generator)
            for bops_budget in BOPS_BUDGETS:
                for size_budget in SIZE_BUDGETS:
                    yield generator, seed, problem, bops_budget, size_budget


def run(num_layers: int, seeds: list[int], generators: list[str]) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for generator, seed, problem, bops_budget, size_budget in instances(num_layers, seeds, generators):
        start, cpu_start = time.perf_counter(), time.process_time()
        alloc = solve_allocation(problem, size_budget=size_budget, bops_budget=bops_budget)
        seconds = time.perf_counter() - start
        cpu_seconds = time.process_time() - cpu_start
        within = alloc.size_fraction <= size_budget + 1e-12 and (
            bops_budget is None or alloc.bops <= bops_budget * problem.fp32_bops * (1 + 1e-12)
        )
        # HiGHS runs with mip_rel_gap=0; it still stops at its absolute gap (1e-6 on the normalised
        # objective), so a proven optimum reports a relative mip_gap of 0 or ~1e-8.
        proven = alloc.optimal and alloc.mip_gap is not None and alloc.mip_gap <= 1e-6
        status = "optimal" if proven else f"NOT PROVEN (gap={alloc.mip_gap})"
        if not within:
            status += " BUDGET VIOLATED"
        row = {
            "generator": generator,
            "seed": seed,
            "L": problem.num_layers,
            "K": problem.num_options,
            "size_budget": size_budget,
            "bops_budget": bops_budget,
            "seconds": seconds,
            "cpu_seconds": cpu_seconds,
            "solver_seconds": alloc.solve_seconds,
            "status": status,
            "mip_gap": alloc.mip_gap,
            "size_fraction": alloc.size_fraction,
            "bops_fraction": alloc.bops / problem.fp32_bops,
            "predicted_criterion": alloc.predicted_criterion,
        }
        rows.append(row)
        logger.info(
            "%-10s seed=%d size<=%.3f bops<=%s: %.3f s, %s", generator, seed, size_budget, bops_budget,
            seconds, status,
        )
    return rows


def compare_presolve(num_layers: int, seeds: list[int], generators: list[str]) -> list[dict[str, object]]:
    """Every problem and budget of :func:`run` solved with and without the exact reductions (``presolve``)."""
    rows: list[dict[str, object]] = []
    for generator, seed, problem, bops_budget, size_budget in instances(num_layers, seeds, generators):
        row: dict[str, object] = {"generator": generator, "seed": seed, "size_budget": size_budget,
                                  "bops_budget": bops_budget}
        for presolve in (True, False):
            start = time.perf_counter()
            alloc = solve_allocation(problem, size_budget=size_budget, bops_budget=bops_budget, presolve=presolve)
            key = "with" if presolve else "without"
            row[f"{key}_seconds"] = time.perf_counter() - start
            row[f"{key}_objective"] = alloc.predicted_criterion
            row[f"{key}_optimal"] = alloc.optimal
        rows.append(row)
        logger.info("%-10s seed=%d size<=%.3f bops<=%s: with %.3f s, without %.3f s, objectives %.9g / %.9g",
                    generator, seed, size_budget, bops_budget, row["with_seconds"], row["without_seconds"],
                    row["with_objective"], row["without_objective"])
    return rows


def budget_groups(rows: list[dict[str, object]]) -> Iterator[tuple[str, str, list[dict[str, object]]]]:
    """(generator, "size only" | "size + BOPs", its rows) for each non-empty group, in first-seen generator order."""
    for generator in dict.fromkeys(str(r["generator"]) for r in rows):
        for kind in ("size only", "size + BOPs"):
            group = [r for r in rows
                     if r["generator"] == generator and (r["bops_budget"] is None) == (kind == "size only")]
            if group:
                yield generator, kind, group


def write_presolve_markdown(path: Path, rows: list[dict[str, object]], meta: dict[str, object]) -> None:
    lines = [
        "# Bit-allocation MILP: exact reductions (presolve) on / off (`scripts/bench_ilp.py --compare-presolve`)",
        "",
        f"scipy {meta['scipy']} (HiGHS, its own presolve on in both), {meta['cpu_count']} CPU cores, "
        f"{meta['date']}; 1-min load average {meta['load_avg_1min_before']} before, "
        f"{meta['load_avg_1min_after']} after. L={meta['layers']}, K=16.",
        "",
        "| generator | budgets | solves | median s with | median s without | max s with | max s without | "
        "total s with | total s without | max rel. objective diff |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for generator, kind, group in budget_groups(rows):
        w = [float(r["with_seconds"]) for r in group]
        wo = [float(r["without_seconds"]) for r in group]
        diff = max(abs(float(r["with_objective"]) - float(r["without_objective"]))
                   / max(abs(float(r["without_objective"])), 1e-300) for r in group)
        lines.append(f"| {generator} | {kind} | {len(group)} | {statistics.median(w):.3f} | "
                     f"{statistics.median(wo):.3f} | {max(w):.3f} | {max(wo):.3f} | {sum(w):.2f} | {sum(wo):.2f} "
                     f"| {diff:.1e} |")
    path.write_text("\n".join(lines) + "\n")


def write_markdown(path: Path, rows: list[dict[str, object]], meta: dict[str, object]) -> None:
    times = [float(r["seconds"]) for r in rows]
    lines = [
        "# Bit-allocation MILP timings (`scripts/bench_ilp.py`)",
        "",
        f"scipy {meta['scipy']} (HiGHS), numpy {meta['numpy']}, Python {meta['python']}, {meta['cpu_count']} CPU "
        f"cores, {meta['machine']}; {meta['date']}; 1-min load average {meta['load_avg_1min_before']} before, "
        f"{meta['load_avg_1min_after']} after (other processes share the cores when it exceeds ~1).",
        f"Options: weight bits {list(WEIGHT_BITS)} x activation bits {list(ACT_BITS)}. Budgets as fractions of "
        "FP32 (size: 32 bits/param; BOPs: sum macs*32*32). `seconds` = wall time of `solve_allocation` "
        "(validation, exact reductions, LP, HiGHS MILP with mip_rel_gap=0); `CPU s` = process CPU time.",
        "",
        f"**{len(rows)} solves: median {statistics.median(times):.3f} s, max {max(times):.3f} s; "
        f"{sum(r['status'] == 'optimal' for r in rows)}/{len(rows)} proven optimal.**",
        "",
        "| generator | budgets | solves | median s | max s | max CPU s | proven optimal |",
        "|---|---|---|---|---|---|---|",
    ]
    for generator, kind, group in budget_groups(rows):
        secs = [float(r["seconds"]) for r in group]
        lines.append(
            f"| {generator} | {kind} | {len(group)} | {statistics.median(secs):.3f} | {max(secs):.3f} | "
            f"{max(float(r['cpu_seconds']) for r in group):.3f} | "
            f"{sum(r['status'] == 'optimal' for r in group)}/{len(group)} |"
        )
    lines += [
        "",
        "| generator | seed | L | K | size budget | BOPs budget | seconds | CPU s | status | mip_gap | size used | "
        "BOPs used |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        bops = "-" if r["bops_budget"] is None else f"{r['bops_budget']:g}"
        lines.append(
            f"| {r['generator']} | {r['seed']} | {r['L']} | {r['K']} | {r['size_budget']:g} | {bops} | "
            f"{r['seconds']:.3f} | {r['cpu_seconds']:.3f} | {r['status']} | {r['mip_gap']:.1e} | "
            f"{r['size_fraction']:.4f} | "
            f"{r['bops_fraction']:.4f} |"
        )
    path.write_text("\n".join(lines) + "\n")


def load_average() -> float | None:
    """The 1-minute load average (rounded), or None where the platform has none."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=500)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--generators", nargs="+", default=["structured", "random"])
    parser.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--compare-presolve", action="store_true",
                        help="solve every instance with and without the exact reductions; writes ilp_presolve.*")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    logging.getLogger("hf_adaquant").setLevel(logging.WARNING)
    load_before = load_average()
    if args.compare_presolve:
        rows = compare_presolve(args.layers, args.seeds, args.generators)
        meta = {"load_avg_1min_before": load_before, "layers": args.layers, "scipy": scipy.__version__,
                "load_avg_1min_after": load_average(),
                "cpu_count": os.cpu_count(), "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "ilp_presolve.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
        write_presolve_markdown(args.out_dir / "ilp_presolve.md", rows, meta)
        return 0 if all(r["with_optimal"] and r["without_optimal"] for r in rows) else 1
    rows = run(args.layers, args.seeds, args.generators)
    meta = {
        "load_avg_1min_before": load_before,
        "load_avg_1min_after": load_average(),
        "scipy": scipy.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "ilp_solver.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    write_markdown(args.out_dir / "ilp_solver.md", rows, meta)
    times = [float(r["seconds"]) for r in rows]
    bad = [r for r in rows if r["status"] != "optimal"]
    logger.info(
        "%d solves: median %.3f s, max %.3f s, %d not proven optimal / over budget; wrote %s",
        len(rows), statistics.median(times), max(times), len(bad), args.out_dir,
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
