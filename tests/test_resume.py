"""Crash safety of emaq_offline.py: atomic checkpoints, exact resume after SIGKILL, signals, determinism, guards."""

import errno
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, TINY, run_script

import emaq_offline as eo

DATASET = ["--dataset-id", "emaq/Hopper-v5/random_2000-v0"]
LONG = [
    *TINY,
    *"--behavior-updates 60 --total-updates 200 --checkpoint-every 10 --eval-every 50".split(),
]


def only_run(runs_dir):
    (run_dir,) = glob.glob(os.path.join(runs_dir, "*"))
    return run_dir


def final_state(run_dir):
    model = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)
    mu = torch.load(os.path.join(run_dir, "mu.pt"), weights_only=True)["state_dict"]
    history = json.load(open(os.path.join(run_dir, "summary.json")))["history"]
    return model, mu, history


def assert_same_run(a, b):
    """The same evaluations and every weight of the Q ensemble, its target and mu equal to the bit (CPU)."""
    (model_a, mu_a, hist_a), (model_b, mu_b, hist_b) = final_state(a), final_state(b)
    assert hist_a == hist_b and len(hist_a) == 4
    for part in ("q_ensemble", "q_target"):
        for key in model_a[part]:
            assert torch.equal(model_a[part][key], model_b[part][key]), (part, key)
    for key in mu_a:
        assert torch.equal(mu_a[key], mu_b[key]), ("mu", key)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    runs = str(tmp_path_factory.mktemp("uninterrupted"))
    result = run_script("emaq_offline.py", *DATASET, "--runs-dir", runs, *LONG)
    assert result.returncode == 0, result.stderr[-3000:]
    return only_run(runs)


def test_same_seed_gives_identical_metrics_and_weights_on_cpu(tmp_path, uninterrupted):
    result = run_script("emaq_offline.py", *DATASET, "--runs-dir", str(tmp_path), *LONG)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_run(uninterrupted, only_run(str(tmp_path)))
    other = run_script("emaq_offline.py", *DATASET, "--runs-dir", str(tmp_path / "other"), *LONG, "--seed", "2")
    assert other.returncode == 0, other.stderr[-3000:]
    assert final_state(only_run(str(tmp_path / "other")))[2] != final_state(uninterrupted)[2]  # the seed matters


