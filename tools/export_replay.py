"""The replay buffer of an emaq_online.py run as a Minari dataset, for emaq_offline.py to train on.

    python tools/export_replay.py runs/<online run> --dataset-id online/hopper-v0
    python emaq_offline.py --dataset-id online/hopper-v0

It reads the run's config.json and its last checkpoint (finished or not), whose replay buffer holds the last
--buffer-size transitions. Each environment's transitions become episodes (T + 1 observations, T actions), cut at
every termination and truncation; an episode still running at the checkpoint ends there, truncated. Datasets of
HalfCheetah, Hopper, Walker2d and Ant carry D4RL's reference scores (random policy, expert).
"""

import os
import sys
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import emaq_online as eon  # noqa: E402
from emaq_offline import D4RL_REF_SCORES  # noqa: E402


@dataclass
class Args:
    run_dir: tyro.conf.Positional[str]
    """a run of emaq_online.py (runs/<run name>); its last checkpoint is exported"""
    dataset_id: str
    """the new Minari dataset's id, (namespace/)name-v<version>, e.g. online/hopper-v0"""


def replay_episodes(buf: dict, num_envs: int) -> list:
    """The buffer's transitions as Minari episode buffers, oldest first, environment by environment."""
    from minari.data_collector.episode_buffer import EpisodeBuffer

    order = eon.replay_order(buf)
    rows = {key: value[order].cpu().numpy() for key, value in buf.items() if torch.is_tensor(value)}
    episodes = []
    for env in range(num_envs):
        idx = np.nonzero(rows["env"] == env)[0]
        ends = np.nonzero(rows["terminals"][idx] + rows["truncated"][idx])[0].tolist()
        if len(idx) and (not ends or ends[-1] != len(idx) - 1):
            ends.append(len(idx) - 1)  # the episode running at the checkpoint ends here, truncated
        for start, end in zip([0] + [e + 1 for e in ends[:-1]], ends, strict=True):
            ep = idx[start : end + 1]
            terminations = rows["terminals"][ep].astype(bool)
            truncations = rows["truncated"][ep].astype(bool)
            truncations[-1] = not terminations[-1]
            episode = dict(observations=np.concatenate([rows["obs"][ep[:1]], rows["next_obs"][ep]]))
            episode |= dict(actions=rows["actions"][ep], rewards=rows["rewards"][ep].tolist())
            episode |= dict(terminations=terminations.tolist(), truncations=truncations.tolist())
            episodes.append(EpisodeBuffer(id=len(episodes), **episode))
    return episodes


def main(args: Args) -> str:
    import minari
    from minari.dataset.minari_dataset import DATASET_ID_RE

    config = eon.read_config(args.run_dir)
    if not DATASET_ID_RE.fullmatch(args.dataset_id):
        eon.fail(f"--dataset-id {args.dataset_id!r} is not a Minari id: use (namespace/)name-v<version>")
    if args.dataset_id in minari.list_local_datasets():
        eon.fail(f"a Minari dataset {args.dataset_id!r} already exists: pick another --dataset-id")
    path = os.path.join(args.run_dir, "checkpoint.pt")
    try:
        buf = torch.load(path, map_location="cpu", weights_only=True)["buffer"]
    except FileNotFoundError:
        eon.fail(f"{args.run_dir} has no checkpoint.pt yet (one comes every --checkpoint-every steps)")
    except Exception as e:
        eon.fail(f"{path} is truncated or not a checkpoint of emaq_online.py ({type(e).__name__})")
    episodes = replay_episodes(buf, config.num_envs)
    family = config.env_id.split("-")[0].lower()
    scores = {}
    if family in D4RL_REF_SCORES:
        scores = dict(ref_min_score=D4RL_REF_SCORES[family][0], ref_max_score=D4RL_REF_SCORES[family][1])
    about = dict(algorithm_name="EMaQ online (emaq_online.py)", author="tools/export_replay.py")
    about |= dict(author_email="none", code_permalink="tools/export_replay.py")
    about["description"] = f"The replay buffer of an online EMaQ run (emaq_online.py) in {config.env_id}."
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        minari.create_dataset_from_buffers(args.dataset_id, episodes, env=config.env_id, **about, **scores)
    steps = sum(len(episode.rewards) for episode in episodes)
    print(f"{args.dataset_id}: {steps} transitions in {len(episodes)} episodes of {config.env_id}, from {args.run_dir}")
    return args.dataset_id


if __name__ == "__main__":
    main(tyro.cli(Args))
