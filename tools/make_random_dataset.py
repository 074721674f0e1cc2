"""A random dataset as the paper's (D4RL's protocol): transitions of a uniform random policy, as a Minari dataset.

    python tools/make_random_dataset.py Hopper-v5 --steps 2000     # writes emaq/Hopper-v5/random_2000-v0

emaq_offline.py calls generate_random_dataset itself (a lazy import) on the first use of an id
emaq/<EnvId>/random_<steps>-v0 (or emaq/<EnvId>/random-v0: 1M steps), with its --seed; this tool generates one ahead of
time, with the same code and seed, so the two give the same dataset. It imports the script only inside main (no cycle).
"""

import os
import shutil
import sys
import warnings
from dataclasses import dataclass

import gymnasium as gym
import minari
import numpy as np
import tyro
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from behavior_model import action_bounds  # noqa: E402


@dataclass
class Args:
    env_id: tyro.conf.Positional[str]
    """a Gymnasium environment with a bounded Box action space, e.g. Hopper-v5"""
    steps: int = 1_000_000
    """transitions of the uniform random policy (the paper's random datasets have 1M)"""
    seed: int = 1
    """seed of the environment and of the policy (1: the dataset a run with the default --seed generates)"""


def dataset_id_for(env_id: str, steps: int) -> str:
    """The id emaq_offline.py generates for these settings: random-v0 for 1M steps, random_<steps>-v0 otherwise."""
    return f"emaq/{env_id}/random-v0" if steps == 1_000_000 else f"emaq/{env_id}/random_{steps}-v0"


def create_dataset_atomically(dataset_id: str, buffers: list, env_id: str, about: dict):
    """minari.create_dataset_from_buffers into a hidden folder of the Minari root, then renamed into place: a killed
    generation leaves nothing that looks like a dataset, and the next one removes what the dead ones left."""
    root = minari.storage.get_dataset_path()
    for stale in root.glob(".emaq-generating-*"):  # left by killed generations (their process is gone)
        if not os.path.exists(f"/proc/{stale.name.rsplit('-', 1)[1]}"):
            shutil.rmtree(stale, ignore_errors=True)
    staging = root / f".emaq-generating-{os.getpid()}"
    saved_root = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(staging)
    try:
        with warnings.catch_warnings(action="ignore"):
            minari.create_dataset_from_buffers(dataset_id, buffers, env=env_id, **about)
        for path in staging.rglob("namespace_metadata.json"):  # the namespaces' metadata, then the dataset, renamed
            if not (root / path.relative_to(staging)).exists():
                os.makedirs((root / path.relative_to(staging)).parent, exist_ok=True)
                shutil.copy(path, root / path.relative_to(staging))
        os.makedirs((root / dataset_id).parent, exist_ok=True)
        os.replace(staging / dataset_id, root / dataset_id)
    finally:
        os.environ.pop("MINARI_DATASETS_PATH")
        if saved_root is not None:  # as it was: the user's folder, or unset for ~/.minari/datasets
            os.environ["MINARI_DATASETS_PATH"] = saved_root
        shutil.rmtree(staging, ignore_errors=True)


def generate_random_dataset(dataset_id: str, env_id: str, steps: int, seed: int, d4rl_ref_scores: dict):
    """The paper's 'random' protocol (D4RL's): `steps` transitions of a uniform random policy, saved as a Minari dataset
    whose reference scores are this policy's return over complete episodes (min) and D4RL's expert constant (max):
    d4rl_ref_scores[family][1], the offline script's D4RL_REF_SCORES (passed in: this module does not import it)."""
    from minari.data_collector.episode_buffer import EpisodeBuffer

    try:
        env = gym.make(env_id)
        action_bounds(env.action_space)
    except (gym.error.Error, ValueError) as e:
        print(f"error: cannot generate {dataset_id}: {e}", file=sys.stderr)  # as the scripts' fail: one line, code 2
        sys.exit(2)
    env.action_space.seed(seed)
    obs, _ = env.reset(seed=seed)
    buffers = []
    returns = []  # of the complete episodes
    episode = dict(observations=[obs], actions=[], rewards=[], terminations=[], truncations=[])
    for t in tqdm(range(steps), desc=f"generating {dataset_id}", unit="step", mininterval=1.0):
        action = env.action_space.sample()
        obs, reward, terminated, truncated, _ = env.step(action)
        truncated = truncated or t == steps - 1  # the last, cut-off episode ends truncated
        for key, value in zip(episode, (obs, action, reward, terminated, truncated), strict=True):
            episode[key].append(value)
        if terminated or truncated:
            if terminated or len(episode["rewards"]) == env.spec.max_episode_steps:
                returns.append(sum(episode["rewards"]))
            arrays = dict(observations=np.asarray(episode["observations"]), actions=np.asarray(episode["actions"]))
            buffers.append(EpisodeBuffer(id=len(buffers), **arrays, **{k: episode[k] for k in list(episode)[2:]}))
            obs, _ = env.reset()
            episode = dict(observations=[obs], actions=[], rewards=[], terminations=[], truncations=[])
    about = dict(algorithm_name="uniform random policy", author="tools/make_random_dataset.py", author_email="none")
    about["code_permalink"] = "tools/make_random_dataset.py"
    about["description"] = f"{steps} transitions of a uniform random policy in {env_id} (D4RL's protocol)"
    family = env_id.split("-")[0].lower()
    if family in d4rl_ref_scores and returns:
        about |= dict(ref_min_score=float(np.mean(returns)), ref_max_score=d4rl_ref_scores[family][1])
    create_dataset_atomically(dataset_id, buffers, env_id, about)


def main(args: Args) -> str:
    import emaq_offline as eo  # here, not above: the offline script imports this module

    if args.steps < 1:
        eo.fail(f"--steps must be >= 1, got {args.steps}")
    dataset_id = dataset_id_for(args.env_id, args.steps)
    if dataset_id in minari.list_local_datasets():
        eo.log(f"note: {dataset_id} exists already; to generate it again, first run: minari delete {dataset_id}")
    else:
        generate_random_dataset(dataset_id, args.env_id, args.steps, args.seed, eo.D4RL_REF_SCORES)
    dataset = minari.load_dataset(dataset_id)
    where = os.path.dirname(dataset.spec.data_path)
    print(f"{dataset_id}: {dataset.total_steps} steps, {dataset.total_episodes} episodes, in {where}")
    return dataset_id


if __name__ == "__main__":
    main(tyro.cli(Args))