def start(runs_dir):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(
        [sys.executable, "emaq_offline.py", *DATASET, "--runs-dir", runs_dir, *LONG],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


ORDER = {"behavior": 0, "emaq": 1, "done": 2}


def wait_for_checkpoint(runs_dir, phase, min_step, proc, timeout=300):
    """Poll checkpoint.json until the run has checkpointed at (phase, step >= min_step) or later."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for path in glob.glob(os.path.join(runs_dir, "*", "checkpoint.json")):
            try:
                meta = json.load(open(path))
            except ValueError:
                continue
            if (ORDER[meta["phase"]], meta["step"]) >= (ORDER[phase], min_step):
                return os.path.dirname(path)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.005)
    raise TimeoutError(phase)


def wait_past_the_checkpoint(run_dir, proc):
    """Read the run's progress bars (stderr) until they show an update past its last checkpoint (checkpoint.json, read
    once): a kill then lands after updates that this checkpoint does not hold (a later one may), never on it."""
    meta = json.load(open(os.path.join(run_dir, "checkpoint.json")))
    checkpointed, seen = (ORDER[meta["phase"]], meta["step"]), b""
    while True:
        chunk = os.read(proc.stderr.fileno(), 4096)
        assert chunk, f"the run ended before it passed {meta}: {seen.decode()[-2000:]}"
        seen += chunk
        shown = [(0, int(n)) for n in re.findall(rb"mu:[^|]*\|[^|]*\| *(\d+)/", seen)]
        shown += [(1, int(n)) for n in re.findall(rb"EMaQ:[^|]*\|[^|]*\| *(\d+)/", seen)]
        if max(shown, default=(-1, 0)) > checkpointed:
            return


@pytest.mark.parametrize("phase, min_step", [("behavior", 20), ("emaq", 60)])
def test_sigkill_between_checkpoints_then_resume_matches_the_uninterrupted_run(
    tmp_path, uninterrupted, phase, min_step
):
    proc = start(str(tmp_path))
    run_dir = wait_for_checkpoint(str(tmp_path), phase, min_step, proc)
    wait_past_the_checkpoint(run_dir, proc)  # between two checkpoints: the kill loses updates
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not os.path.exists(os.path.join(run_dir, "summary.json"))
    resumed = run_script("emaq_offline.py", "--resume", run_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stderr
    assert_same_run(uninterrupted, run_dir)


def test_sigterm_writes_a_checkpoint_and_prints_the_resume_command(tmp_path, uninterrupted):
    proc = start(str(tmp_path))
    run_dir = wait_for_checkpoint(str(tmp_path), "emaq", 30, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert f"Resume with: python emaq_offline.py --resume {run_dir}" in stderr and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].startswith("stopped by signal 15")  # the last thing on the screen
    meta = json.load(open(os.path.join(run_dir, "checkpoint.json")))
    assert meta["phase"] == "emaq" and f"update {meta['step']}" in stderr
    resumed = run_script("emaq_offline.py", "--resume", run_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(uninterrupted, run_dir)


# ----- refusals ---------------------------------------------------------------------------------------
from test_offline import assert_clean_failure  # noqa: E402


def test_resume_refuses_another_dataset_or_changed_flags(uninterrupted, tmp_path):
    import shutil

    run_dir = str(tmp_path / "copy")
    shutil.copytree(uninterrupted, run_dir)
    state = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)
    state["phase"] = "emaq"  # pretend it was interrupted
    torch.save(state, os.path.join(run_dir, "checkpoint.pt"))
    result = run_script("emaq_offline.py", "--resume", run_dir, "--dataset-id", "emaq/Walker2d-v5/random_2000-v0")
    assert_clean_failure(
        result, "cannot resume", "--dataset-id emaq/Walker2d-v5/random_2000-v0", "emaq/Hopper-v5/random_2000-v0"
    )
    assert_clean_failure(
        run_script("emaq_offline.py", "--resume", run_dir, "--num-samples", "7"), "--num-samples 7 (the run has 4)"
    )
    assert_clean_failure(run_script("emaq_offline.py", "--resume", uninterrupted), "already finished")


def test_truncated_checkpoint_is_refused_and_left_untouched(uninterrupted, tmp_path):
    import shutil

    run_dir = str(tmp_path / "copy")
    shutil.copytree(uninterrupted, run_dir)
    path = os.path.join(run_dir, "checkpoint.pt")
    blob = open(path, "rb").read()
    open(path, "wb").write(blob[: len(blob) // 2])
    result = run_script("emaq_offline.py", "--resume", run_dir)
    assert_clean_failure(result, "truncated or not a checkpoint", "nothing was overwritten")
    assert open(path, "rb").read() == blob[: len(blob) // 2]
    torch.save({"something": "else"}, path)  # a foreign (tampered) file
    assert_clean_failure(run_script("emaq_offline.py", "--resume", run_dir), "truncated or not a checkpoint")


def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    real_save, calls = torch.save, []

    def save_until_disk_full(obj, f, *a, **k):
        if isinstance(f, str) and f.endswith("checkpoint.pt.tmp"):
            calls.append(f)
            if len(calls) == 3:  # the third checkpoint finds the disk full half-way through
                open(f, "wb").write(b"partial")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(eo.torch, "save", save_until_disk_full)
    monkeypatch.setattr(eo.signal, "signal", lambda *a: None)  # keep pytest's own Ctrl-C handler
    args = eo.cli([*DATASET, "--runs-dir", str(tmp_path), *LONG])
    with pytest.raises(SystemExit) as exit_info:
        eo.main(args)
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "No space left on device" in message and "behavior update 20" in message and "--resume" in message
    run_dir = only_run(str(tmp_path))
    assert json.load(open(os.path.join(run_dir, "checkpoint.json"))) == {"phase": "behavior", "step": 20}
    assert torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)["step"] == 20
    assert not glob.glob(os.path.join(run_dir, "*.tmp"))


def test_non_finite_values_stop_the_run_naming_the_update_and_checkpoint(tmp_path):
    result = run_script("emaq_offline.py", *DATASET, "--runs-dir", str(tmp_path), *LONG, "--q-lr", "1e30")
    assert_clean_failure(result, "NaN/Inf at update", "checkpoint.pt (behavior update 60)")
    bad = int(result.stderr.split("NaN/Inf at update ")[1].split(";")[0])
    assert 1 <= bad <= 10  # found at the exact update, not only at the next log step


def test_unwritable_run_directory(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = run_script("emaq_offline.py", *DATASET, "--runs-dir", str(blocker / "runs"), *TINY)
    assert_clean_failure(result, "cannot write the run directory", "--runs-dir")


# ----- memory -----------------------------------------------------------------------------------------
def test_target_is_chunked_to_fit_memory_and_refused_when_impossible():
    torch.manual_seed(0)
    args = eo.Args(num_samples=6, num_qs=3, q_hidden=16, batch_size=10, target_memory_gb=None)
    mu = eo.BehaviorModel(4, [-1, -1], [1, 1], state_hidden=8, embed_dim=8, head_hidden=8, head_layers=1, num_bins=5)
    q = eo.QEnsemble(4, 2, 3, hidden=16, layers=2)
    per_state = 4 * 6 * (3 * 3 * 16 + 4 * 8 + 3 * 5)
    args.target_memory_gb = 3.5 * per_state / 2**30
    assert eo.target_states_per_chunk(args, mu, torch.device("cpu")) == 3
    rewards, next_obs, terminals = torch.randn(10), torch.randn(10, 4), torch.zeros(10)
    torch.manual_seed(1)
    chunked = eo.emaq_target(mu, q, rewards, next_obs, terminals, args, states_per_chunk=3)
    torch.manual_seed(1)  # the same samples, valued all at once
    samples = mu.sample(next_obs, 6)
    whole = rewards + args.gamma * eo.ensemble(q(next_obs, samples), 1.0).max(-1).values
    torch.testing.assert_close(chunked, whole)
    args.target_memory_gb = 0.5 * per_state / 2**30
    with pytest.raises(SystemExit):
        eo.target_states_per_chunk(args, mu, torch.device("cpu"))


def test_impossible_target_memory_is_refused_up_front(tmp_path):
    result = run_script(
        "emaq_offline.py",
        *DATASET,
        "--runs-dir",
        str(tmp_path),
        *TINY,
        "--num-samples",
        "100000",
        "--target-memory-gb",
        "0.001",
    )
    assert_clean_failure(result, "GiB per state (N=100000)", "lower --num-samples")


def test_a_finished_run_extended_to_more_updates_equals_the_longer_run(tmp_path, uninterrupted):
    """--resume RUN --total-updates 400 continues a finished 200-update run; it ends with exactly the weights and the
    evaluations of a 400-update run (evaluation draws from its own generator, so it never moves the training's)."""
    import shutil

    extended = str(tmp_path / "extended")
    shutil.copytree(uninterrupted, extended)
    result = run_script("emaq_offline.py", "--resume", extended, "--total-updates", "400")
    assert result.returncode == 0, result.stderr[-3000:]
    longer = run_script(
        "emaq_offline.py", *DATASET, "--runs-dir", str(tmp_path / "longer"), *LONG, "--total-updates", "400"
    )
    assert longer.returncode == 0, longer.stderr[-3000:]
    (model_a, mu_a, hist_a), (model_b, mu_b, hist_b) = (
        final_state(extended),
        final_state(only_run(str(tmp_path / "longer"))),
    )
    assert [h[0] for h in hist_a] == [50, 100, 150, 200, 250, 300, 350, 400] and hist_a == hist_b
    for part in ("q_ensemble", "q_target"):
        for key, value in model_a[part].items():
            torch.testing.assert_close(value, model_b[part][key], rtol=0, atol=0)
    for key in mu_a:
        torch.testing.assert_close(mu_a[key], mu_b[key], rtol=0, atol=0)
    assert json.load(open(os.path.join(extended, "config.json")))["total_updates"] == 400
    assert_clean_failure(
        run_script("emaq_offline.py", "--resume", extended, "--total-updates", "300"), "already finished"
    )


def test_a_killed_dataset_generation_leaves_nothing_and_the_next_run_generates_it(tmp_path):
    import minari

    dataset_id = "emaq/Hopper-v5/random_30000-v0"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    args = ["--dataset-id", dataset_id, "--runs-dir", str(tmp_path), *TINY]
    # 1. SIGKILL while stepping the environment
    proc = subprocess.Popen(
        [sys.executable, "emaq_offline.py", *args], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True
    )
    while "generating" not in proc.stderr.readline():
        assert proc.poll() is None
    proc.kill()
    proc.wait()
    # 2. killed after the dataset was written, before it was moved into place (the last moment a kill can hurt)
    die_at_rename = (
        "import os, sys, runpy; real = os.replace; "
        "staged = lambda a, b: '.emaq-generating' in str(a) and '.emaq-generating' not in str(b); "
        "os.replace = lambda a, b: os._exit(9) if staged(a, b) else real(a, b); "
        "sys.argv = ['emaq_offline.py'] + sys.argv[1:]; runpy.run_path('emaq_offline.py', run_name='__main__')"
    )
    killed = subprocess.run(
        [sys.executable, "-c", die_at_rename, *args], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert killed.returncode == 9, killed.stderr[-2000:]
    root = os.environ["MINARI_DATASETS_PATH"]
    assert dataset_id not in minari.list_local_datasets() and not os.path.exists(os.path.join(root, dataset_id))
    assert glob.glob(os.path.join(root, ".emaq-generating-*"))  # what the kill left, hidden from Minari
    result = run_script("emaq_offline.py", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert dataset_id in minari.list_local_datasets() and minari.load_dataset(dataset_id).total_steps == 30000
    assert not glob.glob(os.path.join(root, ".emaq-generating-*"))  # the dead generations' folders were removed


def test_a_stop_signal_never_checkpoints_a_non_finite_state(tmp_path):
    """SIGTERM after the losses went NaN (between log steps): no checkpoint of that state; the error names the update
    and the last good checkpoint, which is left as it was."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    flags = [
        *DATASET,
        "--runs-dir",
        str(tmp_path),
        *TINY,
        "--behavior-updates",
        "60",
        "--checkpoint-every",
        "60",
        "--total-updates",
        "100000",
        "--log-every",
        "100000",
        "--eval-every",
        "100000",
        "--q-lr",
        "1e30",
        "--num-samples",
        "1000",  # slow EMaQ updates: the signal lands before the next periodic checkpoint (EMaQ update 60)
    ]
    proc = subprocess.Popen([sys.executable, "emaq_offline.py", *flags], cwd=ROOT, env=env, stderr=subprocess.PIPE)
    stderr, done = b"", 0
    while done < 3:  # the signal goes once the progress bar shows 3 EMaQ updates (NaN from the second): no race
        chunk = os.read(proc.stderr.fileno(), 4096)
        assert chunk, stderr.decode()[-2000:]
        stderr += chunk
        done = max([0, *map(int, re.findall(rb"EMaQ:[^|]*\|[^|]*\| *(\d+)/100000", stderr))])
    assert done < 60, f"{done} updates before the signal: slow them with a larger --num-samples"
    proc.send_signal(signal.SIGTERM)
    stderr = (stderr + proc.communicate(timeout=120)[1]).decode()
    result = subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr)
    assert_clean_failure(result, "NaN/Inf at update", "checkpoint.pt (behavior update 60)")
    assert json.load(open(os.path.join(only_run(str(tmp_path)), "checkpoint.json"))) == {
        "phase": "behavior",
        "step": 60,
    }


def test_an_extended_run_has_exactly_the_evaluations_of_the_longer_run(tmp_path):
    """A finished 30-update run (evaluations at 20 and, its last, 30) extended to 40 updates drops the evaluation at 30,
    which a 40-update run never made: both histories are [20, 40], equal to the last digit."""
    short, longer = str(tmp_path / "short"), str(tmp_path / "longer")
    for runs, total in ((short, "30"), (longer, "40")):
        result = run_script("emaq_offline.py", *DATASET, "--runs-dir", runs, *TINY, "--total-updates", total)
        assert result.returncode == 0, result.stderr[-3000:]
    extended = run_script("emaq_offline.py", "--resume", only_run(short), "--total-updates", "40")
    assert extended.returncode == 0, extended.stderr[-3000:]
    history = json.load(open(os.path.join(only_run(short), "summary.json")))["history"]
    assert [h[0] for h in history] == [20, 40] and history == final_state(only_run(longer))[2]


def test_a_flag_passed_on_resume_with_args_default_value_is_not_ignored(tmp_path):
    """The run used N = 4; `--num-samples 10` is Args' default, and is refused like any other changed flag (it was
    once silently ignored); passing the run's own value is accepted."""
    runs = str(tmp_path / "runs")
    result = run_script("emaq_offline.py", *DATASET, "--runs-dir", runs, *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = only_run(runs)
    refused = run_script("emaq_offline.py", "--resume", run_dir, "--num-samples", "10", "--total-updates", "60")
    assert_clean_failure(refused, "cannot resume", "--num-samples 10 (the run has 4)")
    same = run_script("emaq_offline.py", "--resume", run_dir, "--num-samples", "4", "--total-updates", "60")
    assert same.returncode == 0, same.stderr[-3000:]
