"""The sweep (benchmarks/sweep.py, issue 12): a tiny real sweep on a local Ray, killed, relaunched and summarized.

One module fixture runs the sweep's whole life once (about a minute on 2 cores): a first launch over 2 generated
datasets x N in {1, 4} x 2 seeds plus a dataset whose mu must fail, with one run SIGKILLed mid-training; a relaunch
that resumes it; a third launch that must run nothing. The tests then read what it left behind.
"""

import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import ROOT

SWEEP = os.path.join(ROOT, "benchmarks", "sweep.py")
GOOD = ["emaq/Hopper-v5/random_2000-v0", "emaq/Walker2d-v5/random_2000-v0"]
BAD = "emaq/NoSuchEnv-v0/random_2000-v0"  # its mu run fails (gymnasium has no such env), so its runs cannot start
TOTAL = 200
FLAGS = [
    "--preset",
    "table3",
    "--num-qs",
    "2",
    "--q-hidden",
    "32",
    "--q-layers",
    "2",
    "--batch-size",
    "32",
    "--behavior-updates",
    "50",
    "--total-updates",
    str(TOTAL),
    "--eval-every",
    "100",
    "--eval-episodes",
    "2",
    "--log-every",
    "10",
    "--checkpoint-every",
    "10",
    "--delta-ns",
]
KILLED = ("emaq__Walker2d-v5__random_2000-v0", "N4_seed2")


def load_sweep_module():
    spec = importlib.util.spec_from_file_location("sweep", SWEEP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sweep_command(sweep_dir, datasets):
    return [
        sys.executable,
        SWEEP,
        "--sweep-dir",
        sweep_dir,
        "--datasets",
        *datasets,
        "--ns",
        "1",
        "4",
        "--seeds",
        "1",
        "2",
        "--num-cpus",
        "2",
        "--bootstrap-reps",
        "500",
        "--",
        *FLAGS,
    ]


def launch(sweep_dir, datasets, timeout=400):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        sweep_command(sweep_dir, datasets), cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env
    )


def run_folders(cell_dir):
    return sorted(
        os.path.join(cell_dir, d)
        for d in os.listdir(cell_dir)
        if os.path.isfile(os.path.join(cell_dir, d, "config.json"))
    )


def emaq_pids(cell_dir):
    """Processes of emaq_offline.py whose --runs-dir is this cell."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"emaq_offline.py") for a in argv) and cell_dir.encode() in argv:
            pids.append(int(pid))
    return pids


def files_state(root):
    """(path, size, mtime) of every file under root."""
    return sorted(
        (os.path.join(d, f), os.path.getsize(os.path.join(d, f)), os.path.getmtime(os.path.join(d, f)))
        for d, _, files in os.walk(root)
        for f in files
    )


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Launch 1 (one run SIGKILLed mid-training, one dataset whose mu fails), launch 2 (resumes), launch 3 (nothing)."""
    sweep_dir = str(tmp_path_factory.mktemp("sweep"))
    killed_cell = os.path.join(sweep_dir, "runs", *KILLED)
    out = open(tmp_path_factory.mktemp("launch1") / "output.txt", "w+")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    first = subprocess.Popen(
        sweep_command(sweep_dir, GOOD + [BAD]), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True, env=env
    )
    killed_at, deadline = None, time.time() + 300
    while killed_at is None and time.time() < deadline and first.poll() is None:
        for folder in run_folders(killed_cell) if os.path.isdir(killed_cell) else []:
            assert not os.path.exists(os.path.join(folder, "summary.json")), (
                "the run finished before the test could kill it"
            )
            try:
                with open(os.path.join(folder, "checkpoint.json")) as f:
                    meta = json.load(f)
            except (OSError, ValueError):
                continue
            if meta["phase"] == "emaq" and meta["step"] >= 10:
                for pid in emaq_pids(killed_cell):
                    os.kill(pid, signal.SIGKILL)
                    killed_at = meta["step"]
        time.sleep(0.02)
    first.wait(timeout=300)
    out.seek(0)
    first_output = out.read()
    assert killed_at is not None, "never saw the run to kill:\n" + first_output
    killed_checkpoint = json.load(open(os.path.join(run_folders(killed_cell)[0], "checkpoint.json")))
    mu_files = {d: files_state(os.path.join(sweep_dir, "runs", d.replace("/", "__"), "mu")) for d in GOOD}
    second = launch(sweep_dir, GOOD)
    before_third = files_state(os.path.join(sweep_dir, "runs"))
    third = launch(sweep_dir, GOOD)
    return dict(
        dir=sweep_dir,
        first_rc=first.returncode,
        first=first_output,
        killed_cell=killed_cell,
        killed_checkpoint=killed_checkpoint,
        mu_files=mu_files,
        second=second,
        third=third,
        before_third=before_third,
        after_third=files_state(os.path.join(sweep_dir, "runs")),
    )


