"""Online EMaQ beside CleanRL's SAC under one protocol: a CSV per run, then a table and a plot per environment.

    # 1. each finished run's data, from its TensorBoard events, into OUT/<algo>_seed<k>.csv (once per run)
    python benchmarks/online_study.py export --env-id Hopper-v5 --emaq-dir runs/online/emaq \\
        --sac-dir runs/online/sac/runs --out benchmarks/results/online_hopper
    # 2. every table and plot, from the CSV files alone
    python benchmarks/online_study.py tables

The protocol, the same for both algorithms: every 5k environment steps, the evaluation policy over 10 episodes reset
with seeds 0-9 (EMaQ: its test-time policy, Algorithm 1; SAC: its deterministic policy, the tanh of its mean, read by
benchmarks/cleanrl_sac.py without changing how SAC learns), and after the last step a final evaluation over 50
episodes (seeds 0-49). The training episodes' returns (EMaQ: its UCB exploration; SAC: its stochastic policy) are the
second view. A run's CSV has one row per logged step: step, training_return (an episode that ended there),
evaluation_return, final_evaluation_return (the last row only), behavior_nll (EMaQ's mu), mean_q (EMaQ: the ensemble's
mean Q on its replay batches; SAC: its first Q network's).
"""

import csv
import glob
import json
import os
import sys
import warnings
from dataclasses import dataclass

import numpy as np
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.medium_study import scalars  # noqa: E402
from benchmarks.sweep import interval_estimates  # noqa: E402

COLUMNS = ("step", "training_return", "evaluation_return", "final_evaluation_return", "behavior_nll", "mean_q")
TAGS = dict(  # the TensorBoard tag of each column, per algorithm
    emaq=("charts/episodic_return", "eval/episodic_return", "losses/behavior_nll", "losses/qf_values"),
    sac=("charts/episodic_return", "eval/episodic_return", None, "losses/qf1_values"),
)
# D4RL's random and expert returns: the aggregate over environments is on this normalized scale (x 100)
D4RL_REFERENCE = {"Hopper-v5": (-20.272305, 3234.3), "HalfCheetah-v5": (-280.178953, 12135.0)}
D4RL_REFERENCE["Walker2d-v5"] = (1.629008, 4592.3)
NAMES = dict(sac="SAC", emaq="EMaQ")


@dataclass
class Export:
    """Write a CSV per finished run (EMaQ's final 50-episode evaluation is run here, from its last checkpoint); runs
    still going are named and skipped, so a study exports its finished seeds while others run."""

    env_id: str
    """the environment of the runs"""
    emaq_dir: str
    """folder holding emaq_online.py's run folders"""
    sac_dir: str
    """folder holding benchmarks/cleanrl_sac.py's run folders (its OUT/runs)"""
    out: str
    """the folder of this environment's CSV files (benchmarks/results/online_<env>)"""
    final_eval_episodes: int = 50
    """episodes of EMaQ's final evaluation (SAC's ran at the end of its run)"""


@dataclass
class Tables:
    """Every environment's table and plot, and the summary over environments, from the CSV files alone."""

    results: str = "benchmarks/results"
    """the folder holding online_<env>/ folders of CSV files"""
    steps: tuple[int, ...] = (25_000, 50_000, 100_000)
    """the step counts of each table"""
    window: int = 5_000
    """training episodes that ended in the last `window` steps before a step count are averaged"""
    reps: int = 2000
    """bootstrap resamples of rliable's intervals"""


def runs_below(folder: str) -> list[str]:
    return sorted({os.path.dirname(p) for p in glob.glob(f"{folder}/**/events.out.tfevents.*", recursive=True)})


def export(args: Export):
    if not runs_below(args.emaq_dir) and not runs_below(args.sac_dir):
        sys.exit(f"error: no TensorBoard runs below {args.emaq_dir} or {args.sac_dir}: pass the runs' folders")
    os.makedirs(args.out, exist_ok=True)
    written = 0
    for algo, folder in (("emaq", args.emaq_dir), ("sac", args.sac_dir)):
        for run_dir in runs_below(folder):
            env_id, _, seed, _ = os.path.basename(run_dir).split("__")  # <env>__<exp name>__<seed>__<time>
            if env_id != args.env_id:
                continue
            end_file = "summary.json" if algo == "emaq" else "final_evaluation.json"  # written when a run ends
            if not os.path.exists(os.path.join(run_dir, end_file)):
                print(f"note: {run_dir} has not finished (no {end_file}): skipped, export again once it has")
                continue
            columns = [scalars(run_dir, tag)[0] if tag else {} for tag in TAGS[algo]]
            last_step = max(columns[1], default=0)
            final = final_evaluation(algo, run_dir, args.final_eval_episodes)
            rows = {step: {} for values in columns for step in values} | {last_step: {}}
            for name, values in zip(COLUMNS[1:3] + COLUMNS[4:], columns, strict=True):
                for step, value in values.items():
                    rows[step][name] = value
            rows[last_step]["final_evaluation_return"] = final
            path = f"{args.out}/{algo}_seed{seed}.csv"
            with open(path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=COLUMNS)
                writer.writeheader()
                writer.writerows({"step": step, **rows[step]} for step in sorted(rows))
            print(f"{path}: {len(rows)} rows, last evaluation at step {last_step}, final evaluation {final:.1f}")
            written += 1
    if not written:
        sys.exit(f"error: no finished {args.env_id} run below {args.emaq_dir} or {args.sac_dir}: nothing exported")


