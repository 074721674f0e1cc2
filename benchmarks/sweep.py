"""Sweeps of emaq_offline.py (datasets x N x seeds x any other flag) on Ray, then results tables and Figure 1 plots.

Docs: README.md, section "Reproduce the paper". Every run is an ordinary emaq_offline.py run in its own folder:
    sweep_dir/runs/<dataset>/mu/<run>/            mu pretrained once per dataset (--total-updates 0)
    sweep_dir/runs/<dataset>/N<n>_seed<s>/<run>/  EMaQ with that mu (--behavior-path .../mu.pt --behavior-updates 0)
Each cell folder also holds log.txt (the run's stdout and stderr). Relaunching the same command skips finished runs
and resumes interrupted ones; relaunching it with a larger --total-updates in its flags extends every finished run to
that count (`--resume`, as by hand); `--results-only` rewrites results.md, results.csv and the plots from the runs'
files.
"""

import csv
import ctypes
import dataclasses
import functools
import itertools
import json
import os
import platform
import re
import shlex
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMAQ = os.path.join(ROOT, "emaq_offline.py")


@dataclass
class Args:
    sweep_dir: str = "sweeps/emaq"
    """the sweep's folder: runs go to sweep_dir/runs/<dataset>/<cell>/, results.md, .csv and plots to sweep_dir"""
    datasets: tuple[str, ...] = ("emaq/HalfCheetah-v5/random-v0",)
    """Minari dataset ids; generated ones (emaq/<EnvId>/random[_<steps>]-v0) are made by their dataset's mu run"""
    ns: tuple[int, ...] = ()
    """the grid of N (--num-samples); empty: the paper's grid of each dataset's domain (README, Presets)"""
    seeds: tuple[int, ...] = (1, 2, 3)
    """seeds of every (dataset, N) cell"""
    grid: tuple[str, ...] = ()
    """more grid axes, each 'flag=v1,v2' (e.g. 'ema=0.99,0.995' 'q-lr=1e-4,3e-4'): every combination is run"""
    flags: str = ""
    """fixed flags of every run, passed to emaq_offline.py unchanged: --flags='--q-lr 3e-4' (or all after a lone --)"""
    mu_seed: int = 1
    """seed of each dataset's mu pretraining run"""
    # --- Ray ---
    address: str | None = None
    """join this running Ray cluster ('auto', or host:port; RAY_ADDRESS works too); unset: start a local Ray"""
    num_cpus: int | None = None
    """CPUs of the local Ray (unset: all cores); ignored when joining a cluster"""
    cpus_per_run: float = 1.0
    """CPUs each run asks Ray for; the run uses max(1, floor(cpus_per_run)) torch threads"""
    gpus_per_run: float | None = None
    """the fraction of a GPU each run asks for (0.25: 4 runs share a GPU); unset: 0.25 if Ray has GPUs, else 0"""
    python: str = sys.executable
    """the Python that runs emaq_offline.py (on a cluster: the same path on every node)"""
    # --- results ---
    results_only: bool = False
    """write the results of the runs already under sweep_dir (any folder of emaq_offline.py runs) and exit"""
    results_dir: str | None = None
    """where results.md, results.csv and the plots go; unset: sweep_dir"""
    bootstrap_reps: int = 2000
    """bootstrap resamples of rliable's 95% confidence intervals"""
    dry_run: bool = False
    """print the runs that would start or resume, and exit"""
    tail_lines: int = 12
    """lines of a failed run's log to print"""


# The paper's grids of N (README, Presets): Figure 1 for MuJoCo, Table 3 for the others.
PAPER_NS = {
    "mujoco": (5, 10, 25, 50, 100, 200, 400),
    "kitchen": (4, 8, 16, 32, 64),
    "antmaze": (50, 100, 150, 200),
    "adroit": (16, 32, 64, 128),
}
# Flags the sweep sets itself for every run.
OWN_FLAGS = {"dataset-id", "seed", "runs-dir", "num-samples", "behavior-path", "resume"}


def fail(message: str):
    """A user error: one line on stderr, exit code 2 (as emaq_offline.py does)."""
    print(message, file=sys.stderr)
    sys.exit(2)


def domain(dataset_id: str) -> str:
    """The domain of a dataset, from the environment part of its id ("ns/env/name-vX"): D4RL/pen/cloned-v2 -> adroit."""
    parts = dataset_id.lower().split("/")
    env = re.sub(r"-v\d+$", "", parts[-2] if len(parts) >= 2 else parts[0])
    if env == "kitchen" or env.startswith("frankakitchen"):
        return "kitchen"
    if env == "antmaze" or env.startswith("antmaze_"):
        return "antmaze"
    if env in ("door", "hammer", "pen", "relocate") or env.startswith("adroithand"):
        return "adroit"
    return "mujoco"


def cpu_model() -> str:
    """This machine's CPU, as results and benchmarks print it (speeds differ between CPU models)."""
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:  # not Linux
        names = [platform.processor()]
    return f"{names[0] if names and names[0] else 'unknown CPU'} ({os.cpu_count()} logical CPUs)"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", text.replace("/", "__"))


