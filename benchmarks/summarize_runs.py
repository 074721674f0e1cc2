"""Tabulate finished runs: mean ± std over seeds of mu's return and EMaQ's last and best evaluation.

    python benchmarks/summarize_runs.py runs/                 # every run directory below runs/
    python benchmarks/summarize_runs.py runs/ --curve         # also the mean evaluation return at every step

Reads summary.json (emaq_offline.py: mu and history; emaq_online.py: history), groups runs by dataset/env and
experiment name, and prints one row per group. "last" is the final evaluation, "best" the best one.
"""

import glob
import json
import os
import sys
from collections import defaultdict

import numpy as np


def main(root: str, curve: bool):
    groups = defaultdict(list)
    for path in sorted(glob.glob(os.path.join(root, "**", "summary.json"), recursive=True)):
        summary = json.load(open(path))
        name = os.path.basename(os.path.dirname(path)).split("__")
        key = (summary.get("dataset_id") or summary.get("env_id"), name[-3] if len(name) >= 3 else "")
        groups[key].append(summary)
    for (source, exp), runs in groups.items():
        last = np.array([r["history"][-1][1] for r in runs])
        best = np.array([max(h[1] for h in r["history"]) for r in runs])
        row = f"{source} [{exp}] seeds={len(runs)}"
        if runs[0].get("mu_return") is not None:
            mu = np.array([r["mu_return"] for r in runs])
            row += f" | mu {mu.mean():.1f} ± {mu.std():.1f}"
        row += f" | last {last.mean():.1f} ± {last.std():.1f} | best {best.mean():.1f} ± {best.std():.1f}"
        print(row)
        if curve:
            steps = [h[0] for h in runs[0]["history"]]
            values = np.array([[h[1] for h in r["history"]] for r in runs if len(r["history"]) == len(steps)])
            for step, mean, std in zip(steps, values.mean(0), values.std(0), strict=False):
                print(f"    {step:>8}  {mean:8.1f} ± {std:.1f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("--") else "runs", "--curve" in sys.argv)