def final_evaluation(algo: str, run_dir: str, episodes: int) -> float:
    """SAC: the mean of final_evaluation.json (written by cleanrl_sac.py); EMaQ: its test-time policy at the run's N."""
    if algo == "sac":
        with open(os.path.join(run_dir, "final_evaluation.json")) as f:
            return float(np.mean(json.load(f)["returns"]))
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import evaluate_online_run

    with open(os.path.join(run_dir, "config.json")) as f:
        n = json.load(f)["num_samples"]
    return evaluate_online_run.main(evaluate_online_run.Args(run_dir, ns=(n,), episodes=episodes))[n]


def read_run(path: str) -> dict[str, dict[int, float]]:
    """A run's CSV: each column as {step: value}, the empty cells left out."""
    columns = {name: {} for name in COLUMNS[1:]}
    with open(path) as f:
        for row in csv.DictReader(f):
            for name in columns:
                if row[name] != "":
                    columns[name][int(row["step"])] = float(row[name])
    return columns


def window_mean(values: dict[int, float], step: int, window: int) -> float:
    """Mean of the values logged in (step - window, step]; nan when the run's log ends before `step`."""
    if not values or max(values) < step - window // 5:  # stopped before `step` (episodes: at most window / 5 steps)
        return float("nan")
    inside = [v for s, v in values.items() if step - window < s <= step]
    return float(np.mean(inside)) if inside else float("nan")


def mean_std(values) -> str:
    """Over the seeds that reached the step; says how many did when some did not."""
    values = np.asarray(values, dtype=float)
    reached = int(np.isfinite(values).sum())
    if reached == 0:
        return "n/a"
    text = f"{np.nanmean(values):.0f} ± {np.nanstd(values):.0f}"
    return text if reached == len(values) else f"{text} ({reached} of {len(values)} seeds)"


def iqm_ci(scores, reps: int) -> tuple[float, float, float]:
    """rliable's IQM over seeds and its 95% stratified bootstrap CI (one task); nan when no seed has the score."""
    scores = np.asarray([s for s in scores if np.isfinite(s)], dtype=float)
    if len(scores) == 0:
        return float("nan"), float("nan"), float("nan")
    point, ci = interval_estimates(scores.reshape(-1, 1), reps)
    return float(point["iqm"]), float(ci["iqm"][0]), float(ci["iqm"][1])


def fmt(point_ci, decimals: int = 0) -> str:
    point, low, high = point_ci
    return "n/a" if not np.isfinite(point) else f"{point:.{decimals}f} [{low:.{decimals}f}, {high:.{decimals}f}]"


def environment_table(env_id: str, runs: dict, args: Tables) -> list[str]:
    """One environment's markdown: the curves at args.steps, then the final and last evaluations' IQM per algorithm."""
    emaq, sac = runs["emaq"], runs["sac"]
    seeds = ", ".join(f"{NAMES[algo]} {len(r)}" for algo, r in runs.items())
    lines = [
        f"## {env_id}: seeds {seeds}",
        "",
        "Mean ± std over seeds. Evaluation: the evaluation policy over 10 episodes (seeds 0-9) at the step; training:",
        f"the episodes that ended in the last {args.window:,} steps.",
        "",
        "| env steps | SAC evaluation | EMaQ evaluation | SAC training | EMaQ training | mu's NLL (EMaQ) |",
        "|---|---|---|---|---|---|",
    ]
    for step in args.steps:
        cells = [[r["evaluation_return"].get(step, np.nan) for r in runs_] for runs_ in (sac, emaq)]
        cells += [[window_mean(r["training_return"], step, args.window) for r in runs_] for runs_ in (sac, emaq)]
        nll = [at_or_before(r["behavior_nll"], step) for r in emaq]
        nll_text = f"{np.nanmean(nll):.1f} ± {np.nanstd(nll):.1f}" if np.isfinite(nll).any() else "n/a"
        lines.append(f"| {step:,} | " + " | ".join(mean_std(c) for c in cells) + f" | {nll_text} |")
    lines += [
        "",
        "IQM over seeds [95% stratified bootstrap CI] (rliable), at the last step:",
        "",
        "| | SAC | EMaQ |",
        "|---|---|---|",
    ]
    for name, label in (("final_evaluation_return", "final evaluation, 50 episodes"), ("evaluation_return", "")):
        label = label or "last evaluation, 10 episodes"
        per_algo = [iqm_ci([last(r[name]) for r in runs_], args.reps) for runs_ in (sac, emaq)]
        lines.append(f"| {label} | {fmt(per_algo[0])} | {fmt(per_algo[1])} |")
    return lines