@dataclass
class Run:
    """One emaq_offline.py run of the sweep: a dataset's mu (n is None) or one (N, seed, grid values) cell."""

    dataset_id: str
    n: int | None
    seed: int
    grid: tuple  # ((flag, value), ...)
    dir: str  # the cell folder: its --runs-dir, holding the run folder and log.txt
    argv: list  # emaq_offline.py's flags for a fresh start (the mu's path is added when it is known)
    mu: Optional["Run"] = None
    total_updates: int = 0  # the EMaQ updates its flags ask for (set at launch): a finished run with fewer is extended

    @property
    def name(self) -> str:
        grid = "".join(f" {flag}={value}" for flag, value in self.grid)
        return f"{self.dataset_id} " + ("mu" if self.n is None else f"N={self.n} seed={self.seed}") + grid


def flag_tokens(text: str) -> list:
    tokens = shlex.split(text)
    own = sorted({t.lstrip("-").split("=")[0] for t in tokens if t.startswith("--")} & OWN_FLAGS)
    if own:
        fail(
            f"error: --flags may not set {', '.join('--' + f for f in own)}: the sweep sets them "
            f"(use --datasets, --ns, --seeds, and --resume happens by itself)"
        )
    return tokens


def mu_flags() -> set:
    """The flags that decide what mu is (its data, architecture or training), emaq_offline.MU_ARGS as flags: a grid
    over one of them gets one mu per value. Imported when a grid needs them: emaq_offline loads torch."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    import emaq_offline

    return {name.replace("_", "-") for name in emaq_offline.MU_ARGS}


def plan(args: Args) -> list:
    """Every run of the sweep, each dataset's mu before the runs that load it."""
    axes = []
    for axis in args.grid:
        flag, _, values = axis.partition("=")
        flag = flag.strip().lstrip("-").replace("_", "-")
        if not flag or not values or flag in OWN_FLAGS:
            fail(
                f"error: --grid {axis!r}: write 'flag=v1,v2' with a flag of emaq_offline.py other than "
                f"{', '.join(sorted(OWN_FLAGS))}"
            )
        axes.append([(flag, value.strip()) for value in values.split(",")])
    fixed, of_mu = flag_tokens(args.flags), mu_flags() if axes else set()

    def argv(dataset_id, seed, combo):
        return ["--dataset-id", dataset_id, "--seed", str(seed), *fixed, *grid_argv(combo)]

    runs = []
    for dataset_id in args.datasets:
        root, mus = os.path.join(os.path.abspath(args.sweep_dir), "runs", slug(dataset_id)), {}
        for combo in itertools.product(*axes):
            mu_grid = tuple((f, v) for f, v in combo if f in of_mu)
            if mu_grid not in mus:
                mu_argv = argv(dataset_id, args.mu_seed, mu_grid) + ["--total-updates", "0"]
                mu_dir = os.path.join(root, slug("mu" + grid_name(mu_grid)))
                mus[mu_grid] = Run(dataset_id, None, args.mu_seed, mu_grid, mu_dir, mu_argv)
                runs.append(mus[mu_grid])
            for n, seed in itertools.product(args.ns or PAPER_NS[domain(dataset_id)], args.seeds):
                run_argv = argv(dataset_id, seed, combo) + ["--num-samples", str(n), "--behavior-updates", "0"]
                cell = os.path.join(root, slug(f"N{n}_seed{seed}" + grid_name(combo)))
                runs.append(Run(dataset_id, n, seed, combo, cell, run_argv, mus[mu_grid]))
    return runs


