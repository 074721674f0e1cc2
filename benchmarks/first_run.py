"""The README's first run, `emaq_offline.py --preset cpu` on the default dataset: a CSV per run, then the table.

    for seed in 1 2 3; do python emaq_offline.py --preset cpu --seed $seed --runs-dir runs/first_run; done
    python benchmarks/first_run.py export runs/first_run --out benchmarks/results/first_run   # a CSV per run
    python benchmarks/first_run.py table benchmarks/results/first_run                        # the table, from the CSVs

A run's CSV (seed<k>.csv) has a row per evaluation: policy (mu_sampled and mu_greedy, mu's two baselines before EMaQ
trains; emaq, the test-time policy of Algorithm 1), updates, episodes, return_mean, return_stderr (over episodes) and
normalized_score (the dataset's reference scores).
"""

import csv
import glob
import json
import os
import sys
from dataclasses import dataclass

import numpy as np
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.sweep import interval_estimates  # noqa: E402

COLUMNS = ("policy", "updates", "episodes", "return_mean", "return_stderr", "normalized_score")


@dataclass
class Export:
    """Write seed<k>.csv for every finished run below runs_dir."""

    runs_dir: tyro.conf.Positional[str]
    """the folder of the runs (their --runs-dir)"""
    out: str = "benchmarks/results/first_run"
    """where the CSV files go"""


@dataclass
class Table:
    """Print the table (and write results.md beside the CSV files) from the CSV files alone."""

    folder: tyro.conf.Positional[str] = "benchmarks/results/first_run"
    """the folder of the CSV files"""
    reps: int = 2000
    """bootstrap resamples of rliable's interval"""


def export(args: Export):
    os.makedirs(args.out, exist_ok=True)
    for path in sorted(glob.glob(f"{args.runs_dir}/*/summary.json")):
        run_dir = os.path.dirname(path)
        summary, config = (json.load(open(os.path.join(run_dir, name))) for name in ("summary.json", "config.json"))
        rows = []
        for policy, key in (("mu_sampled", "mu"), ("mu_greedy", "mu_greedy")):  # over --final-eval-episodes
            rows.append((policy, 0, config["final_eval_episodes"], summary[f"{key}_return"]))
            rows[-1] += (summary[f"{key}_return_stderr"], summary[f"{key}_score"])
        for i, (updates, mean, score) in enumerate(summary["history"]):
            last = i == len(summary["history"]) - 1  # the last evaluation: summary's last_eval, in full
            episodes = summary["last_eval"]["episodes"] if last else config["eval_episodes"]
            stderr = summary["last_eval"]["return_stderr"] if last else ""
            rows.append(("emaq", updates, episodes, mean, stderr, score))
        out = f"{args.out}/seed{config['seed']}.csv"
        with open(out, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(COLUMNS)
            writer.writerows(rows)
        print(f"{out}: {len(rows)} evaluations of {run_dir}")


def table(args: Table) -> list[str]:
    runs = {}
    for path in sorted(glob.glob(f"{args.folder}/seed*.csv")):
        with open(path) as f:
            runs[os.path.basename(path)[4:-4]] = list(csv.DictReader(f))
    if not runs:
        sys.exit(f"error: no seed<k>.csv in {args.folder}: run `benchmarks/first_run.py export` first")
    columns = [("mu_sampled", 0), ("mu_greedy", 0)]
    columns += [("emaq", int(row["updates"])) for row in next(iter(runs.values())) if row["policy"] == "emaq"]
    cells = {column: [] for column in columns}
    for rows in runs.values():
        for row in rows:
            if (row["policy"], int(row["updates"])) in cells:
                cells[row["policy"], int(row["updates"])].append(float(row["normalized_score"]))
    names = {"mu_sampled": "mu sampled", "mu_greedy": "mu greedy"}
    episodes = {(r["policy"], int(r["updates"])): r["episodes"] for r in next(iter(runs.values()))}
    header = [f"{names.get(p, 'EMaQ')} {'' if p != 'emaq' else f'at {u:,}'}".strip() for p, u in columns]
    lines = [
        f"Normalized score, mean ± std over seeds {', '.join(runs)} (episodes per evaluation in parentheses)",
        "",
        "| " + " | ".join(f"{h} ({episodes[c]})" for h, c in zip(header, columns, strict=True)) + " |",
        "|" + "---|" * len(columns),
        "| " + " | ".join(f"{np.mean(v):.1f} ± {np.std(v):.1f}" for v in cells.values()) + " |",
    ]
    last = np.array(cells[columns[-1]])
    point, ci = interval_estimates(last.reshape(-1, 1), args.reps)
    lines += ["", f"EMaQ's last evaluation: IQM {point['iqm']:.1f} [95% CI {ci['iqm'][0]:.1f}, {ci['iqm'][1]:.1f}]"]
    lines[-1] += f" over {len(last)} seeds (rliable, stratified bootstrap)"
    with open(f"{args.folder}/results.md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    command = tyro.extras.subcommand_cli_from_dict(dict(export=Export, table=Table))
    if isinstance(command, Export):
        export(command)
    else:
        table(command)