def last(values: dict[int, float]) -> float:
    return values[max(values)] if values else float("nan")


def at_or_before(values: dict[int, float], step: int) -> float:
    """The value last logged at or before `step` (nan if none)."""
    steps = [s for s in values if s <= step]
    return values[max(steps)] if steps else float("nan")


def plot(env_id: str, runs: dict, out: str, args: Tables):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.arange(args.window, max(args.steps) + 1, args.window)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, column, title in (
        (axes[0], "evaluation_return", "evaluation policy, 10 episodes"),
        (axes[1], "training_return", "training episodes"),
    ):
        for algo, color, label in (("sac", "tab:blue", "SAC (CleanRL)"), ("emaq", "tab:red", "EMaQ")):
            if not runs[algo]:
                continue
            window = args.window if column == "training_return" else 1  # an evaluation is logged at its step
            values = np.array([[window_mean(r[column], s, window) for s in grid] for r in runs[algo]])
            with warnings.catch_warnings(action="ignore"):  # steps that no seed has reached are nan, and left out
                mean, std = np.nanmean(values, 0), np.nanstd(values, 0)
            seeds = f"{len(runs[algo])} seed" + ("s" if len(runs[algo]) > 1 else "")
            ax.plot(grid, mean, color=color, label=f"{label}, {seeds}")
            ax.fill_between(grid, mean - std, mean + std, color=color, alpha=0.15)
        ax.set(xlabel="environment steps", title=f"{env_id}: {title}")
    axes[0].set_ylabel("return (mean ± std over seeds)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(f"{out}/curves.png", dpi=110)
    plt.close(fig)


def tables(args: Tables):
    folders = sorted(glob.glob(f"{args.results}/online_*/"))
    summary = ["# Online EMaQ beside SAC: the final evaluation (50 episodes) at the last step", ""]
    summary += ["| environment | SAC | EMaQ | seeds (SAC, EMaQ) |", "|---|---|---|---|"]
    normalized = {"sac": [], "emaq": []}
    for folder in folders:
        runs = {
            algo: [read_run(p) for p in sorted(glob.glob(f"{folder}/{algo}_seed*.csv"))] for algo in ("sac", "emaq")
        }
        if not runs["sac"] and not runs["emaq"]:
            continue
        env_id = environment_of(folder)
        lines = environment_table(env_id, runs, args)
        with open(f"{folder}/results.md", "w") as f:
            f.write("\n".join(lines) + "\n")
        print("\n".join(lines) + "\n")
        plot(env_id, runs, folder, args)
        finals = {algo: [last(r["final_evaluation_return"]) for r in runs[algo]] for algo in runs}
        cells = " | ".join(fmt(iqm_ci(finals[algo], args.reps)) for algo in ("sac", "emaq"))
        summary.append(f"| {env_id} | {cells} | {len(runs['sac'])}, {len(runs['emaq'])} |")
        low, high = D4RL_REFERENCE[env_id]
        for algo in normalized:
            normalized[algo].append([100 * (s - low) / (high - low) for s in finals[algo]])
    summary += ["", "Per environment: IQM of the raw returns over seeds [95% stratified bootstrap CI] (rliable)."]
    seeds = {len(s) for scores in normalized.values() for s in scores}
    if len(folders) > 1 and len(seeds) == 1 and seeds != {0}:  # rliable's runs x tasks matrix needs equal seeds
        matrix = {algo: np.array(scores).T for algo, scores in normalized.items()}
        cells = [interval_estimates(matrix[algo], args.reps) for algo in ("sac", "emaq")]
        text = [fmt((p["iqm"], *c["iqm"]), 1) for p, c in cells]
        summary += ["", "| over the environments (D4RL-normalized) | SAC | EMaQ |", "|---|---|---|"]
        summary += [f"| IQM [95% stratified bootstrap CI] | {text[0]} | {text[1]} |"]
    else:
        summary += ["", "No aggregate over environments: it needs the same number of seeds of both everywhere."]
    with open(f"{args.results}/online_summary.md", "w") as f:
        f.write("\n".join(summary) + "\n")
    print("\n".join(summary))


def environment_of(folder: str) -> str:
    """online_hopper/ -> Hopper-v5 (the environments of D4RL_REFERENCE)."""
    name = os.path.basename(os.path.normpath(folder)).removeprefix("online_")
    matches = [env for env in D4RL_REFERENCE if env.split("-")[0].lower() == name]
    if not matches:
        sys.exit(f"error: {folder}: no environment named {name!r} (online_<hopper|halfcheetah|walker2d>)")
    return matches[0]


if __name__ == "__main__":
    command = tyro.extras.subcommand_cli_from_dict(dict(export=Export, tables=Tables))
    if isinstance(command, Export):
        export(command)
    else:
        tables(command)