def test_first_launch_reports_failures_and_finishes_the_others(sweep):
    out = sweep["first"]
    assert sweep["first_rc"] == 1, out
    # the failed mu: reported with its log's last lines; its dataset's runs are not started; the others go on
    assert f"FAILED  {BAD} mu: exit code 2" in out and "error: cannot generate" in out, out
    assert out.count(f"NOT RUN {BAD} N=") == 4, out
    # the killed run: reported with the signal that ended it
    assert "FAILED  emaq/Walker2d-v5/random_2000-v0 N=4 seed=2: exit code -9" in out, out
    for dataset in GOOD:
        assert f"done    {dataset} mu: mu score" in out
        for n in (1, 4):
            for seed in (1, 2):
                if (dataset, n, seed) != (GOOD[1], 4, 2):
                    assert f"done    {dataset} N={n} seed={seed}: last score" in out, out
    assert "sweep done: 9 of 15 runs finished, 6 failed or not run" in out
    checkpoint = sweep["killed_checkpoint"]
    assert checkpoint["phase"] == "emaq" and 10 <= checkpoint["step"] < TOTAL  # it was killed mid-training


def test_mu_is_pretrained_once_per_dataset_and_loaded_by_every_run(sweep):
    for dataset in GOOD:
        root = os.path.join(sweep["dir"], "runs", dataset.replace("/", "__"))
        (mu_run,) = run_folders(os.path.join(root, "mu"))
        with open(os.path.join(mu_run, "config.json")) as f:
            config = json.load(f)
        assert config["total_updates"] == 0 and config["behavior_updates"] == 50 and config["behavior_path"] is None
        cells = [c for c in os.listdir(root) if c != "mu"]
        assert sorted(cells) == ["N1_seed1", "N1_seed2", "N4_seed1", "N4_seed2"]
        for cell in cells:
            (run,) = run_folders(os.path.join(root, cell))
            with open(os.path.join(run, "config.json")) as f:
                config = json.load(f)
            assert config["behavior_updates"] == 0 and config["behavior_path"] == os.path.join(mu_run, "mu.pt")
            assert os.path.isfile(os.path.join(run, "summary.json"))  # every run finished
        # the relaunches did not touch the mu run (no second pretraining)
        assert files_state(os.path.join(root, "mu")) == sweep["mu_files"][dataset]


