"""emaq_online.py: the exploration rule, autoreset-safe transitions, a smoke run, the hand-off to offline, bad input."""

import glob
import os

import gymnasium as gym
import minari
import numpy as np
import pytest
import torch
from conftest import TINY, run_script
from test_offline import assert_clean_failure, tensorboard_tags

import emaq_offline as eo
import emaq_online as eon

ONLINE_TINY = (
    "--env-id InvertedPendulum-v5 --total-timesteps 400 --learning-starts 150 --eval-every 200 "
    "--eval-episodes 2 --behavior-preset table3 --num-qs 2 --q-hidden 32 --q-layers 2 --num-samples 8 "
    "--batch-size 32 --log-every 50"
).split()


def test_exploration_takes_the_highest_ucb_candidate_exactly():
    q = torch.tensor(
        [  # [K=3, B=2, N=4]
            [[1.0, 0.0, 2.0, 0.5], [0.0, 0.0, 0.0, 3.0]],
            [[1.0, 4.0, 2.0, 0.5], [1.0, 0.0, 0.0, 3.0]],
            [[1.0, 0.0, 2.0, 0.6], [2.0, 0.0, 0.0, 3.0]],
        ]
    )
    candidates = torch.arange(2 * 4 * 2, dtype=torch.float32).view(2, 4, 2)
    # beta = 0: best mean -> state 0 candidate 2 (mean 2.0); state 1 candidate 3 (mean 3.0)
    assert torch.equal(eon.ucb_select(q, candidates, 0.0), candidates[[0, 1], [2, 3]])
    # beta = 1: state 0 candidate 1 has mean 4/3 and population std 1.886 -> 3.22 > 2.0
    assert torch.equal(eon.ucb_select(q, candidates, 1.0), candidates[[0, 1], [1, 3]])
    # beta = 2.5: state 1 candidate 0 (mean 1, std 0.816 -> 3.04) beats candidate 3 (3.0)
    mean, std = q.mean(0).numpy(), q.numpy().std(0)  # numpy's std is the population std
    expected = (mean + 2.5 * std).argmax(-1)
    assert expected.tolist() == [1, 0]
    assert torch.equal(eon.ucb_select(q, candidates, 2.5), candidates[[0, 1], expected.tolist()])


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
    stored = {
        k: buf[k][: buf["size"]].numpy()
        for k in ("obs", "actions", "rewards", "next_obs", "terminals", "truncated", "env")
    }
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
        for key, col in (
            ("obs", 0),
            ("actions", 1),
            ("rewards", 2),
            ("next_obs", 3),
            ("terminals", 4),
            ("truncated", 5),
        ):
            np.testing.assert_allclose(
                stored[key][rows],
                np.array([e[col] for e in expected], np.float32).reshape(stored[key][rows].shape),
                rtol=1e-6,
                err_msg=key,
            )
        # no transition leads from an episode's end into the next start: after an ending, the next obs is a fresh reset
        ends = np.nonzero(stored["terminals"][rows] + stored["truncated"][rows])[0]
        assert all(
            not np.allclose(stored["next_obs"][rows][e], stored["obs"][rows][e + 1]) for e in ends if e + 1 < rows.sum()
        )


def test_smoke_run_on_a_real_mujoco_env(tmp_path):
    result = run_script("emaq_online.py", *ONLINE_TINY, "--runs-dir", str(tmp_path), "--save-model")
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = glob.glob(os.path.join(str(tmp_path), "*"))
    tags = tensorboard_tags(run_dir)
    assert len(tags["eval/episodic_return"]) == 2 and all(np.isfinite(tags["eval/episodic_return"]))
    assert all(tag in tags for tag in ("charts/episodic_return", "losses/qf_loss", "losses/behavior_nll", "charts/SPS"))
    assert "400 env steps, 251 updates" in result.stdout  # updates start at --learning-starts, one per env step
    assert os.path.exists(os.path.join(run_dir, "mu.pt")) and os.path.exists(os.path.join(run_dir, "model.pt"))


