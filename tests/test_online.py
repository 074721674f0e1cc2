"""emaq_online.py: the exploration rule, autoreset-safe transitions, a smoke run with videos (by the tool), M > 1, bad
input, NaN, the speed path, checkpoints and resume (in fresh environments), and flags on --resume."""

import dataclasses
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import gymnasium as gym
import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from conftest import ROOT, run_script
from test_offline import assert_clean_failure, tensorboard_tags

import emaq_offline as eo
import emaq_online as eon
from behavior_model import BehaviorModel, VAEBehaviorModel

ONLINE_TINY = (
    "--env-id InvertedPendulum-v5 --total-timesteps 400 --learning-starts 150 --eval-every 200 "
    "--eval-episodes 2 --behavior-preset table3 --num-qs 2 --q-hidden 32 --q-layers 2 --num-samples 8 "
    "--batch-size 32 --log-every 50"
).split()


def only_run(runs_dir):
    (run_dir,) = glob.glob(os.path.join(str(runs_dir), "*"))
    return run_dir


def checkpoint(run_dir):
    return torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)


def test_exploration_takes_the_highest_ucb_candidate_exactly():
    q = torch.tensor(
        [  # [K=3, B=2, N=4]
            [[1.0, 0.0, 2.0, 0.5], [0.0, 0.0, 0.0, 3.0]],
            [[1.0, 4.0, 2.0, 0.5], [1.0, 0.0, 0.0, 3.0]],
            [[1.0, 0.0, 2.0, 0.6], [2.0, 0.0, 0.0, 3.0]],
        ]
    )
    candidates, obs, draws = torch.arange(2 * 4 * 2, dtype=torch.float32).view(2, 4, 2), torch.randn(2, 3), []
    mu = SimpleNamespace(sample=lambda o, n, temperature: draws.append((o, n, temperature)) or candidates)

    def q_ensemble(o, actions):  # the K members' values of exactly mu's N candidates
        assert o is obs and actions is candidates
        return q

    def explore(beta):
        return eon.explore(mu, q_ensemble, obs, eon.Args(num_samples=4, temperature=5.0, ucb_beta=beta))

    # beta = 0: best mean -> state 0 candidate 2 (mean 2.0); state 1 candidate 3 (mean 3.0)
    assert torch.equal(explore(0.0), candidates[[0, 1], [2, 3]])
    # beta = 1: state 0 candidate 1 has mean 4/3 and population std 1.886 -> 3.22 > 2.0
    assert torch.equal(explore(1.0), candidates[[0, 1], [1, 3]])
    # beta = 2.25, state 1: candidate 0 (values 0, 1, 2) scores 1 + 2.25 * 0.816 = 2.84 with the population std (eq. 67
    # over the K members), below candidate 3's 3.0; the sample std (1.0) would give 3.25 and pick candidate 0
    assert torch.equal(explore(2.25), candidates[[0, 1], [1, 3]])
    assert all(o is obs and (n, t) == (4, 5.0) for o, n, t in draws) and len(draws) == 3  # N samples at --temperature


def test_transitions_never_join_two_episodes_across_autoreset():
    seed, steps, num = 5, 150, 3
    envs = gym.vector.SyncVectorEnv([lambda: gym.make("InvertedPendulum-v5", max_episode_steps=7)] * num)
    envs.action_space.seed(seed)
    buf = eon.make_buffer(1000, 4, 1, "cpu")
    obs, _ = envs.reset(seed=seed)
    autoreset, actions_taken = np.zeros(num, dtype=bool), []
    for _ in range(steps):
        actions = envs.action_space.sample()
        actions_taken.append(actions)
        obs, autoreset, real, _ = eon.step_and_store(envs, obs, actions, autoreset, buf)
    keys = ("obs", "actions", "rewards", "next_obs", "terminals", "truncated", "env")
    stored = {k: buf[k][: buf["size"]].numpy() for k in keys}
    assert stored["terminals"].any() and (stored["truncated"] > stored["terminals"]).any(), "need both kinds of ending"

    for i in range(
        num
    ):  # replay each sub-env alone with the same actions: the stored transitions must be exactly these
        env = gym.make("InvertedPendulum-v5", max_episode_steps=7)
        o, _ = env.reset(seed=seed + i)
        expected, pending_reset = [], False
        for actions in actions_taken:
            if pending_reset:  # the vector env spends this step on the reset
                o, _ = env.reset()
                pending_reset = False
                continue
            o2, r, term, trunc, _ = env.step(actions[i])
            expected.append((o, actions[i], r, o2, term, trunc))
            o, pending_reset = o2, term or trunc
        rows = stored["env"] == i
        assert rows.sum() == len(expected)
        for col, key in enumerate(keys[:-1]):
            want = np.array([e[col] for e in expected], np.float32).reshape(stored[key][rows].shape)
            np.testing.assert_allclose(stored[key][rows], want, rtol=1e-6, err_msg=key)
        # no transition leads from an episode's end into the next start: after an ending, the next obs is a fresh reset
        ends = np.nonzero(stored["terminals"][rows] + stored["truncated"][rows])[0]
        assert all(
            not np.allclose(stored["next_obs"][rows][e], stored["obs"][rows][e + 1]) for e in ends if e + 1 < rows.sum()
        )