def test_relaunch_resumes_the_killed_run_to_the_weights_it_would_have_had(sweep, tmp_path):
    second = sweep["second"]
    assert second.returncode == 0, second.stdout + second.stderr
    assert "9 finished, 1 to resume, 0 to start" in second.stdout
    assert (
        "done    emaq/Walker2d-v5/random_2000-v0 N=4 seed=2: last score" in second.stdout
        and "(resumed)" in second.stdout
    )
    (run,) = run_folders(sweep["killed_cell"])
    with open(os.path.join(sweep["killed_cell"], "log.txt")) as f:
        commands = [line[2:] for line in f.read().split("\n") if line.startswith("$ ")]
    assert len(commands) == 2 and commands[1].endswith(f"--resume {run}")
    # the same run, never interrupted: the sweep's own command line, another --runs-dir, the same thread count
    argv = shlex.split(commands[0])
    argv[argv.index("--runs-dir") + 1] = str(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    reference = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert reference.returncode == 0, reference.stderr[-2000:]
    (reference_run,) = run_folders(str(tmp_path))
    resumed = torch.load(os.path.join(run, "checkpoint.pt"), weights_only=True)
    uninterrupted = torch.load(os.path.join(reference_run, "checkpoint.pt"), weights_only=True)
    assert resumed["phase"] == uninterrupted["phase"] == "done"
    for part in ("q_ensemble", "q_target"):
        assert resumed[part].keys() == uninterrupted[part].keys()
        for name, tensor in uninterrupted[part].items():
            assert torch.equal(resumed[part][name], tensor), (part, name)
    with open(os.path.join(run, "summary.json")) as f, open(os.path.join(reference_run, "summary.json")) as g:
        assert json.load(f)["history"] == json.load(g)["history"]


def test_third_launch_runs_nothing(sweep):
    third = sweep["third"]
    assert third.returncode == 0, third.stdout + third.stderr
    assert "10 finished, 0 to resume, 0 to start" in third.stdout
    assert "Ray:" not in third.stdout and "done " not in third.stdout  # no Ray, no run
    assert sweep["after_third"] == sweep["before_third"]  # not a file of any run was touched


def trimmed_mean_by_hand(values):
    """The interquartile mean as rliable defines it (scipy's trim_mean): drop floor(n/4) values from each end."""
    values, cut = sorted(values), len(values) // 4
    kept = values[cut : len(values) - cut]
    return sum(kept) / len(kept)


def mean(values):
    return sum(values) / len(values)


def std(values):
    """Over seeds, with ddof 0 (numpy's default), as results.md says."""
    return (sum((x - mean(values)) ** 2 for x in values) / len(values)) ** 0.5


def test_results_csv_equals_the_numbers_from_the_summaries(sweep):
    import csv

    with open(os.path.join(sweep["dir"], "results.csv")) as f:
        rows = list(csv.DictReader(f))
    by_hand, mu_score = {}, {}
    for folder, _, files in os.walk(os.path.join(sweep["dir"], "runs")):
        if "summary.json" in files:
            config = json.load(open(os.path.join(folder, "config.json")))
            summary = json.load(open(os.path.join(folder, "summary.json")))
            if config["total_updates"] == 0:
                mu_score[summary["dataset_id"]] = summary["mu_score"]
            else:
                by_hand.setdefault((summary["dataset_id"], config["num_samples"]), []).append(
                    (config["seed"], summary["history"])
                )
    assert len(by_hand) == 4 and all(len(v) == 2 for v in by_hand.values())
    per_dataset = [row for row in rows if not row["dataset_id"].startswith("all ")]
    assert sorted((row["dataset_id"], int(row["N"])) for row in per_dataset) == sorted(by_hand)
    close = lambda a, b: abs(float(a) - b) <= 1e-9  # noqa: E731
    for row in per_dataset:
        runs = sorted(by_hand[row["dataset_id"], int(row["N"])])
        last = [history[-1][2] for _, history in runs]
        best = [max(h[2] for h in history) for _, history in runs]
        assert row["metric"] == "normalized_score" and int(row["seeds"]) == 2 and int(row["updates"]) == TOTAL
        for column, value in [
            ("last_mean", mean(last)),
            ("last_std", std(last)),
            ("best_mean", mean(best)),
            ("best_std", std(best)),
            ("last_iqm", trimmed_mean_by_hand(last)),
            ("mu", mu_score[row["dataset_id"]]),
        ]:
            assert close(row[column], value), (row["dataset_id"], row["N"], column, row[column], value)
        assert float(row["last_iqm_ci_low"]) <= float(row["last_iqm"]) <= float(row["last_iqm_ci_high"])
        assert float(row["last_mean_ci_low"]) <= float(row["last_mean"]) <= float(row["last_mean_ci_high"])
        assert [float(x) for x in row["last_scores"].split()] == last
    overall = [row for row in rows if row["dataset_id"].startswith("all ")]
    assert sorted(int(row["N"]) for row in overall) == [1, 4]
    for row in overall:
        last = [history[-1][2] for dataset in GOOD for _, history in by_hand[dataset, int(row["N"])]]
        assert close(row["last_mean"], sum(last) / len(last)) and close(row["last_iqm"], trimmed_mean_by_hand(last))
        assert float(row["last_iqm_ci_low"]) <= float(row["last_iqm"]) <= float(row["last_iqm_ci_high"])
    # the markdown table and the two plots per dataset
    text = open(os.path.join(sweep["dir"], "results.md")).read()
    assert "**last** is the final evaluation" in text and "IQM" in text and "mu alone" in text
    for dataset in GOOD:
        for plot in ("score_vs_N", "learning_curves"):
            name = f"{dataset.replace('/', '__')}_{plot}.png"
            assert os.path.getsize(os.path.join(sweep["dir"], name)) > 10_000 and f"]({name})" in text


def test_results_only_rewrites_the_same_results_elsewhere(sweep, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            SWEEP,
            "--sweep-dir",
            sweep["dir"],
            "--results-only",
            "--results-dir",
            str(tmp_path),
            "--bootstrap-reps",
            "500",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    with open(os.path.join(sweep["dir"], "results.csv")) as f, open(tmp_path / "results.csv") as g:
        assert f.read() == g.read()  # the bootstrap is seeded: the same numbers, to the last digit


def test_rliable_iqm_and_interval_on_fixed_scores():
    sweep = load_sweep_module()
    scores = np.array([3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0, 5.0, 3.0, 5.0, 8.0])  # mean 4.33, IQM 25/6
    point, ci = sweep.interval_estimates(scores[:, None], reps=2000)
    assert abs(point["iqm"] - 25 / 6) < 1e-9 and abs(point["mean"] - 52 / 12) < 1e-9
    assert ci["iqm"][0] <= 25 / 6 <= ci["iqm"][1] and ci["iqm"][0] < ci["iqm"][1]
    # runs x tasks: the IQM of all values; the bootstrap resamples runs within each task
    matrix = np.arange(24, dtype=float).reshape(8, 3) ** 1.5
    point, ci = sweep.interval_estimates(matrix, reps=2000)
    assert abs(point["iqm"] - trimmed_mean_by_hand(matrix.ravel().tolist())) < 1e-9
    assert ci["iqm"][0] <= point["iqm"] <= ci["iqm"][1]


def test_default_n_grid_follows_the_papers_grids():
    sweep = load_sweep_module()
    args = sweep.Args(
        sweep_dir="/nonexistent",
        datasets=(
            "emaq/HalfCheetah-v5/random-v0",
            "mujoco/hopper/medium-v0",
            "D4RL/kitchen/complete-v2",
            "D4RL/antmaze/umaze-v1",
            "D4RL/pen/cloned-v2",
            "mujoco/invertedpendulum/medium-v0",
            "emaq/AdroitHandDoor-v1/random-v0",
        ),
        seeds=(1,),
    )
    ns = {}
    for run in sweep.plan(args):
        ns.setdefault(run.dataset_id, []).append(run.n)
    assert ns["emaq/HalfCheetah-v5/random-v0"] == ns["mujoco/hopper/medium-v0"] == [None, 5, 10, 25, 50, 100, 200, 400]
    assert ns["mujoco/invertedpendulum/medium-v0"] == [
        None,
        5,
        10,
        25,
        50,
        100,
        200,
        400,
    ]  # "pen" is not "invertedpendulum"
    assert ns["D4RL/kitchen/complete-v2"] == [None, 4, 8, 16, 32, 64]
    assert ns["D4RL/antmaze/umaze-v1"] == [None, 50, 100, 150, 200]
    assert ns["D4RL/pen/cloned-v2"] == ns["emaq/AdroitHandDoor-v1/random-v0"] == [None, 16, 32, 64, 128]


def test_grid_axes_and_mu_sharing(capsys):
    """A grid over Q flags shares one mu per dataset; a grid over a flag that changes mu gets one mu per value."""
    sweep = load_sweep_module()
    runs = sweep.plan(
        sweep.Args(
            sweep_dir="/x",
            datasets=("emaq/Hopper-v5/random-v0",),
            ns=(5,),
            seeds=(1, 2),
            grid=("ema=0.99,0.995", "q-lr=1e-4,3e-4"),
            flags="--total-updates 100",
        )
    )
    mus, emaq = [r for r in runs if r.n is None], [r for r in runs if r.n is not None]
    assert len(mus) == 1 and len(emaq) == 8 and all(r.mu is mus[0] for r in emaq)
    assert "--total-updates 100 --ema 0.99 --q-lr 3e-4 --num-samples 5".split() == [
        t
        for t in emaq[2].argv
        if t not in ("--dataset-id", "emaq/Hopper-v5/random-v0", "--seed", "1", "--behavior-updates", "0")
    ]
    runs = sweep.plan(
        sweep.Args(
            sweep_dir="/x", datasets=("emaq/Hopper-v5/random-v0",), ns=(5,), seeds=(1,), grid=("batch-size=64,128",)
        )
    )
    assert len([r for r in runs if r.n is None]) == 2
    with pytest.raises(SystemExit) as exit_info:
        sweep.plan(sweep.Args(datasets=("x/y/z-v0",), flags="--seed 3"))
    assert exit_info.value.code == 2 and "error: --flags may not set --seed" in capsys.readouterr().err


def test_ctrl_c_stops_the_sweep_with_every_run_checkpointed(sweep, tmp_path):
    """SIGINT to the sweep's process group (what Ctrl-C sends): the runs get SIGTERM, checkpoint and exit; the sweep
    exits 130, and the same command would resume both runs."""
    import shutil

    dataset = GOOD[0].replace("/", "__")
    shutil.copytree(
        os.path.join(sweep["dir"], "runs", dataset, "mu"), tmp_path / "runs" / dataset / "mu"
    )  # mu: finished
    long_flags = [f if f != str(TOTAL) else "100000" for f in FLAGS]
    command = [
        sys.executable,
        SWEEP,
        "--sweep-dir",
        str(tmp_path),
        "--datasets",
        GOOD[0],
        "--ns",
        "2",
        "--seeds",
        "1",
        "2",
        "--num-cpus",
        "2",
        "--",
        *long_flags,
    ]
    with open(tmp_path / "output.txt", "w+") as out:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        cells = [str(tmp_path / "runs" / dataset / f"N2_seed{seed}") for seed in (1, 2)]
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            steps = [
                json.load(open(os.path.join(f, "checkpoint.json")))["step"]
                for c in cells
                if os.path.isdir(c)
                for f in run_folders(c)
                if os.path.isfile(os.path.join(f, "checkpoint.json"))
            ]
            if len(steps) == 2 and min(steps) >= 10:
                break
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGINT)
        try:
            assert proc.wait(timeout=300) == 130
        except BaseException:  # a failed wait must not leave the runs behind: they run in sessions of their own
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            for pid in [pid for cell in cells for pid in emaq_pids(cell)]:
                os.kill(pid, signal.SIGKILL)
            raise
        out.seek(0)
        output = out.read()
    assert "stopping: of 2 runs" in output and "Launch the same command again" in output, output
    for cell in cells:
        (run,) = run_folders(cell)
        assert not emaq_pids(cell)  # no run left behind
        assert not os.path.exists(os.path.join(run, "summary.json"))
        with open(os.path.join(run, "checkpoint.json")) as f:
            meta = json.load(f)
        assert meta["phase"] == "emaq" and 10 <= meta["step"] < 100000
        with open(os.path.join(cell, "log.txt")) as f:
            assert (
                f"stopped by signal {int(signal.SIGTERM)} at emaq update {meta['step']}: checkpoint written" in f.read()
            )
    dry = subprocess.run(
        command[: -len(long_flags) - 1] + ["--dry-run", "--", *long_flags], cwd=ROOT, capture_output=True, text=True
    )
    assert "1 finished, 2 to resume, 0 to start" in dry.stdout, dry.stdout + dry.stderr