def test_online_runs_with_the_vae_behavior_model(tmp_path):
    result = run_script(
        "emaq_online.py", *ONLINE_TINY, "--runs-dir", str(tmp_path), "--behavior-model", "vae", "--save-model"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = glob.glob(os.path.join(str(tmp_path), "*"))
    assert torch.load(os.path.join(run_dir, "mu.pt"), weights_only=True)["kind"] == "vae"
    assert all(np.isfinite(tensorboard_tags(run_dir)["eval/episodic_return"]))


def test_deployment_efficient_batches_update_only_between_collections(tmp_path):
    result = run_script("emaq_online.py", *ONLINE_TINY, "--runs-dir", str(tmp_path), "--trajectory-batch-size", "100")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "400 env steps, 300 updates" in result.stdout  # M = 100: cycles of 100 steps, then 100 updates


def test_saved_dataset_round_trips_into_offline_training(tmp_path):
    result = run_script(
        "emaq_online.py", *ONLINE_TINY, "--runs-dir", str(tmp_path / "online"), "--save-dataset", "online/pendulum-v0"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    dataset = minari.load_dataset("online/pendulum-v0")
    assert dataset.total_steps == 400 and dataset.env_spec.id == "InvertedPendulum-v5"
    first = next(dataset.iterate_episodes())
    assert len(first.observations) == len(first.actions) + 1
    offline = run_script(
        "emaq_offline.py", "--dataset-id", "online/pendulum-v0", "--runs-dir", str(tmp_path / "offline"), *TINY
    )
    assert offline.returncode == 0, offline.stderr[-3000:]
    assert "online/pendulum-v0 | mu return" in offline.stdout


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--env-id", "CartPole-v1"], ["CartPole-v1", "Discrete", "supports a continuous gymnasium.spaces.Box"]),
        (["--env-id", "tests.unbounded_env:UnboundedInvertedPendulum-v0"], ["infinite"]),
        (["--env-id", "NoSuchEnv-v9"], ["cannot make environment 'NoSuchEnv-v9'"]),
        (["--trajectory-batch-size", "0"], ["--trajectory-batch-size (M) must be >= 1"]),
        (["--num-samples", "0"], ["--num-samples (N) must be >= 1"]),
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
    monkeypatch.setattr(eon, "handle_stop_signals", lambda: None)  # keep pytest's own handlers
    args = eon.Args(
        env_id="InvertedPendulum-v5",
        total_timesteps=300,
        learning_starts=150,
        eval_every=300,
        eval_episodes=2,
        behavior_preset="table3",
        num_qs=2,
        q_hidden=32,
        q_layers=2,
        num_samples=8,
        batch_size=32,
        log_every=50,
        runs_dir=str(tmp_path),
        precision="bf16",
        compile="on",
        save_model=True,
    )
    result = eon.main(args)
    assert (
        result["num_updates"] == 300 - 150 + 1 and compiled
    )  # an update after every step from step 150 on == [{"mode": None, "dynamic": False}]
    (run_dir,) = glob.glob(os.path.join(tmp_path, "*"))
    mu_final = torch.load(os.path.join(run_dir, "mu.pt"), weights_only=True)["state_dict"]
    q_target_final = torch.load(os.path.join(run_dir, "model.pt"), weights_only=True)["q_target"]
    mu_copy, q_copy = copies[-2:]  # the run's (the cost estimate before it made its own, of copies)
    for copy, final, outputs in ((mu_copy, mu_final, eon.MU_OUTPUT), (q_copy, q_target_final, eon.Q_OUTPUT)):
        for name, p in copy.named_parameters():
            expected = final[name] if name.split(".")[0] in outputs else final[name].to(torch.bfloat16)
            assert p.dtype == expected.dtype and torch.equal(p, expected), name


def test_both_scripts_resolve_the_speed_flags_alike():
    for flags in (dict(), dict(precision="fp32"), dict(compile="on"), dict(compile="off", precision="bf16")):
        offline = eo.check_args(eo.Args(**flags), torch.device("cpu"))
        online = eon.Args(**flags)
        eon.check_args(online, torch.device("cpu"))
        assert (online.precision, online.compile, online.cudagraphs) == (offline.precision, offline.compile, "off")
