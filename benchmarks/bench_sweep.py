"""What the sweep's engine costs: a sweep of 8 short runs on a local Ray against the runs' own times.

    python benchmarks/bench_sweep.py                 # 8 runs on all cores, about 3 minutes on 2 cores
    python benchmarks/bench_sweep.py --updates 8000  # longer runs

It pretrains one mu (outside the timing), then times `benchmarks/sweep.py` over 8 EMaQ runs (N in {1, 2, 4, 8} x 2
seeds) of a small random Hopper dataset, and prints: the wall time of the whole command and of its run phase, the sum
of the runs' own times (each run's process, start to exit) divided by the cores, and Ray's overhead per run (the run
phase's wall time beyond that ideal, per run and core, plus the time from the command's start to the first run).
Datasets go to a temporary Minari folder unless MINARI_DATASETS_PATH is set.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import tyro

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sweep import cpu_model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Args:
    dataset_id: str = "emaq/Hopper-v5/random_2000-v0"
    """the dataset of every run (generated on first use)"""
    updates: int = 4000
    """EMaQ updates per run"""
    cores: int = 0
    """CPUs of the local Ray, one per run (0: all of this machine's)"""
    keep: bool = False
    """keep the sweep's folder (printed) instead of deleting it"""


if __name__ == "__main__":
    args = tyro.cli(Args)
    cores = args.cores or os.cpu_count()
    work = tempfile.mkdtemp(prefix="bench_sweep_")
    os.environ.setdefault("MINARI_DATASETS_PATH", os.path.join(work, "minari"))
    flags = [
        "--preset",
        "table3",
        "--num-qs",
        "2",
        "--q-hidden",
        "64",
        "--q-layers",
        "2",
        "--batch-size",
        "64",
        "--total-updates",
        str(args.updates),
        "--eval-every",
        str(args.updates // 2),
        "--eval-episodes",
        "2",
        "--log-every",
        "100",
        "--checkpoint-every",
        "1000",
    ]
    print(f"CPU: {cpu_model()}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(
        f"sweep: 8 runs of {args.dataset_id}, {args.updates} updates each, on a local Ray with {cores} CPUs (1 per run)"
    )

    # mu, pretrained outside the timing, where the sweep expects it: the sweep then runs the 8 EMaQ runs only
    sweep_dir = os.path.join(work, "sweep")
    mu_cell = os.path.join(sweep_dir, "runs", args.dataset_id.replace("/", "__"), "mu")
    subprocess.run(
        [
            sys.executable,
            "emaq_offline.py",
            "--dataset-id",
            args.dataset_id,
            "--seed",
            "1",
            "--runs-dir",
            mu_cell,
            *flags,
            "--behavior-updates",
            "500",
            "--total-updates",
            "0",
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )

    start = time.time()
    sweep = subprocess.run(
        [
            sys.executable,
            "benchmarks/sweep.py",
            "--sweep-dir",
            sweep_dir,
            "--datasets",
            args.dataset_id,
            "--ns",
            "1",
            "2",
            "4",
            "8",
            "--seeds",
            "1",
            "2",
            "--num-cpus",
            str(cores),
            "--bootstrap-reps",
            "200",
            "--",
            *flags,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    wall = time.time() - start
    if sweep.returncode != 0:
        sys.exit(f"the sweep failed:\n{sweep.stdout}\n{sweep.stderr[-3000:]}")
    with open(os.path.join(sweep_dir, "sweep_runs.jsonl")) as f:
        runs = [json.loads(line) for line in f]
    assert len(runs) == 8 and all(r["status"] == "finished" for r in runs), runs
    own = [r["child_seconds"] for r in runs]
    phase = max(r["ended"] for r in runs) - min(r["submitted"] for r in runs)
    ideal = sum(own) / cores
    first_start = min(r["started"] for r in runs) - start
    in_task = sum((r["ended"] - r["started"]) - r["child_seconds"] for r in runs) / len(runs)
    per_run = (phase - ideal) * cores / len(runs)

    print(f"runs' own times: {min(own):.1f} to {max(own):.1f} s, sum {sum(own):.1f} s; / {cores} cores = {ideal:.1f} s")
    print(
        f"wall time: {wall:.1f} s for the command (Python, Ray start, 8 runs, results), {phase:.1f} s from the first "
        f"submission to the last run's end ({phase / ideal:.3f} x the ideal)"
    )
    print(
        f"Ray's overhead: {first_start:.1f} s from the command's start to the first run (imports, Ray start); in the "
        f"run phase {per_run:.2f} s per run and core beyond the runs' own times ({100 * per_run / 60:.1f}% of a "
        f"one-minute run), "
        f"of which {1000 * in_task:.1f} ms inside the task around the run's process"
    )
    if args.keep:
        print(f"kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
