"""The medium-data study's tables: EMaQ (a sweep over N) against mu sampled, mu greedy and a deterministic BC.

    python benchmarks/medium_study.py --sweep-dir sweeps/medium --mu-json mu50_*.json --bc-csv bc.csv

Reads the sweep's runs (benchmarks/sweep.py: summary.json and TensorBoard events of every run), mu's evaluations
over many episodes (tools/diagnose_q.py <mu run> --ns 1 --temperatures 1.0 0.0 --json FILE: N = 1 at temperature 1 is
mu sampled, at temperature 0 mu greedy) and the BC peer's CSV (benchmarks/bc_baseline.py), and prints markdown:
per dataset, the IQM of EMaQ's last score over seeds with rliable's 95% stratified bootstrap CI beside the baselines;
the aggregate IQM of EMaQ minus mu sampled over every (dataset, seed); the learning curves; and Q over training.
"""

import csv
import json
import os
import sys
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.sweep import interval_estimates, load_runs  # noqa: E402


@dataclass
class Args:
    sweep_dir: str
    """the sweep's folder (its runs/ below it)"""
    mu_json: tuple[str, ...] = ()
    """tools/diagnose_q.py reports of the sweep's mu runs (N = 1 at temperatures 1 and 0)"""
    bc_csv: str | None = None
    """benchmarks/bc_baseline.py's CSV"""
    reps: int = 2000
    """bootstrap resamples"""


def scalars(run_dir: str, *tags: str) -> list[dict[int, float]]:
    """The run's TensorBoard scalars `tags`, each by step, read in one pass over its events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(run_dir)
    events.Reload()
    have = events.Tags()["scalars"]
    return [{e.step: e.value for e in events.Scalars(tag)} if tag in have else {} for tag in tags]


def fmt(point, ci) -> str:
    return f"{point:.1f} [{ci[0]:.1f}, {ci[1]:.1f}]"


def main(args: Args):
    runs = [r for r in load_runs(args.sweep_dir) if r["config"]["total_updates"] > 0 and r["summary"]["history"]]
    by_cell = defaultdict(list)  # (dataset, N) -> runs, ordered by seed
    for r in sorted(runs, key=lambda r: r["config"]["seed"]):
        by_cell[(r["config"]["dataset_id"], r["config"]["num_samples"])].append(r)
    datasets, ns = sorted({d for d, _ in by_cell}), sorted({n for _, n in by_cell})
    mu = {}  # dataset -> {temperature: (score, stderr, episodes)}
    for path in args.mu_json:
        for report in json.load(open(path)):
            config = os.path.join(report["run_dir"], "config.json")  # else the sweep's folder names it
            slug = report["run_dir"].split("/runs/")[-1].split("/")[0]
            dataset = json.load(open(config))["dataset_id"] if os.path.exists(config) else slug.replace("__", "/")
            for e in report["evaluations"]:
                mu.setdefault(dataset, {})[e["temperature"]] = (e["score"], e["score_stderr"], e["episodes"])
    bc = defaultdict(list)
    for row in csv.DictReader(open(args.bc_csv)) if args.bc_csv else []:
        bc[row["dataset"]].append(float(row["score_mean"]))

    header = "| dataset | mu sampled | mu greedy | BC (mean ± std, seeds) |"
    header += "".join(f" EMaQ N = {n}: IQM [95% CI] | N = {n} minus mu sampled |" for n in ns)
    print(header + "\n|" + "---|" * (4 + 2 * len(ns)))
    gaps = {n: [] for n in ns}  # per N: a (seeds x datasets) matrix of EMaQ's last score minus mu sampled
    for d in datasets:
        sampled, greedy = mu.get(d, {}).get(1.0), mu.get(d, {}).get(0.0)
        cells = [f"{s[0]:.1f} ± {s[1]:.1f} ({s[2]} ep.)" if s else "-" for s in (sampled, greedy)]
        cells.append(f"{np.mean(bc[d]):.1f} ± {np.std(bc[d]):.1f} ({len(bc[d])})" if bc[d] else "-")
        for n in ns:
            last = np.array([[r["summary"]["last_eval"]["score"] for r in by_cell[(d, n)]]]).T  # seeds x 1
            point, ci = interval_estimates(last, args.reps)
            cells.append(f"{fmt(point['iqm'], ci['iqm'])} (n = {len(last)})")
            if sampled:
                gap, gap_ci = interval_estimates(last - sampled[0], args.reps)
                cells.append(fmt(gap["iqm"], gap_ci["iqm"]))
                gaps[n].append((last - sampled[0])[:, 0])
            else:
                cells.append("-")
        print(f"| {d} | " + " | ".join(cells) + " |")
    print()
    for n in ns:
        if gaps[n] and len({len(g) for g in gaps[n]}) == 1:
            matrix = np.stack(gaps[n], axis=1)  # seeds x datasets: stratified by dataset
            point, ci = interval_estimates(matrix, args.reps)
            print(f"- N = {n}: IQM of EMaQ minus mu sampled over {matrix.size} runs: {fmt(point['iqm'], ci['iqm'])}")
    print("\nLearning curves: normalized score, mean ± std over seeds, at every evaluation (the last one over more")
    print("episodes). Q at those updates (rounded down to a log step), means over seeds: losses/qf_values (mean Q at")
    print("the data's actions) and losses/q_ensemble_std (the members' disagreement there).\n")
    steps = sorted({h[0] for r in runs for h in r["summary"]["history"]})
    print("| dataset | N | " + " | ".join(f"{s:,}" for s in steps) + " | mean Q | ensemble std |")
    print("|" + "---|" * (4 + len(steps)))
    for (d, n), cell in sorted(by_cell.items()):
        means = []
        for step in steps:
            values = [h[2] for r in cell for h in r["summary"]["history"] if h[0] == step]
            means.append(f"{np.mean(values):.1f} ± {np.std(values):.1f}" if values else "-")
        q, std = zip(*[scalars(r["dir"], "losses/qf_values", "losses/q_ensemble_std") for r in cell], strict=True)
        at = [s - s % 1000 for s in steps if all(s - s % 1000 in x for x in q)]  # losses are logged every 1,000
        q_line = ", ".join(f"{np.mean([x[s] for x in q]):.0f}" for s in at)
        std_line = ", ".join(f"{np.mean([x[s] for x in std]):.2f}" for s in at)
        print(f"| {d} | {n} | " + " | ".join(means) + f" | {q_line} | {std_line} |")


if __name__ == "__main__":
    main(tyro.cli(Args))
