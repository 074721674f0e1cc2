"""The sweep (benchmarks/sweep.py): real tiny sweeps on a local Ray, killed, relaunched and summarized.

Two module fixtures run real sweeps once each, and the tests read what they left behind (a run of emaq_offline.py
costs a few seconds, mostly imports, so the sweeps keep the number of runs and Ray starts small):
- `sweep`: 2 generated datasets x N in {1, 4} x 2 seeds plus a dataset whose mu must fail, one run SIGKILLed
  mid-training; a relaunch that resumes it; a third launch that must run nothing.
- `grid_sweep`: one dataset, a grid over behavior-model (a flag of emaq_offline.MU_ARGS: one mu per value) x
  total-updates (20 finishes; 100000 is still running when the sweep gets Ctrl-C), 4 runs at once on 2 CPUs.
The results' arithmetic (mu's column, rliable's runs x tasks orientation) is also checked on synthetic run folders,
which need no Ray and no training. The datasets are generated once per session, into conftest's Minari folder, by
the first mu run that needs them.
"""

import csv
import dataclasses
import functools
import importlib.util
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import ROOT

import emaq_offline

SWEEP = os.path.join(ROOT, "benchmarks", "sweep.py")
GOOD = ["emaq/Hopper-v5/random_2000-v0", "emaq/Walker2d-v5/random_2000-v0"]
BAD = "emaq/NoSuchEnv-v0/random_2000-v0"  # its mu run fails (gymnasium has no such env), so its runs cannot start
TOTAL = 60  # enough for the test to catch a run between its first checkpoint (update 10) and its end
FLAGS = (  # tiny networks, 50 updates of mu, 2 evaluation episodes; a checkpoint every 10 updates
    "--preset table3 --num-qs 2 --q-hidden 32 --q-layers 2 --batch-size 32 --behavior-updates 50 --eval-episodes 2 "
    "--log-every 10 --checkpoint-every 10"
).split()
KILLED = ("emaq__Walker2d-v5__random_2000-v0", "N4_seed2")


def sweep_env() -> dict:
    """The environment of a sweep the test launches, read when it launches: conftest's temporary Minari folder."""
    return {**os.environ, "PYTHONWARNINGS": "ignore"}


