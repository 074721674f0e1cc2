"""Tabulate finished runs: mean ± std over seeds of mu's return and EMaQ's last and best evaluation.

    python benchmarks/summarize_runs.py runs/                 # every run directory below runs/
    python benchmarks/summarize_runs.py runs/ --curve         # also the mean evaluation return at every step
    python benchmarks/summarize_runs.py runs/ --curve --q     # and the mean Q value (losses/qf_values) there

Reads summary.json (emaq_offline.py: mu and history; emaq_online.py: history), groups runs by dataset/env and
experiment name, and prints one row per group. "last" is the final evaluation, "best" the best one.
"""

import glob
import json
import os
import sys
from collections import defaultdict

import numpy as np


def q_values(run_dir: str) -> dict[int, float]:
    """losses/qf_values (mean Q at dataset actions) by update, from the run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(run_dir)
    events.Reload()
    if "losses/qf_values" not in events.Tags()["scalars"]:
        return {}
    return {e.step: e.value for e in events.Scalars("losses/qf_values")}


def main(root: str, curve: bool, q: bool):
    groups = defaultdict(list)
    for path in sorted(glob.glob(os.path.join(root, "**", "summary.json"), recursive=True)):
        summary = json.load(open(path))
        if not summary["history"]:  # a run that only pretrained mu
            continue
        name = os.path.basename(os.path.dirname(path)).split("__")
        key = (summary.get("dataset_id") or summary.get("env_id"), name[-3] if len(name) >= 3 else "")
        groups[key].append({**summary, "run_dir": os.path.dirname(path)})
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
            complete = [r for r in runs if len(r["history"]) == len(steps)]
            values = np.array([[h[1] for h in r["history"]] for r in complete])
            scores = np.array([[h[2] if h[2] is not None else np.nan for h in r["history"]] for r in complete])
            qs = [q_values(r["run_dir"]) for r in complete] if q else []
            for i, step in enumerate(steps):
                line = f"    {step:>8}  return {values[:, i].mean():8.1f} ± {values[:, i].std():.1f}"
                per_seed = ", ".join(f"{v:.1f}" for v in scores[:, i])
                line += f"  score {scores[:, i].mean():6.1f} ± {scores[:, i].std():.1f}  ({per_seed})"
                if qs and all(step in run_q for run_q in qs):
                    q_at = np.array([run_q[step] for run_q in qs])
                    line += f"  mean Q {q_at.mean():.1f} ± {q_at.std():.1f}"
                print(line)


if __name__ == "__main__":
    root = sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("--") else "runs"
    main(root, "--curve" in sys.argv, "--q" in sys.argv)