def test_smoke_run_on_a_real_mujoco_env_then_videos_of_the_saved_run(tmp_path):
    result = run_script("emaq_online.py", *ONLINE_TINY, "--runs-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = only_run(tmp_path)
    tags = tensorboard_tags(run_dir)
    assert len(tags["eval/episodic_return"]) == 2 and all(np.isfinite(tags["eval/episodic_return"]))
    assert all(tag in tags for tag in ("charts/episodic_return", "losses/qf_loss", "losses/behavior_nll", "charts/SPS"))
    assert not any(tag.startswith(("charts/mfu", "charts/estimated")) for tag in tags)
    assert "400 env steps, 251 updates" in result.stdout  # updates start at --learning-starts, one per env step
    final = checkpoint(run_dir)  # the last checkpoint is the saved model
    assert final["counters"]["done"] and final["counters"]["num_updates"] == 251
    # tools/evaluate_online_run.py --capture-video: the first episode of each N's evaluation as an mp4
    assert not os.path.exists(os.path.join(run_dir, "videos"))  # training records none
    tool = run_script("tools/evaluate_online_run.py", run_dir, "--ns", "1", "4", "--episodes", "2", "--capture-video")
    assert tool.returncode == 0, tool.stderr[-3000:]
    assert sorted(os.listdir(os.path.join(run_dir, "videos"))) == ["eval_N1.mp4", "eval_N4.mp4"]
    for name in os.listdir(os.path.join(run_dir, "videos")):
        reader = imageio.get_reader(os.path.join(run_dir, "videos", name))
        meta, frames = reader.get_meta_data(), [frame for frame in reader]
        assert meta["size"] == (320, 240) and meta["fps"] == 25  # InvertedPendulum-v5's render_fps
        assert len(frames) >= 2 and frames[0].shape == (240, 320, 3)


def test_capture_video_without_a_renderer_says_so_in_one_line_and_goes_on(tmp_path):
    """tools/evaluate_online_run.py --capture-video where MuJoCo cannot render: one note, the returns, no videos."""
    result = run_script("emaq_online.py", *ONLINE_TINY, "--total-timesteps", "200", "--runs-dir", str(tmp_path))
    assert result.returncode == 0 and "200 env steps, 51 updates" in result.stdout, result.stderr[-3000:]
    no_egl = {"MUJOCO_GL": "egl", "__EGL_VENDOR_LIBRARY_FILENAMES": "/no/such/egl_vendor.json"}
    flags = ("--ns", "2", "--episodes", "2", "--capture-video")
    result = run_script("tools/evaluate_online_run.py", only_run(tmp_path), *flags, env=no_egl)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    notes = [line for line in result.stderr.splitlines() if "--capture-video" in line]
    assert len(notes) == 1 and notes[0].startswith("note: ") and "MUJOCO_GL" in notes[0], notes
    assert "N = 2: return" in result.stdout and not os.path.exists(os.path.join(only_run(tmp_path), "videos"))


def test_online_runs_with_the_vae_behavior_model(tmp_path):
    short = (
        "--total-timesteps",
        "200",
        "--behavior-model",
        "vae",
    )  # the VAE's sizes are fixed (1024 wide): few updates
    result = run_script("emaq_online.py", *ONLINE_TINY, *short, "--runs-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = only_run(tmp_path)
    VAEBehaviorModel(4, [-3.0], [3.0]).load_state_dict(checkpoint(run_dir)["mu"])  # strict: it is the VAE's
    assert all(np.isfinite(tensorboard_tags(run_dir)["eval/episodic_return"]))


def test_deployment_efficient_batches_update_only_between_collections(tmp_path):
    flags = ("--trajectory-batch-size", "100", "--total-timesteps", "300")
    result = run_script("emaq_online.py", *ONLINE_TINY, *flags, "--runs-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "300 env steps, 200 updates" in result.stdout  # M = 100: cycles of 100 steps, then 100 updates (from 150)


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--env-id", "CartPole-v1"], ["CartPole-v1", "Discrete", "supports a continuous gymnasium.spaces.Box"]),
        (["--env-id", "tests.unbounded_env:UnboundedInvertedPendulum-v0"], ["infinite"]),
        (["--env-id", "NoSuchEnv-v9"], ["cannot make environment 'NoSuchEnv-v9'"]),
        (["--trajectory-batch-size", "0"], ["--trajectory-batch-size must be >= 1, got 0"]),
        (["--num-samples", "0"], ["--num-samples (N) must be >= 1, got 0"]),
    ],
)
def test_bad_input_gets_one_clear_line(tmp_path, flags, words):
    assert_clean_failure(run_script("emaq_online.py", "--runs-dir", str(tmp_path), *flags), *words)


def test_non_finite_values_stop_the_run_naming_the_update_and_checkpoint(tmp_path):
    result = run_script(
        "emaq_online.py", *ONLINE_TINY, "--runs-dir", str(tmp_path), "--q-lr", "1e30", "--checkpoint-every", "100"
    )
    assert_clean_failure(result, "NaN/Inf at update", "checkpoint.pt (env step")
    bad = int(result.stderr.split("NaN/Inf at update ")[1].split(";")[0])
    assert 1 <= bad <= 50  # the exact update, found at the next log step (--log-every 50)


def test_online_speed_path_compiles_the_shared_update_and_refreshes_the_bf16_copies(tmp_path, monkeypatch):
    """--precision bf16 --compile on, on the CPU: the online update goes through compile_update (torch.compile called
    once, on the CPU without CUDA graphs), and the target reads bf16 copies of mu and of the target ensemble that equal
    fresh copies of the final fp32 models (mu's is refreshed after each of its online steps); output layers: fp32."""
    compiled, copies = [], []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(kw) or fn)  # the wrapper runs; no compiler
    real_copy = eon.bf16_copy
    monkeypatch.setattr(eon, "bf16_copy", lambda module, keep: copies.append(real_copy(module, keep)) or copies[-1])
    monkeypatch.setattr(eon.signal, "signal", lambda *a: None)  # keep pytest's own handlers
    flags = dict(total_timesteps=200, learning_starts=150, eval_every=200, eval_episodes=2, behavior_preset="table3")
    flags |= dict(num_qs=2, q_hidden=32, q_layers=2, num_samples=8, batch_size=32, log_every=50)
    args = eon.Args(env_id="InvertedPendulum-v5", runs_dir=str(tmp_path), precision="bf16", compile="on", **flags)
    result = eon.main(args)
    assert result["num_updates"] == 200 - 150 + 1  # an update after every step from step 150 on
    assert compiled == [{"mode": None, "dynamic": False}]
    final = checkpoint(only_run(tmp_path))
    assert len(copies) == 2  # the run's two read copies, made once
    for copy, final_state, outputs in (
        (copies[0], final["mu"], eon.MU_OUTPUT),
        (copies[1], final["q_target"], eon.Q_OUTPUT),
    ):
        for name, p in copy.named_parameters():
            expected = final_state[name] if name.split(".")[0] in outputs else final_state[name].to(torch.bfloat16)
            assert p.dtype == expected.dtype and torch.equal(p, expected), name