@functools.cache
def requested_updates(argv: tuple) -> int:
    """--total-updates of a run with these flags, as emaq_offline.py resolves them (its preset's count if not given)."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    import emaq_offline

    return emaq_offline.cli(list(argv)).total_updates


def grid_name(combo) -> str:
    return "".join(f"_{flag}={value}" for flag, value in combo)


def grid_argv(combo) -> list:
    return [token for flag, value in combo for token in (f"--{flag}", value)]


def run_state(cell_dir: str, total_updates: int = 0):
    """('finished' | 'to extend' | 'interrupted' | 'new', the run folder or None): the cell's run folder with
    summary.json ('to extend' while its checkpoint has fewer than `total_updates` updates), else its newest folder with
    a checkpoint to resume (one without, killed before its first checkpoint, is left as it is)."""
    folders = [os.path.join(cell_dir, d) for d in (sorted(os.listdir(cell_dir)) if os.path.isdir(cell_dir) else [])]
    folders = [d for d in folders if os.path.isfile(os.path.join(d, "config.json"))]
    for d in folders:
        if os.path.isfile(os.path.join(d, "summary.json")):
            done = total_updates  # its last checkpoint's count: the end, or where an extension stopped
            if os.path.isfile(os.path.join(d, "checkpoint.json")):
                with open(os.path.join(d, "checkpoint.json")) as f:
                    done = json.load(f)["step"]
            return ("to extend" if done < total_updates else "finished"), d
    resumable = [d for d in folders if os.path.isfile(os.path.join(d, "checkpoint.json"))]
    return ("interrupted", max(resumable, key=os.path.getmtime)) if resumable else ("new", None)


# ---------------------------------------------------------------------------------------------------
# The Ray task: one run in its own process, started or resumed; SIGTERM (checkpoint, exit 130) when the sweep stops
# ---------------------------------------------------------------------------------------------------
def execute(spec: dict, mu: dict | None, *after) -> dict:
    """Run (or resume) one emaq_offline.py run and wait for it. `mu` is its dataset's mu run, already finished;
    `after` are runs it must wait for (the mu run that generates its dataset). Safe to retry: it resumes."""
    started, result = time.time(), {"status": "failed", "resumed": False}
    if mu is not None and mu["status"] != "finished":
        return {**result, "status": "not run", "message": f"its mu did not finish ({mu['status']})", "started": started}
    state, run_dir = run_state(spec["dir"], spec["total_updates"])
    if state == "finished":
        return {**result, **read_summary(run_dir), "status": "finished", "run_dir": run_dir, "started": started}
    if state == "interrupted":
        argv = [spec["python"], EMAQ, "--resume", run_dir]
    elif state == "to extend":
        argv = [spec["python"], EMAQ, "--resume", run_dir, "--total-updates", str(spec["total_updates"])]
    else:
        argv = [spec["python"], EMAQ, *spec["argv"], "--runs-dir", spec["dir"]]
        argv += ["--behavior-path", os.path.join(mu["run_dir"], "mu.pt")] if mu else []
    env = {**os.environ, **spec["env"]}
    libc = ctypes.CDLL(None, use_errno=True)  # loaded before fork: the child only calls into it

    def child_setup():
        signal.pthread_sigmask(signal.SIG_SETMASK, [])  # Ray's workers block SIGINT; the run must get its signals
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: if this worker dies, the run checkpoints and exits

    os.makedirs(spec["dir"], exist_ok=True)
    log_path = os.path.join(spec["dir"], "log.txt")
    with open(log_path, "a") as log:
        log.write(f"\n$ {shlex.join(argv)}\n")
        log.flush()
        child_start = time.time()
        proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=child_setup,
        )  # a new session: Ctrl-C reaches the sweep only
        try:
            while proc.poll() is None:  # polling, not wait(): Ray's cancel interrupts this with KeyboardInterrupt
                time.sleep(0.1)
        except BaseException:  # the sweep is stopping: the run checkpoints at its next update and exits 130
            terminate(proc)
            raise
    state, run_dir = run_state(spec["dir"], spec["total_updates"])
    result.update(
        rc=proc.returncode,
        run_dir=run_dir,
        resumed=argv[2] == "--resume",
        extended="--total-updates" in argv[3:],
        started=started,
        child_seconds=time.time() - child_start,
        ended=time.time(),
    )
    if proc.returncode == 0 and state == "finished":
        return {**result, **read_summary(run_dir), "status": "finished"}
    return {**result, "log": log_path, "tail": log_tail(log_path, spec["tail_lines"])}


def terminate(proc: subprocess.Popen, timeout: float = 600.0):
    """SIGTERM, then wait (the run ends its update or evaluation and writes a checkpoint); SIGKILL after `timeout`."""
    deadline = time.time() + timeout
    proc.send_signal(signal.SIGTERM)
    while proc.poll() is None:
        try:
            if time.time() > deadline:
                proc.kill()
            time.sleep(0.1)
        except KeyboardInterrupt:  # interrupted again: keep waiting for the checkpoint
            pass


def read_summary(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    last = summary["history"][-1] if summary["history"] else None
    return {
        "mu_score": summary["mu_score"],
        "mu_return": summary["mu_return"],
        "last_return": last[1] if last else None,
        "last_score": last[2] if last else None,
    }


def log_tail(path: str, lines: int) -> list:
    """The last lines of a log as a terminal shows them (a progress bar's redraws, separated by \\r, collapse)."""
    with open(path, errors="replace") as f:
        shown = [line.rsplit("\r", 1)[-1].rstrip() for line in f.read().split("\n")]
    return [line for line in shown if line.strip()][-lines:]


# ---------------------------------------------------------------------------------------------------
# The sweep: plan, skip finished runs, run the rest on Ray (mu first), report each, then the results
# ---------------------------------------------------------------------------------------------------
def sweep(args: Args) -> int:
    runs = plan(args)
    for run in runs:  # what each EMaQ run's flags ask for, as emaq_offline.py reads them (a bad flag stops here)
        run.total_updates = requested_updates(tuple(run.argv)) if run.n is not None else 0
    states = {id(run): run_state(run.dir, run.total_updates) for run in runs}
    todo = [run for run in runs if states[id(run)][0] != "finished"]
    resume, extend = (sum(states[id(run)][0] == state for run in runs) for state in ("interrupted", "to extend"))
    print(
        f"sweep {args.sweep_dir}: {len(runs)} runs ({sum(r.n is None for r in runs)} mu, "
        f"{len(args.datasets)} datasets), {len(runs) - len(todo)} finished, {resume} to resume, {extend} to extend, "
        f"{len(todo) - resume - extend} to start",
        flush=True,
    )
    if args.dry_run:
        for run in todo:
            state, folder = states[id(run)]
            if state == "to extend":
                command = f"--resume {folder} --total-updates {run.total_updates}"
            else:
                command = f"{shlex.join(run.argv)} --runs-dir {run.dir}"
                command += f" --behavior-path {run.mu.dir}/<run>/mu.pt" if run.mu else ""
            print(f"  {state:>11}: python emaq_offline.py {command}")
        return 0
    if todo:
        check_datasets(args.datasets)
    os.makedirs(args.sweep_dir, exist_ok=True)
    with open(os.path.join(args.sweep_dir, "sweep.json"), "w") as f:
        json.dump(
            {
                "command": shlex.join(["python", "benchmarks/sweep.py", *sys.argv[1:]]),
                "cpu": cpu_model(),
                "args": dataclasses.asdict(args),
            },
            f,
            indent=2,
        )
    failed = 0
    if todo:
        code, failed = run_on_ray(args, runs, todo)
        if code:
            return code
    write_results(args.sweep_dir, args.results_dir or args.sweep_dir, args.bootstrap_reps)
    return 1 if failed else 0


GENERATED = re.compile(r"emaq/[^/]+/random(_\d+)?-v0")  # emaq_offline.py generates these ids on first use


def minari_root() -> str:
    return os.path.abspath(os.environ.get("MINARI_DATASETS_PATH", os.path.expanduser("~/.minari/datasets")))


def to_generate(dataset_ids) -> list:
    """The generated datasets not yet in the Minari folder: the first mu run of each writes it."""
    return [d for d in dataset_ids if GENERATED.fullmatch(d) and not os.path.isdir(os.path.join(minari_root(), d))]


def check_datasets(dataset_ids):
    """A generated dataset that is missing is written by its mu run, so the Minari folder must be writable. A fresh
    machine has none yet: it is created here. Only a folder that exists and cannot be written is read-only (root may
    write anywhere, but a folder without write bits is someone's read-only copy)."""
    root, missing = minari_root(), to_generate(dataset_ids)
    if not missing:
        return
    needs = f"{', '.join(missing)} must be generated into the Minari folder {root}"
    fix = "point MINARI_DATASETS_PATH at a writable folder (README, Reproduce the paper, shows how to link datasets)"
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as e:
        fail(f"error: {needs}, which cannot be created ({e.strerror}): {fix}")
    if not (os.access(root, os.W_OK) and os.stat(root).st_mode & stat.S_IWUSR):
        fail(f"error: {needs}, which is read-only: {fix}")


def run_on_ray(args: Args, runs: list, todo: list):
    """Submit every unfinished run (each waits for its mu only); one line per run as it ends. (exit code, failures)"""
    import ray
    from tqdm import tqdm

    joining = bool(args.address or os.environ.get("RAY_ADDRESS"))  # else a local Ray, just for this sweep
    local = {} if joining else dict(num_cpus=args.num_cpus, object_store_memory=100 * 1024**2)  # only small results
    ray.init(address=args.address, include_dashboard=False, log_to_driver=False, logging_level="warning", **local)
    for stop in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which sets its own: stop like Ctrl-C
        signal.signal(stop, signal.default_int_handler)
    gpus = args.gpus_per_run
    if gpus is None:
        gpus = 0.25 if ray.cluster_resources().get("GPU", 0) else 0.0
    threads = str(max(1, int(args.cpus_per_run)))
    env = {"MINARI_DATASETS_PATH": minari_root(), "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    task = ray.remote(execute).options(num_cpus=args.cpus_per_run, num_gpus=gpus, max_retries=2)
    print(
        f"Ray: {ray.cluster_resources().get('CPU', 0):g} CPUs, {ray.cluster_resources().get('GPU', 0):g} GPUs; "
        f"each run asks for {args.cpus_per_run:g} CPU and {gpus:g} GPU",
        flush=True,
    )

    refs, generating, submitted, todo_dirs = {}, {}, time.time(), {run.dir for run in todo}
    missing = set(to_generate(args.datasets))  # the other mu runs of such a dataset wait for the first, which makes it
    for run in runs:  # mu runs come before the runs that load them
        key = run.dir
        if key not in todo_dirs:
            if run.n is None:  # a finished mu: its path, no task
                refs[key] = {"status": "finished", "run_dir": run_state(run.dir)[1]}
            continue
        spec = dict(dir=run.dir, argv=run.argv, python=args.python, env=env, tail_lines=args.tail_lines)
        spec["total_updates"] = run.total_updates
        after = [generating[run.dataset_id]] if run.n is None and run.dataset_id in generating else []
        refs[key] = task.remote(spec, refs[run.mu.dir] if run.mu else None, *after)
        if run.n is None and run.dataset_id in missing:
            generating.setdefault(run.dataset_id, refs[key])
    pending = {refs[run.dir]: run for run in todo}
    failed = 0
    bar = tqdm(total=len(runs), initial=len(runs) - len(todo), desc="sweep", unit="run", dynamic_ncols=True)
    log = open(os.path.join(args.sweep_dir, "sweep_runs.jsonl"), "a")
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            run = pending.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except Exception as e:  # the task itself died (its node was lost more often than Ray retries)
                result = {"status": "failed", "rc": None, "tail": [f"{type(e).__name__}: {e}".splitlines()[0]]}
            failed += result["status"] != "finished"
            bar.update(1)
            bar.write(report(run, result), file=sys.stdout)
            record = {"run": run.name, "dir": run.dir, "submitted": submitted, **result}
            record.pop("tail", None)
            log.write(json.dumps(record) + "\n")
            log.flush()
    except KeyboardInterrupt:
        bar.close()
        print(
            f"\nstopping: of {len(pending)} runs still queued or running, the running ones write a checkpoint and "
            f"exit (Ctrl-C again to quit at once; a run still checkpoints when its worker goes)",
            flush=True,
        )
        for ref in pending:
            ray.cancel(ref)
        ray.wait(list(pending), num_returns=len(pending), timeout=900)
        print("stopped. Launch the same command again to resume every interrupted run.", flush=True)
        return 130, failed
    finally:
        log.close()
    bar.close()
    print(f"sweep done: {len(runs) - failed} of {len(runs)} runs finished, {failed} failed or not run", flush=True)
    return 0, failed


def report(run: Run, result: dict) -> str:
    """One line per run as it ends: dataset, N, seed, last score (or the failure and the log's last lines)."""
    if result["status"] == "finished":
        fmt = lambda score, ret: f"{score:.1f} (return {ret:.1f})" if score is not None else f"return {ret:.1f}"  # noqa: E731
        what = (
            f"mu score {fmt(result['mu_score'], result['mu_return'])}"
            if run.n is None
            else f"last score {fmt(result['last_score'], result['last_return'])}"
        )
        took = f", {result['child_seconds']:.0f} s" if "child_seconds" in result else ""
        how = " (extended)" if result.get("extended") else " (resumed)" if result.get("resumed") else ""
        return f"done    {run.name}: {what}{took}{how}"
    if result["status"] == "not run":
        return f"NOT RUN {run.name}: {result['message']}"
    lines = "\n".join(f"    | {line}" for line in result.get("tail", []))
    return f"FAILED  {run.name}: exit code {result.get('rc')}; last lines of {result.get('log', 'its log')}:\n{lines}"


# ---------------------------------------------------------------------------------------------------
# Results: tables (mean +- std, rliable's IQM with 95% stratified bootstrap CIs) and plots, from the runs' files
# ---------------------------------------------------------------------------------------------------
# config.json fields that never make two runs' results differ in kind (or that the sweep sets per run).
NOT_GRID = set(
    "seed runs_dir resume behavior_path cuda compile cudagraphs exp_name target_memory_gb checkpoint_every log_every "
    "num_samples dataset_id".split()
)


def load_runs(sweep_dir: str) -> list:
    """Every finished emaq_offline.py run under sweep_dir: its folder, config.json, summary.json and updates per
    second; in a results folder without run folders, the same from its runs.csv (what write_results wrote)."""
    runs = []
    for folder, _, files in sorted(os.walk(sweep_dir)):
        if "summary.json" in files and "config.json" in files:
            with open(os.path.join(folder, "config.json")) as f, open(os.path.join(folder, "summary.json")) as g:
                run = {"dir": folder, "config": json.load(f), "summary": json.load(g)}
            runs.append(run | {"updates_per_s": updates_per_second(folder)})
    if not runs and os.path.isfile(os.path.join(sweep_dir, "runs.csv")):
        return runs_from_csv(sweep_dir)
    return runs


def updates_per_second(run_folder: str) -> float | None:
    """The median of the run's charts/SPS (Q updates per second between log points, evaluations excluded)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(run_folder, size_guidance={"scalars": 0}).Reload()
    if "charts/SPS" not in events.Tags()["scalars"]:
        return None
    return float(np.median([event.value for event in events.Scalars("charts/SPS")]))


RUNS_COLUMNS = "run config dataset_id score_tag mu_return mu_score updates_per_s step return score".split()


def write_runs_csv(runs: list, sweep_dir: str, path: str):
    """runs.csv: a row per run and evaluation (a mu run: one row, no step): the per-run data results are built from.
    `config` holds the flags that differ between runs and those the results read, as JSON."""
    keys = {k for r in runs for k in r["config"] if len({json.dumps(q["config"].get(k)) for q in runs}) > 1} - NOT_GRID
    keys |= {"dataset_id", "num_samples", "seed", "total_updates", "behavior_updates"}  # no paths of this machine
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, RUNS_COLUMNS)
        writer.writeheader()
        for r in runs:
            config = {k: r["config"].get(k) for k in sorted(keys)}
            if r["config"].get("behavior_path"):  # the mu run it loaded, as a folder relative to the sweep's
                mu_folder = os.path.dirname(os.path.realpath(r["config"]["behavior_path"]))
                config["behavior_path"] = os.path.join(os.path.relpath(mu_folder, os.path.realpath(sweep_dir)), "mu.pt")
            summary = r["summary"]
            row = dict(run=os.path.relpath(os.path.realpath(r["dir"]), os.path.realpath(sweep_dir)))
            row |= dict(config=json.dumps(config), dataset_id=summary["dataset_id"], score_tag=summary["score_tag"])
            row |= dict(mu_return=summary["mu_return"], mu_score=summary["mu_score"], updates_per_s=r["updates_per_s"])
            for step, ret, score in summary["history"] or [(None, None, None)]:
                writer.writerow(row | dict(step=step, **{"return": ret}, score=score))


def runs_from_csv(results_dir: str) -> list:
    """The runs of a runs.csv, as load_runs gives them (folders relative to results_dir)."""
    number = lambda text: None if text == "" else float(text)  # noqa: E731
    runs = {}
    with open(os.path.join(results_dir, "runs.csv"), newline="") as f:
        for row in csv.DictReader(f):
            if row["run"] not in runs:
                config = json.loads(row["config"])
                if config.get("behavior_path"):
                    config["behavior_path"] = os.path.join(results_dir, config["behavior_path"])
                summary = dict(dataset_id=row["dataset_id"], score_tag=row["score_tag"] or None, history=[])
                summary |= dict(mu_return=number(row["mu_return"]), mu_score=number(row["mu_score"]))
                runs[row["run"]] = dict(dir=os.path.join(results_dir, row["run"]), config=config, summary=summary)
                runs[row["run"]]["updates_per_s"] = number(row["updates_per_s"])
            if row["step"] != "":
                evaluation = [int(row["step"]), float(row["return"]), number(row["score"])]
                runs[row["run"]]["summary"]["history"].append(evaluation)
    return list(runs.values())


def interval_estimates(scores: np.ndarray, reps: int, seed: int = 0):
    """rliable on a (runs x tasks) score matrix: ({'mean', 'iqm'}, their 95% stratified bootstrap CIs [low, high])."""
    import warnings

    from rliable import library as rly
    from rliable import metrics

    # rliable's stratified bootstrap draws its resamples from numpy's global generator, whatever random_state says:
    # seeded here, and given back as it was, the same runs give the same intervals in every process
    saved = np.random.get_state()
    np.random.seed(seed)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            point, ci = rly.get_interval_estimates(
                {"x": np.asarray(scores, dtype=np.float64)},
                lambda s: np.array([metrics.aggregate_mean(s), metrics.aggregate_iqm(s)]),
                reps=reps,
                confidence_interval_size=0.95,
                random_state=np.random.RandomState(seed),
            )
    finally:
        np.random.set_state(saved)
    return {"mean": point["x"][0], "iqm": point["x"][1]}, {"mean": ci["x"][:, 0], "iqm": ci["x"][:, 1]}


def interval_columns(point: dict, ci: dict) -> dict:
    """results.csv's IQM of the last scores and the 95% bootstrap intervals of the IQM and the mean."""
    return {
        "last_iqm": point["iqm"],
        "last_iqm_ci_low": ci["iqm"][0],
        "last_iqm_ci_high": ci["iqm"][1],
        "last_mean_ci_low": ci["mean"][0],
        "last_mean_ci_high": ci["mean"][1],
    }


def summarize(sweep_dir: str, reps: int, runs: list | None = None):
    """Rows of results.csv: per (dataset, grid values, N) and, over datasets with normalized scores, per (grid, N)."""
    runs = load_runs(sweep_dir) if runs is None else runs
    mus = {os.path.realpath(r["dir"]): r for r in runs if r["config"]["total_updates"] == 0}
    emaq = [r for r in runs if r["config"]["total_updates"] > 0 and r["summary"]["history"]]
    # The mu run each run loaded (--behavior-path), found by its whole path: run folders' names are unique only within
    # their cell, and a grid over a flag of MU_ARGS starts its mu runs together, often within the same second. A run
    # that loads mu says --behavior-updates 0: the updates that made its mu are its mu run's.
    for r in emaq:
        path = r["config"]["behavior_path"]
        r["mu"] = mus.get(os.path.realpath(os.path.dirname(path))) if path else None
        if r["mu"]:
            r["config"] = {**r["config"], "behavior_updates": r["mu"]["config"]["behavior_updates"]}
    values = lambda key: {json.dumps(r["config"].get(key)) for r in emaq}  # noqa: E731
    grid_keys = sorted(k for k in {k for r in emaq for k in r["config"]} - NOT_GRID if len(values(k)) > 1)
    groups = {}
    for r in emaq:
        grid = " ".join(f"{k.replace('_', '-')}={r['config'].get(k)}" for k in grid_keys)
        groups.setdefault((r["summary"]["dataset_id"], grid, r["config"]["num_samples"]), []).append(r)
    rows, curves = [], {}
    for (dataset_id, grid, n), group in sorted(groups.items()):
        group.sort(key=lambda r: r["config"]["seed"])
        scored = all(h[2] is not None for r in group for h in r["summary"]["history"])
        col, metric = (2, group[0]["summary"]["score_tag"]) if scored else (1, "return")
        last = np.array([r["summary"]["history"][-1][col] for r in group])
        best = np.array([max(h[col] for h in r["summary"]["history"]) for r in group])
        # mu's score: from the mu runs these runs loaded; runs that pretrained mu report their own
        loaded = [r["mu"] for r in group]
        mu_source = [m["summary"] for m in loaded if m] if all(loaded) else [r["summary"] for r in group]
        mu_value = float(np.mean([s["mu_score" if scored else "mu_return"] for s in mu_source]))
        point, ci = interval_estimates(last[:, None], reps)
        speeds = [r["updates_per_s"] for r in group]
        rows.append(
            {
                "dataset_id": dataset_id,
                "grid": grid,
                "N": n,
                "seeds": len(group),
                "metric": metric,
                "updates": min(r["summary"]["history"][-1][0] for r in group),
                "last_mean": last.mean(),
                "last_std": last.std(),
                "best_mean": best.mean(),
                "best_std": best.std(),
                **interval_columns(point, ci),
                "mu": mu_value,
                "updates_per_s": None if None in speeds else float(np.mean(speeds)),
                "seed_list": " ".join(str(r["config"]["seed"]) for r in group),
                "last_scores": " ".join(repr(float(x)) for x in last),
                "best_scores": " ".join(repr(float(x)) for x in best),
            }
        )
        curves[(dataset_id, grid, n)] = [r["summary"]["history"] for r in group], col
    # over datasets: the runs x datasets matrix of last normalized scores, bootstrapped within each dataset (stratified)
    for grid, n in sorted({(row["grid"], row["N"]) for row in rows}):
        same = [row for row in rows if (row["grid"], row["N"]) == (grid, n) and row["metric"] != "return"]
        if len(same) < 2 or len({row["seeds"] for row in same}) > 1:
            continue
        matrix = np.array([[float(x) for x in row["last_scores"].split()] for row in same]).T
        point, ci = interval_estimates(matrix, reps)
        rows.append(
            {
                "dataset_id": f"all {len(same)} datasets",
                "grid": grid,
                "N": n,
                "seeds": len(matrix),
                "metric": "normalized scores",
                "updates": min(row["updates"] for row in same),
                "last_mean": matrix.mean(),
                **interval_columns(point, ci),
            }
        )
    return rows, curves, len(mus)


CSV_COLUMNS = (
    "dataset_id grid N seeds metric updates last_mean last_std best_mean best_std last_iqm last_iqm_ci_low "
    "last_iqm_ci_high last_mean_ci_low last_mean_ci_high mu updates_per_s seed_list last_scores best_scores"
).split()


def write_results(sweep_dir: str, out_dir: str, reps: int):
    """results.md, results.csv, the plots, and the per-run data they come from (runs.csv, sweep.json): a results folder
    is itself a sweep_dir that `--results-only` rebuilds all of them from."""
    runs = load_runs(sweep_dir)
    rows, curves, num_mu = summarize(sweep_dir, reps, runs)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(
            {k: repr(float(v)) if isinstance(v, (float, np.floating)) else v for k, v in row.items()} for row in rows
        )
    if runs:
        write_runs_csv(runs, sweep_dir, os.path.join(out_dir, "runs.csv"))
    plots = plot_results(rows, curves, out_dir)
    about = {}
    if os.path.isfile(os.path.join(sweep_dir, "sweep.json")):
        with open(os.path.join(sweep_dir, "sweep.json")) as f:
            about = json.load(f)
        if not os.path.samefile(sweep_dir, out_dir):
            with open(os.path.join(out_dir, "sweep.json"), "w") as f:
                json.dump({k: about[k] for k in ("command", "cpu") if k in about}, f, indent=2)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(results_markdown(rows, plots, about, reps, sweep_dir, num_mu))
    print(
        f"results: {os.path.join(out_dir, 'results.md')}, results.csv and {len(plots)} plots "
        f"({sum(r['dataset_id'][:4] != 'all ' for r in rows)} cells)",
        flush=True,
    )


def pm(mean, std) -> str:
    return f"{mean:.1f} ± {std:.1f}"


def speed(updates_per_s) -> str:
    return "-" if updates_per_s is None else f"{updates_per_s:.1f}"


def results_markdown(rows, plots, about, reps, sweep_dir, num_mu) -> str:
    text = [f"# EMaQ sweep results: `{sweep_dir}`", ""]
    if about.get("command"):
        text += ["Produced by:", "", "```bash", about["command"], "```", ""]
        text += [f"on {about['cpu']}, its runs side by side (one CPU each).", ""] if about.get("cpu") else []
    text += [
        "**Scores.** Each evaluation is the mean return of the test-time policy (Algorithm 1) over the run's "
        "evaluation episodes, as a D4RL-style normalized score (100 x (return - ref min) / (ref max - ref min); the "
        "column `metric` of results.csv names the reference used) or, for datasets without reference scores, the raw "
        "return. "
        "**last** is the final evaluation: what papers report. **best** is the best evaluation during training: "
        "optimistic, since it picks the maximum over evaluations, shown only beside *last*. "
        "mean ± std are over seeds (std with ddof 0). **IQM** is the interquartile mean of the *last* scores over "
        f"seeds with its 95% stratified bootstrap confidence interval (rliable, Agarwal et al. 2021; {reps} "
        "resamples); "
        "rliable's IQM trims floor(n/4) runs from each end, so with fewer than 4 seeds it equals the mean. "
        "**mu** is mu alone (one sample of mu(a|s) per step, no Q): the behavior-cloning baseline, from the dataset's "
        "mu run that every N loaded. "
        "**updates/s** is a run's median rate of Q updates between log points (TensorBoard's charts/SPS, "
        "evaluations excluded), the mean over seeds.",
        "",
    ]
    text += ["![score_vs_N.png](score_vs_N.png)", ""] if "score_vs_N.png" in plots else []
    for dataset_id in dict.fromkeys(row["dataset_id"] for row in rows):
        own = [row for row in rows if row["dataset_id"] == dataset_id]
        text += [f"## {dataset_id}", ""]
        if "last_std" in own[0]:
            text += [
                f"mu alone: **{own[0]['mu']:.1f}** ({own[0]['metric']}); {own[0]['updates']:,} updates per run.",
                "",
                "| N | grid | seeds | last (mean ± std) | IQM of last [95% CI] | best (mean ± std) | mu | updates/s |",
                "|---|---|---|---|---|---|---|---|",
            ]
            text += [
                f"| {row['N']} | {row['grid'] or '-'} | {row['seeds']} | **{pm(row['last_mean'], row['last_std'])}** | "
                f"{row['last_iqm']:.1f} [{row['last_iqm_ci_low']:.1f}, {row['last_iqm_ci_high']:.1f}] | "
                f"{pm(row['best_mean'], row['best_std'])} | {row['mu']:.1f} | {speed(row['updates_per_s'])} |"
                for row in own
            ]
        else:
            text += [
                "Last normalized score over the runs of these datasets (the bootstrap resamples within each dataset).",
                "",
                "| N | grid | seeds per dataset | last (mean) | IQM of last [95% CI] |",
                "|---|---|---|---|---|",
            ]
            text += [
                f"| {row['N']} | {row['grid'] or '-'} | {row['seeds']} | {row['last_mean']:.1f} | "
                f"{row['last_iqm']:.1f} [{row['last_iqm_ci_low']:.1f}, {row['last_iqm_ci_high']:.1f}] |"
                for row in own
            ]
        text += [""] + [f"![{name}]({name})" for name in plots if name.startswith(slug(dataset_id) + "_")] + [""]
    if not rows:
        text += [f"No finished EMaQ runs yet ({num_mu} mu runs).", ""]
    return "\n".join(text)


def plot_results(rows, curves, out_dir) -> list:
    """Per dataset: score against N (Figure 1 style: the mean, its 95% CI as a band, mu as a line), learning curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    datasets = list(dict.fromkeys(row["dataset_id"] for row in rows if "last_std" in row))
    for dataset_id in datasets:
        own = [row for row in rows if row["dataset_id"] == dataset_id]
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        draw_score_vs_n(ax, own)
        fig.tight_layout()
        names.append(f"{slug(dataset_id)}_score_vs_N.png")
        fig.savefig(os.path.join(out_dir, names[-1]), dpi=110)
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        keys = [key for key in curves if key[0] == dataset_id]
        colors = plt.cm.viridis(np.linspace(0, 0.9, len(keys)))
        for color, key in zip(colors, sorted(keys, key=lambda k: (k[1], k[2])), strict=True):
            histories, col = curves[key]
            steps = sorted(set.intersection(*[{h[0] for h in hist} for hist in histories]))
            value = np.array([[dict((h[0], h[col]) for h in hist)[s] for s in steps] for hist in histories])
            ax.plot(steps, value.mean(0), color=color, label=f"N={key[2]} {key[1]}".strip())
            ax.fill_between(steps, value.mean(0) - value.std(0), value.mean(0) + value.std(0), color=color, alpha=0.15)
        ax.axhline(own[0]["mu"], color="gray", linestyle="--", label="mu alone")
        ax.set_xlabel("Q updates")
        ax.set_ylabel(own[0]["metric"].replace("_", " "))
        ax.set_title(f"{dataset_id}\nmean ± std over seeds", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        names.append(f"{slug(dataset_id)}_learning_curves.png")
        fig.savefig(os.path.join(out_dir, names[-1]), dpi=110)
        plt.close(fig)
    if len(datasets) > 1:  # every dataset's score against N side by side: the figure a README shows
        fig, axes = plt.subplots(1, len(datasets), figsize=(4.2 * len(datasets), 3.6), squeeze=False)
        for ax, dataset_id in zip(axes[0], datasets, strict=True):
            draw_score_vs_n(ax, [row for row in rows if row["dataset_id"] == dataset_id])
        fig.tight_layout()
        names.append("score_vs_N.png")
        fig.savefig(os.path.join(out_dir, names[-1]), dpi=110)
        plt.close(fig)
    return names


def draw_score_vs_n(ax, own: list):
    """A dataset's last score against N (Figure 1's style): the mean over seeds, its 95% CI as a band, mu as a line."""
    for grid in dict.fromkeys(row["grid"] for row in own):
        line = sorted((row for row in own if row["grid"] == grid), key=lambda row: row["N"])
        ns = [row["N"] for row in line]
        ax.plot(ns, [row["last_mean"] for row in line], "o-", label=f"EMaQ {grid}".strip() + " (mean of last)")
        ax.fill_between(
            ns, [row["last_mean_ci_low"] for row in line], [row["last_mean_ci_high"] for row in line], alpha=0.25
        )
    ax.axhline(own[0]["mu"], color="gray", linestyle="--", label="mu alone")
    all_ns = sorted({row["N"] for row in own})
    ax.set_xscale("log")
    ax.set_xticks(all_ns, [str(n) for n in all_ns])
    ax.minorticks_off()
    ax.set_xlabel("N (samples from mu)")
    ax.set_ylabel(f"last {own[0]['metric']}".replace("_", " "))
    ax.set_title(f"{own[0]['dataset_id']}\n{own[0]['seeds']} seeds, band: 95% bootstrap CI of the mean", fontsize=9)
    ax.legend(fontsize=7)


if __name__ == "__main__":
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)  # everything after a lone -- goes to every run unchanged
    args = tyro.cli(Args, args=argv[:cut])
    args = dataclasses.replace(args, flags=" ".join([args.flags, shlex.join(argv[cut + 1 :])]).strip())
    # A scheduler's SIGTERM stops the sweep like Ctrl-C; so does SIGINT when a shell started the sweep in the background
    # (such jobs inherit SIGINT ignored, and `kill -INT` must still stop it)
    for stop in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop, signal.default_int_handler)
    if args.results_only:
        write_results(args.sweep_dir, args.results_dir or args.sweep_dir, args.bootstrap_reps)
        sys.exit(0)
    sys.exit(sweep(args))
