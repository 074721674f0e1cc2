"""Shared test helpers: every dataset is a real Minari dataset built from a real environment, in a temporary folder."""

import os
import subprocess
import sys
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n 2`: one thread per worker and per script it runs, so that two
    os.environ["OMP_NUM_THREADS"] = "1"  # workers share two cores instead of oversubscribing them
    torch.set_num_threads(1)


USER_MINARI = os.path.expanduser("~/.minari")  # Minari's folder when MINARI_DATASETS_PATH is unset


@pytest.fixture(scope="session", autouse=True)
def minari_datasets_path(tmp_path_factory):
    """Point Minari at a temporary folder for the whole session: tests never touch the user's ~/.minari (and a session
    that starts without one ends without one: a test or a subprocess that wrote there fails the session)."""
    had_user_minari = os.path.exists(USER_MINARI)
    path = str(tmp_path_factory.mktemp("minari_datasets"))
    old = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = path
    yield path
    if old is None:
        del os.environ["MINARI_DATASETS_PATH"]
    else:
        os.environ["MINARI_DATASETS_PATH"] = old
    assert had_user_minari or not os.path.exists(USER_MINARI), f"a test wrote into {USER_MINARI}"


def collect(env, num_steps, seed=0, policy=None):
    """Run `policy` (uniform random by default) in a real env; return Minari episode buffers and the transitions
    exactly as the environment produced them, [(obs, action, reward, next_obs, terminated, truncated)]."""
    from minari.data_collector.episode_buffer import EpisodeBuffer

    env.action_space.seed(seed)
    obs, _ = env.reset(seed=seed)
    buffers, transitions, episode = [], [], None

    def stack(items):
        return (
            {k: np.asarray([o[k] for o in items]) for k in items[0]}
            if isinstance(items[0], dict)
            else np.asarray(items)
        )

    while len(transitions) < num_steps:
        episode = episode or dict(obs=[obs], actions=[], rewards=[], terms=[], truncs=[])
        action = policy(obs) if policy else env.action_space.sample()
        next_obs, reward, terminated, truncated, _ = env.step(action)
        truncated = truncated or len(transitions) == num_steps - 1
        transitions.append((obs, action, reward, next_obs, terminated, truncated))
        for key, value in zip(
            ("obs", "actions", "rewards", "terms", "truncs"),
            (next_obs, action, reward, terminated, truncated),
            strict=True,
        ):
            episode[key].append(value)
        obs = next_obs
        if terminated or truncated:
            buffers.append(
                EpisodeBuffer(
                    id=len(buffers),
                    observations=stack(episode["obs"]),
                    actions=np.asarray(episode["actions"]),
                    rewards=episode["rewards"],
                    terminations=episode["terms"],
                    truncations=episode["truncs"],
                )
            )
            obs, episode = env.reset()[0], None
    return buffers, transitions


def make_dataset(dataset_id, env, num_steps, seed=0, policy=None, edit=None, **metadata):
    """Create (once) a real Minari dataset from `env`; `edit(buffers)` may corrupt it on purpose."""
    import minari

    if dataset_id in minari.list_local_datasets():
        return minari.load_dataset(dataset_id), None
    buffers, transitions = collect(env, num_steps, seed, policy)
    if edit:
        buffers = edit(buffers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        minari.create_dataset_from_buffers(
            dataset_id,
            buffers,
            env=env,
            algorithm_name="random",
            author="tests",
            author_email="none",
            code_permalink="tests",
            description="test data",
            **metadata,
        )
    return minari.load_dataset(dataset_id), transitions


def run_script(*args, timeout=600, env=None):
    """Run a script of the repository as a user would, in a subprocess (`env`: extra environment variables)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


TINY = (
    "--preset table3 --behavior-updates 50 --total-updates 40 --eval-every 20 --eval-episodes 2 "
    "--log-every 10 --num-qs 2 --q-hidden 32 --q-layers 2 --batch-size 32 --num-samples 4"
).split()


def make_update(data, mu, q_ensemble, q_target, q_optimizer, args, states_per_chunk=None):
    """The update emaq_offline.main runs: a batch drawn on the device, eq. 10 on it, the bf16 read copies in bf16,
    compiled when args.compile == "on" (args' speed flags are already resolved)."""
    import emaq_offline as eo

    target_mu, target_q = mu, q_target
    if args.precision == "bf16":
        target_mu, target_q = eo.bf16_copy(mu, eo.MU_OUTPUT), eo.bf16_copy(q_target, eo.Q_OUTPUT)

    def update():
        idx = torch.randint(len(data["obs"]), (args.batch_size,), device=data["obs"].device)
        batch = [data[key][idx] for key in ("obs", "actions", "rewards", "next_obs", "terminals")]
        return eo.emaq_update(batch, target_mu, target_q, q_ensemble, q_target, q_optimizer, args, states_per_chunk)

    return eo.compile_update(update, args)


@pytest.fixture
def hopper_env():
    return gym.make("Hopper-v5", max_episode_steps=40)