def test_both_scripts_resolve_the_speed_flags_alike():
    for flags in (dict(), dict(precision="fp32"), dict(compile="on"), dict(compile="off", precision="bf16")):
        offline = eo.check_args(eo.Args(**flags), torch.device("cpu"))
        online = eon.check_args(eon.Args(**flags), torch.device("cpu"))
        assert (online.precision, online.compile, online.cudagraphs) == (offline.precision, offline.compile, "off")


# ----- checkpoints and resume ------------------------------------------------------------------------------------
def assert_same(a, b, where):
    """Equal nested state dicts: every tensor bit for bit, everything else =="""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert torch.equal(a, b) if torch.is_tensor(a) else a == b, where


def test_a_checkpoint_restores_models_optimizers_buffer_counters_and_rngs_exactly(tmp_path):
    """save_checkpoint then restore_checkpoint into fresh models: every tensor as it was; the newest transition of
    each environment ends its episode (truncated, unless it terminated), found in the wrapped buffer's time order."""

    def build(seed):
        torch.manual_seed(seed)
        mu = BehaviorModel.from_preset("table3", 4, [-1.0, -1.0], [1.0, 1.0])
        q = eon.QEnsemble(4, 2, 2, 16, 2)
        models = dict(mu=mu, mu_optimizer=torch.optim.Adam(mu.parameters()), q_ensemble=q)
        models |= dict(q_target=eon.QEnsemble(4, 2, 2, 16, 2), q_optimizer=torch.optim.Adam(q.parameters()))
        obs, actions = torch.randn(8, 4), torch.rand(8, 2) * 2 - 1
        for opt, loss in (
            (models["mu_optimizer"], mu.loss(obs, actions)),
            (models["q_optimizer"], q(obs, actions[:, None]).sum()),
        ):
            loss.backward()
            opt.step()
        return models

    models, buf = build(0), eon.make_buffer(5, 4, 2, "cpu")
    # (env, terminal) in time order; capacity 5: rows 2..6 survive, row 5 (env 0's newest) lands at index 0
    for t, (env, terminal) in enumerate([(0, 0), (1, 0), (0, 0), (1, 1), (0, 0), (0, 0), (1, 1)]):
        row = dict(obs=np.full((1, 4), t), actions=np.zeros((1, 2)), rewards=[t], next_obs=np.full((1, 4), t + 1))
        eon.buffer_add(buf, **row, terminals=[terminal], truncated=[0], env=[env])
    counters = dict(global_step=7, num_updates=3, cycle_steps=1, cycle_updates=0, work=10, history=[[5, 1.5]])
    eon.save_checkpoint(str(tmp_path), counters | dict(done=False), models, buf, torch.tensor(-1))
    expected_draw = torch.rand(3)

    fresh, fresh_buf = build(1), eon.make_buffer(5, 4, 2, "cpu")
    restored = eon.restore_checkpoint(checkpoint(str(tmp_path)), fresh, fresh_buf, num_envs=2)
    assert torch.equal(torch.rand(3), expected_draw)  # the RNGs as they were at the checkpoint
    assert restored == counters | dict(done=False)
    for key, module in models.items():
        assert_same(module.state_dict(), fresh[key].state_dict(), key)
    assert (fresh_buf["ptr"], fresh_buf["size"]) == (buf["ptr"], buf["size"]) == (2, 5)
    for key in ("obs", "actions", "rewards", "next_obs", "terminals", "env"):
        assert torch.equal(fresh_buf[key], buf[key]), key
    assert fresh_buf["truncated"].tolist() == [1, 0, 0, 0, 0]  # env 0's newest (row 5, at 0); env 1's terminated


