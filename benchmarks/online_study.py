"""Online EMaQ beside CleanRL's SAC on one environment: the table at a few step counts and one plot.

    python benchmarks/online_study.py --emaq-dir runs_emaq --sac-dir runs_sac/runs --out results

Reads every run's TensorBoard events below the two folders (emaq_online.py's runs; CleanRL's runs of
benchmarks/cleanrl_sac.py). Both log `charts/episodic_return`, the return of every training episode (EMaQ: its UCB
exploration policy; SAC: its stochastic policy) at the step it ended; EMaQ also logs `eval/episodic_return`, its
test-time policy (Algorithm 1) over 10 episodes every 5k steps. At each step count S the table gives, over seeds, the
mean and std of: the training episodes that ended in (S - 5k, S], averaged per seed; EMaQ's evaluation at S; and
mu's NLL on EMaQ's replay batches (`losses/behavior_nll`, last logged at or before S): whether mu keeps up.
"""

import glob
import os
import sys
import warnings
from dataclasses import dataclass

import numpy as np
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.medium_study import scalars  # noqa: E402


@dataclass
class Args:
    emaq_dir: str
    """folder holding emaq_online.py's run folders"""
    sac_dir: str
    """folder holding CleanRL's SAC run folders"""
    out: str = "benchmarks/results/online"
    """where results.md and curves.png go"""
    steps: tuple[int, ...] = (25_000, 50_000, 100_000)
    """the step counts of the table"""
    window: int = 5_000
    """training episodes that ended in the last `window` steps before a step count are averaged"""
    title: str = "Hopper-v5"
    """the plot's title (the environment)"""


def runs_below(folder: str) -> list[str]:
    return sorted({os.path.dirname(p) for p in glob.glob(f"{folder}/**/events.out.tfevents.*", recursive=True)})


def window_mean(returns: dict[int, float], step: int, window: int) -> float:
    """Mean of the values logged in (step - window, step]; nan when the run's log ends before `step`."""
    if not returns or max(returns) < step - window // 5:  # stopped before `step` (episodes: at most window / 5 steps)
        return float("nan")
    values = [r for s, r in returns.items() if step - window < s <= step]
    return float(np.mean(values)) if values else float("nan")


def mean_std(values) -> str:
    """Over the seeds that reached the step; says how many did when some did not."""
    values = np.asarray(values, dtype=float)
    reached = int(np.isfinite(values).sum())
    if reached == 0:
        return "n/a"
    text = f"{np.nanmean(values):.0f} ± {np.nanstd(values):.0f}"
    return text if reached == len(values) else f"{text} ({reached} of {len(values)} seeds)"


def main(args: Args):
    tags = ("charts/episodic_return", "eval/episodic_return", "losses/behavior_nll")
    emaq = [scalars(r, *tags) for r in runs_below(args.emaq_dir)]
    sac = [scalars(r, "charts/episodic_return")[0] for r in runs_below(args.sac_dir)]
    if not emaq or not sac:
        sys.exit(f"error: found {len(emaq)} EMaQ and {len(sac)} SAC runs: check --emaq-dir and --sac-dir")
    lines = [
        f"{len(emaq)} EMaQ and {len(sac)} SAC seeds; mean ± std over seeds; training: the episodes that ended in the "
        f"last {args.window:,} steps",
        "",
        "| env steps | SAC training | EMaQ training | EMaQ test-time policy | mu's NLL (EMaQ) |",
        "|---|---|---|---|---|",
    ]
    for step in args.steps:
        sac_train = [window_mean(r, step, args.window) for r in sac]
        emaq_train = [window_mean(train, step, args.window) for train, _, _ in emaq]
        emaq_eval = [evals.get(step, np.nan) for _, evals, _ in emaq]
        nll = [nll[max(s for s in nll if s <= step)] if any(s <= step for s in nll) else np.nan for *_, nll in emaq]
        row = f"| {step:,} | {mean_std(sac_train)} | {mean_std(emaq_train)} | {mean_std(emaq_eval)} |"
        lines.append(f"{row} {np.nanmean(nll):.1f} ± {np.nanstd(nll):.1f} |")
    os.makedirs(args.out, exist_ok=True)
    open(f"{args.out}/results.md", "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(args, emaq, sac)


def plot(args: Args, emaq, sac):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.arange(args.window, max(args.steps) + 1, args.window)
    fig, ax = plt.subplots(figsize=(7, 4))
    curves = [
        ("SAC (CleanRL), training episodes", "tab:blue", "-", sac),
        ("EMaQ, training episodes", "tab:orange", "-", [train for train, *_ in emaq]),
        ("EMaQ, test-time policy (10 episodes)", "tab:red", "--", [evals for _, evals, _ in emaq]),
    ]
    for label, color, style, per_seed in curves:
        window = args.window if "training" in label else 1  # an evaluation is logged at its step
        values = np.array([[window_mean(r, s, window) for s in grid] for r in per_seed])
        with warnings.catch_warnings(action="ignore"):  # steps that no seed has reached are nan, and left out
            mean, std = np.nanmean(values, 0), np.nanstd(values, 0)
        ax.plot(grid, mean, style, color=color, label=label)
        ax.fill_between(grid, mean - std, mean + std, color=color, alpha=0.15)
    ax.set(xlabel="environment steps", ylabel="return", title=f"{args.title}, mean ± std over {len(emaq)} seeds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(f"{args.out}/curves.png", dpi=120)


if __name__ == "__main__":
    main(tyro.cli(Args))