@functools.cache
def load_sweep_module():
    spec = importlib.util.spec_from_file_location("sweep", SWEEP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sweep_command(sweep_dir, datasets):
    return [
        *(sys.executable, SWEEP, "--sweep-dir", sweep_dir, "--datasets", *datasets, "--ns", "1", "4"),
        *("--seeds", "1", "2", "--num-cpus", "2", "--bootstrap-reps", "100", "--", *FLAGS),
        *("--total-updates", str(TOTAL), "--eval-every", str(TOTAL // 2)),
    ]


def launch(sweep_dir, datasets, timeout=400):
    command = sweep_command(sweep_dir, datasets)
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=sweep_env())


def run_folders(cell_dir):
    return sorted(
        os.path.join(cell_dir, d)
        for d in os.listdir(cell_dir)
        if os.path.isfile(os.path.join(cell_dir, d, "config.json"))
    )


def checkpoint_step(cell_dir):
    """The (phase, step) of the cell's run's last checkpoint, or None before its first one."""
    for folder in run_folders(cell_dir) if os.path.isdir(cell_dir) else []:
        try:
            with open(os.path.join(folder, "checkpoint.json")) as f:
                meta = json.load(f)
            return meta["phase"], meta["step"]
        except (OSError, ValueError):
            pass
    return None


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


def read_json(*path):
    with open(os.path.join(*path)) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Launch 1 (one run SIGKILLed mid-training, one dataset whose mu fails), launch 2 (resumes), launch 3 (nothing).
    Beside launch 2, which keeps one CPU busy, the killed run again, never interrupted, in a folder of its own."""
    sweep_dir = str(tmp_path_factory.mktemp("sweep"))
    killed_cell = os.path.join(sweep_dir, "runs", *KILLED)
    out = open(tmp_path_factory.mktemp("launch1") / "output.txt", "w+")
    first = subprocess.Popen(
        sweep_command(sweep_dir, GOOD + [BAD]),
        cwd=ROOT,
        stdout=out,
        stderr=subprocess.STDOUT,
        text=True,
        env=sweep_env(),
    )
    killed_at, deadline = None, time.time() + 300
    while killed_at is None and time.time() < deadline and first.poll() is None:
        for folder in run_folders(killed_cell) if os.path.isdir(killed_cell) else []:
            assert not os.path.exists(os.path.join(folder, "summary.json")), (
                "the run finished before the test could kill it"
            )
        state = checkpoint_step(killed_cell)
        if state and state[0] == "emaq" and state[1] >= 10:
            for pid in emaq_pids(killed_cell):
                os.kill(pid, signal.SIGKILL)
                killed_at = state[1]
        time.sleep(0.02)
    first.wait(timeout=300)
    out.seek(0)
    first_output = out.read()
    assert killed_at is not None, "never saw the run to kill:\n" + first_output
    killed_checkpoint = read_json(run_folders(killed_cell)[0], "checkpoint.json")
    mu_files = {d: files_state(os.path.join(sweep_dir, "runs", d.replace("/", "__"), "mu")) for d in GOOD}
    # the sweep's own command line of the killed run, another --runs-dir, the same thread count
    with open(os.path.join(killed_cell, "log.txt")) as f:
        argv = shlex.split(next(line[2:] for line in f if line.startswith("$ ")))
    reference_dir = str(tmp_path_factory.mktemp("reference"))
    argv[argv.index("--runs-dir") + 1] = reference_dir
    env = {**sweep_env(), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(os.path.join(reference_dir, "log.txt"), "w+") as log:
        reference = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        second = launch(sweep_dir, GOOD)
        reference.wait(timeout=300)
        log.seek(0)
        reference = dict(dir=reference_dir, rc=reference.returncode, log=log.read())
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
        reference=reference,
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
        config = read_json(mu_run, "config.json")
        assert config["total_updates"] == 0 and config["behavior_updates"] == 50 and config["behavior_path"] is None
        cells = [c for c in os.listdir(root) if c != "mu"]
        assert sorted(cells) == ["N1_seed1", "N1_seed2", "N4_seed1", "N4_seed2"]
        for cell in cells:
            (run,) = run_folders(os.path.join(root, cell))
            config = read_json(run, "config.json")
            assert config["behavior_updates"] == 0 and config["behavior_path"] == os.path.join(mu_run, "mu.pt")
            assert os.path.isfile(os.path.join(run, "summary.json"))  # every run finished
        # the relaunches did not touch the mu run (no second pretraining)
        assert files_state(os.path.join(root, "mu")) == sweep["mu_files"][dataset]


def test_relaunch_resumes_the_killed_run_to_the_weights_it_would_have_had(sweep):
    second = sweep["second"]
    assert second.returncode == 0, second.stdout + second.stderr
    assert "9 finished, 1 to resume, 0 to extend, 0 to start" in second.stdout
    assert (
        "done    emaq/Walker2d-v5/random_2000-v0 N=4 seed=2: last score" in second.stdout
        and "(resumed)" in second.stdout
    )
    (run,) = run_folders(sweep["killed_cell"])
    with open(os.path.join(sweep["killed_cell"], "log.txt")) as f:
        commands = [line[2:] for line in f.read().split("\n") if line.startswith("$ ")]
    assert len(commands) == 2 and commands[1].endswith(f"--resume {run}")
    reference = sweep["reference"]  # the same run, never interrupted
    assert reference["rc"] == 0, reference["log"][-2000:]
    (reference_run,) = run_folders(reference["dir"])
    resumed = torch.load(os.path.join(run, "checkpoint.pt"), weights_only=True)
    uninterrupted = torch.load(os.path.join(reference_run, "checkpoint.pt"), weights_only=True)
    assert resumed["phase"] == uninterrupted["phase"] == "done"
    for part in ("q_ensemble", "q_target"):
        assert resumed[part].keys() == uninterrupted[part].keys()
        for name, tensor in uninterrupted[part].items():
            assert torch.equal(resumed[part][name], tensor), (part, name)
    assert read_json(run, "summary.json")["history"] == read_json(reference_run, "summary.json")["history"]


def test_third_launch_runs_nothing(sweep):
    third = sweep["third"]
    assert third.returncode == 0, third.stdout + third.stderr
    assert "10 finished, 0 to resume, 0 to extend, 0 to start" in third.stdout
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
    with open(os.path.join(sweep["dir"], "results.csv")) as f:
        rows = list(csv.DictReader(f))
    by_hand, mu_score = {}, {}
    for folder, _, files in os.walk(os.path.join(sweep["dir"], "runs")):
        if "summary.json" in files:
            config, summary = read_json(folder, "config.json"), read_json(folder, "summary.json")
            if config["total_updates"] == 0:
                mu_score[summary["dataset_id"]] = summary["mu_score"]
            else:
                by_hand.setdefault((summary["dataset_id"], config["num_samples"]), []).append(
                    (config["seed"], summary["history"], sps_median_by_hand(folder))
                )
    assert len(by_hand) == 4 and all(len(v) == 2 for v in by_hand.values())
    per_dataset = [row for row in rows if not row["dataset_id"].startswith("all ")]
    assert sorted((row["dataset_id"], int(row["N"])) for row in per_dataset) == sorted(by_hand)
    close = lambda a, b: abs(float(a) - b) <= 1e-9  # noqa: E731
    for row in per_dataset:
        runs = sorted(by_hand[row["dataset_id"], int(row["N"])])
        last = [history[-1][2] for _, history, _ in runs]
        best = [max(h[2] for h in history) for _, history, _ in runs]
        assert row["metric"] == "normalized_score" and int(row["seeds"]) == 2 and int(row["updates"]) == TOTAL
        for column, value in [
            ("last_mean", mean(last)),
            ("last_std", std(last)),
            ("best_mean", mean(best)),
            ("best_std", std(best)),
            ("last_iqm", trimmed_mean_by_hand(last)),
            ("mu", mu_score[row["dataset_id"]]),
            ("updates_per_s", mean([speed for _, _, speed in runs])),
        ]:
            assert close(row[column], value), (row["dataset_id"], row["N"], column, row[column], value)
        assert float(row["last_iqm_ci_low"]) <= float(row["last_iqm"]) <= float(row["last_iqm_ci_high"])
        assert float(row["last_mean_ci_low"]) <= float(row["last_mean"]) <= float(row["last_mean_ci_high"])
        assert [float(x) for x in row["last_scores"].split()] == last
    overall = [row for row in rows if row["dataset_id"].startswith("all ")]
    assert sorted(int(row["N"]) for row in overall) == [1, 4]
    for row in overall:
        last = [history[-1][2] for dataset in GOOD for _, history, _ in by_hand[dataset, int(row["N"])]]
        assert close(row["last_mean"], sum(last) / len(last)) and close(row["last_iqm"], trimmed_mean_by_hand(last))
        assert float(row["last_iqm_ci_low"]) <= float(row["last_iqm"]) <= float(row["last_iqm_ci_high"])
    # the markdown table, the two plots per dataset, and the datasets' score-vs-N plots side by side
    text = open(os.path.join(sweep["dir"], "results.md")).read()
    assert "**last** is the final evaluation" in text and "IQM" in text and "mu alone" in text
    for name in [f"{d.replace('/', '__')}_{plot}.png" for d in GOOD for plot in ("score_vs_N", "learning_curves")]:
        assert os.path.getsize(os.path.join(sweep["dir"], name)) > 10_000 and f"]({name})" in text
    assert os.path.getsize(os.path.join(sweep["dir"], "score_vs_N.png")) > 10_000 and "](score_vs_N.png)" in text
    assert f"on {read_json(sweep['dir'], 'sweep.json')['cpu']}, its runs side by side" in text


def sps_median_by_hand(run_folder):
    """The median of the run's charts/SPS, read from its TensorBoard event files record by record (a resumed run has
    two; a step logged again after the resume replaces the killed process's value, as in TensorBoard)."""
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    by_step = {}
    for name in sorted(f for f in os.listdir(run_folder) if f.startswith("events.out.tfevents")):
        for event in LegacyEventFileLoader(os.path.join(run_folder, name)).Load():
            for value in event.summary.value:
                if value.tag == "charts/SPS":
                    by_step[event.step] = value.simple_value
    assert sorted(by_step) == list(range(10, TOTAL + 1, 10))  # one per log interval
    return statistics.median(by_step.values())


def test_results_only_rewrites_the_same_results_elsewhere(sweep, tmp_path):
    result = subprocess.run(
        [sys.executable, SWEEP, "--sweep-dir", sweep["dir"], "--results-only", "--results-dir", str(tmp_path)]
        + ["--bootstrap-reps", "100"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    with open(os.path.join(sweep["dir"], "results.csv")) as f, open(tmp_path / "results.csv") as g:
        assert f.read() == g.read()  # the bootstrap is seeded: the same numbers, to the last digit


def test_a_results_folder_rebuilds_its_results_from_its_runs_csv_alone(sweep, tmp_path):
    """What a results folder commits (runs.csv, sweep.json) is enough: --results-only on a copy of those two files
    writes the same results.csv, runs.csv and plots, and results.md names the command and the CPU."""
    for name in ("runs.csv", "sweep.json"):
        with open(os.path.join(sweep["dir"], name)) as f, open(tmp_path / name, "w") as g:
            g.write(f.read())
    result = subprocess.run(
        [sys.executable, SWEEP, "--sweep-dir", str(tmp_path), "--results-only", "--bootstrap-reps", "2000"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    for name in ("results.csv", "runs.csv"):
        with open(os.path.join(sweep["dir"], name)) as f, open(tmp_path / name) as g:
            assert f.read() == g.read(), name
    with open(tmp_path / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    assert {row["run"].split(os.sep)[-2] for row in rows} >= {"mu", "N1_seed1", "N4_seed2"}
    assert len(rows) == sum(1 for _ in open(os.path.join(sweep["dir"], "runs.csv"))) - 1
    text = (tmp_path / "results.md").read_text()
    assert read_json(sweep["dir"], "sweep.json")["command"] in text and "score_vs_N.png" in os.listdir(tmp_path)


def test_the_dataset_check_creates_a_missing_minari_folder_on_a_fresh_machine(tmp_path, monkeypatch):
    """A fresh HOME, no MINARI_DATASETS_PATH: ~/.minari/datasets does not exist yet, and the sweep must start."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MINARI_DATASETS_PATH")
    os.makedirs(tmp_path / "home")
    sweep_module = load_sweep_module()
    assert sweep_module.minari_root() == str(tmp_path / "home" / ".minari" / "datasets")
    sweep_module.check_datasets(GOOD)  # exits with an error line if it refuses
    assert os.path.isdir(tmp_path / "home" / ".minari" / "datasets")


@pytest.mark.parametrize("case", ["is read-only", "cannot be created"])
def test_the_dataset_check_refuses_only_a_folder_it_cannot_write(tmp_path, monkeypatch, capsys, case):
    locked = tmp_path / "locked"
    os.makedirs(locked)
    root = locked if case == "is read-only" else locked / "sub" / "datasets"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    os.chmod(locked, 0o555)  # no write bits (root could still write: the check reads the bits too)
    try:
        if case == "cannot be created" and os.access(locked, os.W_OK):  # root: makedirs would succeed here
            monkeypatch.setattr(os, "makedirs", lambda *a, **k: (_ for _ in ()).throw(PermissionError(13, "denied")))
        with pytest.raises(SystemExit) as stop:
            load_sweep_module().check_datasets(GOOD)
    finally:
        os.chmod(locked, 0o755)
    assert stop.value.code == 2
    assert f"which {case}" in capsys.readouterr().err


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
    # every flag of emaq_offline.MU_ARGS (but the dataset, an axis of its own): one mu per value, in a cell per value,
    # loaded by the runs of that value only
    for name in set(emaq_offline.MU_ARGS) - {"dataset_id"}:
        flag = name.replace("_", "-")
        runs = sweep.plan(
            sweep.Args(
                sweep_dir="/x", datasets=("emaq/Hopper-v5/random-v0",), ns=(5,), seeds=(1,), grid=(f"{flag}=a,b",)
            )
        )
        mus = [r for r in runs if r.n is None]
        assert [r.dir for r in mus] == [f"/x/runs/emaq__Hopper-v5__random-v0/mu_{flag}={v}" for v in "ab"], flag
        assert all(r.mu is mus["ab".index(dict(r.grid)[flag])] for r in runs if r.n is not None), flag
    with pytest.raises(SystemExit) as exit_info:
        sweep.plan(sweep.Args(datasets=("x/y/z-v0",), flags="--seed 3"))
    assert exit_info.value.code == 2 and "error: --flags may not set --seed" in capsys.readouterr().err


def test_a_relaunch_with_more_updates_extends_every_finished_run(tmp_path):
    """The same sweep with a larger --total-updates: the finished run continues from its end (--resume, its
    evaluations so far kept) to the new count, mu is not touched, and the results count the new updates."""
    sweep_dir = str(tmp_path / "sweep")
    cell = os.path.join(sweep_dir, "runs", GOOD[0].replace("/", "__"), "N2_seed1")

    def launch_with(total, *extra):
        command = [
            *(sys.executable, SWEEP, "--sweep-dir", sweep_dir, "--datasets", GOOD[0], "--ns", "2", "--seeds", "1"),
            *("--num-cpus", "2", "--bootstrap-reps", "100", *extra, "--", *FLAGS),
            *("--total-updates", str(total), "--eval-every", "10"),
        ]
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=400, env=sweep_env())
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    launch_with(20)
    (run,) = run_folders(cell)
    before = read_json(run, "summary.json")["history"]
    mu_files = files_state(os.path.join(sweep_dir, "runs", GOOD[0].replace("/", "__"), "mu"))
    assert "1 finished, 0 to resume, 1 to extend, 0 to start" in launch_with(40, "--dry-run")
    out = launch_with(40)
    assert f"done    {GOOD[0]} N=2 seed=1: last score" in out and "(extended)" in out, out
    assert run_folders(cell) == [run]  # the same run folder, continued
    with open(os.path.join(cell, "log.txt")) as f:
        commands = [line[2:] for line in f.read().split("\n") if line.startswith("$ ")]
    assert len(commands) == 2 and commands[1].endswith(f"--resume {run} --total-updates 40")
    history = read_json(run, "summary.json")["history"]
    assert [h[0] for h in history] == [10, 20, 30, 40] and history[:2] == before
    assert read_json(run, "checkpoint.json") == {"phase": "done", "step": 40}
    assert files_state(os.path.join(sweep_dir, "runs", GOOD[0].replace("/", "__"), "mu")) == mu_files
    with open(os.path.join(sweep_dir, "results.csv")) as f:
        assert [int(row["updates"]) for row in csv.DictReader(f)] == [40]  # the one cell
    assert "2 finished, 0 to resume, 0 to extend, 0 to start" in launch_with(40, "--dry-run")


# ----- a grid over a flag of MU_ARGS, and Ctrl-C, on one sweep ----------------------------------------------------
GRID_DATASET = GOOD[0]
KINDS = ("autoregressive", "vae")


def finished(cell_dir):
    """The cell's run folder if its run finished (summary.json), else None."""
    folders = run_folders(cell_dir) if os.path.isdir(cell_dir) else []
    return next((f for f in folders if os.path.isfile(os.path.join(f, "summary.json"))), None)


@pytest.fixture(scope="module")
def grid_sweep(tmp_path_factory):
    """A grid over behavior-model x total-updates, 4 runs at once on 2 CPUs; SIGINT to the sweep's process group (what
    Ctrl-C sends) once the sweep reported the 20-update runs and the 100000-update ones are past their first
    checkpoints."""
    sweep_dir = str(tmp_path_factory.mktemp("grid_sweep"))
    root = os.path.join(sweep_dir, "runs", GRID_DATASET.replace("/", "__"))
    grid = (f"behavior-model={','.join(KINDS)}", "total-updates=20,100000")
    flags = [*FLAGS, "--eval-every", "10"]
    command = [
        *(sys.executable, SWEEP, "--sweep-dir", sweep_dir, "--datasets", GRID_DATASET, "--ns", "2", "--seeds", "1"),
        *("--grid", *grid, "--num-cpus", "2", "--cpus-per-run", "0.5", "--", *flags),
    ]
    cells = {
        (kind, total): os.path.join(root, f"N2_seed1_behavior-model={kind}_total-updates={total}")
        for kind in KINDS
        for total in (20, 100000)
    }
    output = tmp_path_factory.mktemp("grid_launch") / "output.txt"
    with open(output, "w") as out:
        proc = subprocess.Popen(
            command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=sweep_env()
        )
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and "FAILED" not in output.read_text():
            reported = output.read_text().count(" total-updates=20: last score")  # the short runs, as they end
            steps = [checkpoint_step(cells[kind, 100000]) for kind in KINDS]
            if reported == len(KINDS) and all(s and s[1] >= 10 for s in steps):
                break
            time.sleep(0.1)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
        rc = proc.wait(timeout=300)
    finally:  # nothing may stay behind, even when the test fails: the runs run in sessions of their own
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        left_behind = [pid for cell in cells.values() for pid in emaq_pids(cell)]
        for pid in left_behind:
            os.kill(pid, signal.SIGKILL)
    args = load_sweep_module().Args(
        sweep_dir=sweep_dir, datasets=(GRID_DATASET,), ns=(2,), seeds=(1,), grid=grid, flags=shlex.join(flags)
    )
    return dict(root=root, cells=cells, rc=rc, output=output.read_text(), args=args, left_behind=left_behind)


def test_a_grid_over_a_mu_flag_trains_one_mu_per_value(grid_sweep):
    """behavior-model is in emaq_offline.MU_ARGS: each value gets a mu of its own kind, and both cells finish."""
    out = grid_sweep["output"]
    assert sorted(c for c in os.listdir(grid_sweep["root"]) if c.startswith("mu")) == [
        f"mu_behavior-model={kind}" for kind in KINDS
    ]
    for kind in KINDS:
        assert f"done    {GRID_DATASET} mu behavior-model={kind}: mu score" in out, out
        assert f"done    {GRID_DATASET} N=2 seed=1 behavior-model={kind} total-updates=20: last score" in out, out
        (mu_run,) = run_folders(os.path.join(grid_sweep["root"], f"mu_behavior-model={kind}"))
        config = read_json(mu_run, "config.json")
        assert config["behavior_model"] == kind and config["total_updates"] == 0
        assert torch.load(os.path.join(mu_run, "mu.pt"), weights_only=True)["kind"] == kind
        run = finished(grid_sweep["cells"][kind, 20])
        config = read_json(run, "config.json")
        assert config["behavior_model"] == kind and config["behavior_path"] == os.path.join(mu_run, "mu.pt")
        assert [h[0] for h in read_json(run, "summary.json")["history"]] == [10, 20]


def test_ctrl_c_stops_the_sweep_with_every_run_checkpointed(grid_sweep, capsys):
    """The running runs get SIGTERM, checkpoint and exit; the sweep exits 130, and the same command would resume
    both runs."""
    out = grid_sweep["output"]
    assert grid_sweep["rc"] == 130, out
    assert "stopping: of 2 runs" in out and "Launch the same command again" in out, out
    assert grid_sweep["left_behind"] == []  # no run left running
    for kind in KINDS:
        cell = grid_sweep["cells"][kind, 100000]
        (run,) = run_folders(cell)
        assert not os.path.exists(os.path.join(run, "summary.json"))
        meta = read_json(run, "checkpoint.json")
        assert meta["phase"] == "emaq" and 10 <= meta["step"] < 100000
        with open(os.path.join(cell, "log.txt")) as f:
            stopped = f"stopped by signal {int(signal.SIGTERM)} at emaq update {meta['step']}: checkpoint written"
            assert stopped in f.read()
    assert load_sweep_module().sweep(dataclasses.replace(grid_sweep["args"], dry_run=True)) == 0
    assert "4 finished, 2 to resume, 0 to extend, 0 to start" in capsys.readouterr().out


# ----- results from synthetic run folders: no Ray, no training ------------------------------------------------------
DATASET = "emaq/Hopper-v5/random_2000-v0"


def write_run(folder, seed, total_updates, mu_score, last_score=None, behavior_path=None, **config):
    """A finished emaq_offline.py run, as much of it as the results read: config.json and summary.json. A mu run
    (total_updates 0) trained its mu for 50 updates; the others load theirs (--behavior-updates 0)."""
    os.makedirs(folder)
    config = dict(dataset_id=DATASET, behavior_updates=0 if total_updates else 50) | config
    config |= dict(seed=seed, total_updates=total_updates, num_samples=5, behavior_path=behavior_path)
    summary = dict(dataset_id=config["dataset_id"], score_tag="normalized_score", mu_score=mu_score, mu_return=mu_score)
    summary["history"] = [[total_updates, last_score, last_score]] if total_updates else []
    for name, content in (("config.json", config), ("summary.json", summary)):
        with open(os.path.join(folder, name), "w") as f:
            json.dump(content, f)


@pytest.mark.parametrize("flag", ["batch_size", "behavior_updates"])
def test_results_find_each_mu_by_its_cell_not_by_its_folder_name(tmp_path, flag):
    """A grid over a flag of MU_ARGS starts its mu runs together: two that start in the same second get the same
    folder name, in two cells. Each row reports the mu its runs loaded, and both mu runs count; the runs of a grid over
    behavior-updates, which all say --behavior-updates 0 (they load mu), are told apart by the mu they loaded."""
    name = "emaq__Hopper-v5__random_2000-v0__emaq_offline__1__1700000000"  # started in the same second
    root, dash = tmp_path / "runs" / "emaq__Hopper-v5__random_2000-v0", flag.replace("_", "-")
    for value, mu_score in ((128, 10.0), (256, 90.0)):
        mu_run = root / f"mu_{dash}={value}" / name
        write_run(mu_run, 1, 0, mu_score, **{flag: value})
        own = {flag: 0 if flag == "behavior_updates" else value}
        for seed in (1, 2):  # the runs' own evaluation of mu (-1) differs on purpose: rows report the mu run's
            cell = root / f"N5_seed{seed}_{dash}={value}"
            write_run(cell / name, seed, 100, -1.0, 50.0 + seed, str(mu_run / "mu.pt"), **own)
    rows, _, num_mu = load_sweep_module().summarize(str(tmp_path), reps=100)
    assert num_mu == 2
    assert {row["grid"]: (row["mu"], row["seed_list"]) for row in rows} == {
        f"{dash}=128": (10.0, "1 2"),
        f"{dash}=256": (90.0, "1 2"),
    }


def test_results_bootstrap_over_datasets_resamples_runs_within_each_dataset(tmp_path):
    """3 seeds x 2 datasets, every dataset's scores close together and far from the other's: resampling runs within
    each dataset keeps 2 + 2 of the 4 middle values from each, so the IQM's interval lies in [50, 52]; resampling the
    transposed matrix (datasets as runs) would draw 10s and 90s freely and give 3 "seeds" of 2 values each."""
    for d, base in ((0, 10.0), (1, 90.0)):
        dataset = f"emaq/Hopper-v5/random_{1000 + d}-v0"
        mu_run = tmp_path / f"mu{d}" / "run"
        write_run(mu_run, 1, 0, 0.0, dataset_id=dataset)
        for seed in (1, 2, 3):
            write_run(
                tmp_path / f"{d}_{seed}" / "run",
                seed,
                100,
                0.0,
                base + seed - 1,
                str(mu_run / "mu.pt"),
                dataset_id=dataset,
            )
    rows, _, _ = load_sweep_module().summarize(str(tmp_path), reps=500)
    (overall,) = [row for row in rows if row["dataset_id"] == "all 2 datasets"]
    assert overall["seeds"] == 3 and overall["last_iqm"] == (10 + 11 + 91 + 92) / 4 == 51.0
    assert 50.0 <= overall["last_iqm_ci_low"] < overall["last_iqm_ci_high"] <= 52.0
    assert 50.0 <= overall["last_mean_ci_low"] < overall["last_mean_ci_high"] <= 52.0


def test_rliable_iqm_and_interval_on_fixed_scores():
    sweep = load_sweep_module()
    scores = np.array([3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0, 5.0, 3.0, 5.0, 8.0])  # mean 4.33, IQM 25/6
    point, ci = sweep.interval_estimates(scores[:, None], reps=2000)
    assert abs(point["iqm"] - 25 / 6) < 1e-9 and abs(point["mean"] - 52 / 12) < 1e-9
    assert ci["iqm"][0] <= 25 / 6 <= ci["iqm"][1] and ci["iqm"][0] < ci["iqm"][1]
    # runs x tasks: the IQM of all values; the bootstrap resamples runs within each task (rows within each column):
    # with the values of each task close together, the interval stays within what such resamples can give
    matrix = np.array([[10.0, 90.0], [11.0, 91.0], [12.0, 92.0]])
    point, ci = sweep.interval_estimates(matrix, reps=2000)
    assert point["iqm"] == trimmed_mean_by_hand(matrix.ravel().tolist()) == 51.0
    assert 50.0 <= ci["iqm"][0] < ci["iqm"][1] <= 52.0 and 50.0 <= ci["mean"][0] < ci["mean"][1] <= 52.0
    _, ci = sweep.interval_estimates(matrix.T, reps=2000)  # the other orientation: these data tell the two apart
    assert ci["iqm"][1] - ci["iqm"][0] > 20
    # seeded: the same intervals whatever numpy's global generator holds (rliable draws from it), left as it was
    intervals = []
    for seed in (1, 2):
        np.random.seed(seed)
        intervals.append(sweep.interval_estimates(matrix, reps=200)[1])
        assert np.random.rand() == np.random.RandomState(seed).rand()
    assert all(np.array_equal(intervals[0][k], intervals[1][k]) for k in ("mean", "iqm"))