ONLINE_KILL = (
    "--env-id HalfCheetah-v5 --total-timesteps 300 --learning-starts 100 --eval-every 1000 --behavior-preset table3 "
    "--num-qs 2 --q-hidden 32 --q-layers 2 --num-samples 8 --batch-size 32 --log-every 50 --checkpoint-every 40 "
    "--trajectory-batch-size 30 --num-envs 2 --eval-episodes 1"
).split()  # HalfCheetah's episodes run 1,000 steps: both environments are mid-episode at any kill


def test_online_run_killed_mid_episode_resumes_in_fresh_environments(tmp_path):
    """SIGKILL after learning started (once a checkpoint at step 180 or later exists), then --resume: the buffer, the
    counters and the optimizers go on from the checkpoint; each environment's running episode ends there, truncated,
    and the run goes on in fresh episodes (no transition joins two episodes); the run ends with one update per step
    from --learning-starts on."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "emaq_online.py", *ONLINE_KILL, "--runs-dir", str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    target, deadline = 180, time.time() + 300  # a fixed step: a checkpoint comes every ~27 steps here
    while time.time() < deadline:
        metas = [json.load(open(p)) for p in glob.glob(str(tmp_path / "*" / "checkpoint.json"))]
        if metas and metas[0]["global_step"] >= target:
            break
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    run_dir = only_run(tmp_path)
    shutil.copy(os.path.join(run_dir, "checkpoint.pt"), tmp_path / "killed.pt")
    before = torch.load(tmp_path / "killed.pt", weights_only=True)
    resumed = run_script("emaq_online.py", "--resume", run_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    step, updates = before["counters"]["global_step"], before["counters"]["num_updates"]
    assert f"resuming at step {step}, update {updates}" in resumed.stderr and step < 300

    after = checkpoint(run_dir)
    assert after["counters"]["done"] and after["counters"]["global_step"] == 300
    # M = 30 steps (2 environments), then 30 updates; learning from the cycle that reaches step 100: 300 - 90 updates
    assert after["counters"]["num_updates"] == 210 and "300 env steps, 210 updates" in resumed.stdout
    assert int(after["q_optimizer"]["state"][0]["step"]) == int(after["mu_optimizer"]["state"][0]["step"]) == 210
    old, new, size = before["buffer"], after["buffer"], before["buffer"]["size"]
    for key in ("obs", "actions", "rewards", "next_obs", "terminals", "env"):
        assert torch.equal(new[key][:size], old[key][:size]), key  # the buffer, row for row
    newest = [int(torch.nonzero(old["env"][:size] == i)[-1]) for i in range(2)]
    assert (
        old["truncated"][newest].tolist() == [0, 0] and new["truncated"][:size].nonzero().flatten().tolist() == newest
    )
    for i in range(2):  # within an environment, every transition continues the one before, except across an ending
        rows = torch.nonzero(new["env"][: new["size"]] == i).flatten()
        ended = (new["terminals"][rows] + new["truncated"][rows])[:-1] > 0
        continues = (new["next_obs"][rows[:-1]] == new["obs"][rows[1:]]).all(1)
        assert torch.equal(continues, ~ended), i
        assert ended.sum() == 1 and rows[:-1][ended].tolist() == [newest[i]]  # the checkpoint, then a fresh episode


def test_a_stop_signal_checkpoints_exits_130_and_the_run_resumes(tmp_path):
    """SIGTERM mid-run: a checkpoint at the next step or update, then exit code 130 with one last line that names the
    signal and the resume command; --resume then ends the run with the counts of a run that never stopped."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "emaq_online.py", *ONLINE_KILL, "--runs-dir", str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300  # the first checkpoint (40 steps + updates) comes after the signal handlers
    while not glob.glob(str(tmp_path / "*" / "checkpoint.json")) and time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    stderr = proc.communicate(timeout=300)[1]
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
    run_dir = only_run(tmp_path)
    last = stderr.strip().splitlines()[-1]  # the last thing on the screen
    assert last == f"stopped by signal 15, checkpoint written; resume: python emaq_online.py --resume {run_dir}"
    stopped = checkpoint(run_dir)["counters"]
    assert not stopped["done"] and 0 < stopped["global_step"] < 300
    resumed = run_script("emaq_online.py", "--resume", run_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming at step {stopped['global_step']}, update {stopped['num_updates']}" in resumed.stderr
    assert "300 env steps, 210 updates" in resumed.stdout and checkpoint(run_dir)["counters"]["done"]


def test_a_finished_online_run_extended_to_more_steps(tmp_path):
    """--resume RUN --total-timesteps 200 continues a finished 100-step run (M = 1): its evaluations so far, its buffer
    and its optimizers go on, with one update per step; a smaller total is refused."""
    flags = (
        "--env-id InvertedPendulum-v5 --learning-starts 50 --eval-every 50 --eval-episodes 2 "
        "--behavior-preset table3 --num-qs 2 --q-hidden 32 --q-layers 2 --num-samples 8 --batch-size 32 --log-every 50"
    ).split()
    short = run_script("emaq_online.py", *flags, "--total-timesteps", "100", "--runs-dir", str(tmp_path))
    assert short.returncode == 0, short.stderr[-3000:]
    run_dir = only_run(tmp_path)
    before = checkpoint(run_dir)
    extended = run_script("emaq_online.py", "--resume", run_dir, "--total-timesteps", "200")
    assert extended.returncode == 0, extended.stderr[-3000:]
    after = checkpoint(run_dir)
    history = json.load(open(os.path.join(run_dir, "summary.json")))["history"]
    assert [h[0] for h in history] == [50, 100, 150, 200] and history[:2] == before["counters"]["history"]
    assert after["counters"]["num_updates"] == 151 == int(after["q_optimizer"]["state"][0]["step"])
    for key in ("obs", "actions", "rewards", "next_obs", "terminals", "env"):
        assert torch.equal(after["buffer"][key][:100], before["buffer"][key]), key
    assert json.load(open(os.path.join(run_dir, "config.json")))["total_timesteps"] == 200
    assert_clean_failure(
        run_script("emaq_online.py", "--resume", run_dir, "--total-timesteps", "150"), "already finished"
    )


def test_a_flag_passed_on_resume_is_compared_with_the_runs_own_value(tmp_path):
    """--num-samples 200 (Args' default) on a run made with --num-samples 8 is refused, naming both values; without
    flags, --resume takes the run's own values (so --help shows them)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    saved = eon.Args(env_id="InvertedPendulum-v5", num_samples=8, runs_dir=str(tmp_path))
    json.dump(dataclasses.asdict(saved), open(run_dir / "config.json", "w"))
    result = run_script("emaq_online.py", "--resume", str(run_dir), "--num-samples", "200")
    assert_clean_failure(result, "cannot resume", "--num-samples 200 (the run has 8)")
    assert eon.cli(["--resume", str(run_dir)]) == dataclasses.replace(saved, resume=str(run_dir))
    assert eon.cli(["--resume", str(run_dir), "--total-timesteps", "5"]).total_timesteps == 5
