"""A peer baseline: d3rlpy's deterministic behavior cloning (BC) on local Minari datasets, as D4RL-normalized scores.

d3rlpy is not a dependency of this project: this script runs it as a peer, in its own virtual environment that reuses
the installed torch, numpy, gymnasium, minari and mujoco (d3rlpy 2.8.1 pins gymnasium==1.0.0, so 2.8.0 is the newest
2.8.x that installs next to them):

    python -m venv --system-site-packages d3venv
    pip freeze | grep -iE '^(torch|numpy|gymnasium|minari|mujoco)==' > constraints.txt
    d3venv/bin/pip install -c constraints.txt 'd3rlpy==2.8.*'
    OMP_NUM_THREADS=1 d3venv/bin/python benchmarks/bc_baseline.py \\
        --datasets mujoco/walker2d/medium-v0 mujoco/hopper/medium-v0 --seeds 1 2 3 --out bc_baseline.csv

For each dataset and seed it trains `d3rlpy.algos.BCConfig` with batch size 256 and a standardizing observation scaler,
keeping d3rlpy's other BC defaults (deterministic tanh policy, mean-squared-error loss, Adam with learning rate 1e-3, a
256x256 ReLU MLP encoder), on one CPU thread, without logs or checkpoints. It then runs the greedy policy (`predict`)
for --eval-episodes episodes of `dataset.recover_environment()` with episode seeds 0..E-1, and writes one CSV row per
(dataset, seed). Scores use emaq_offline.py's reference_scores (the dataset's own, else D4RL's).
"""

import csv
import os
import sys
import time
from dataclasses import dataclass, field

import d3rlpy
import minari
import numpy as np
import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from emaq_offline import reference_scores  # noqa: E402  (the project's own normalization, in the venv's system packages)


@dataclass
class Args:
    datasets: list[str] = field(
        default_factory=lambda: [
            "mujoco/walker2d/medium-v0",
            "mujoco/hopper/medium-v0",
        ]
    )
    """Minari dataset ids"""
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    """training seeds"""
    steps: int = 30000
    """BC gradient steps per run"""
    eval_episodes: int = 50
    """greedy evaluation episodes per run (episode seeds 0..E-1)"""
    out: str = "bc_baseline.csv"
    """the CSV to write"""


def to_mdp(dataset) -> d3rlpy.dataset.MDPDataset:
    """Minari episodes as one MDPDataset (each episode's final observation dropped)."""
    obs, act, rew, term, trunc = [], [], [], [], []
    for ep in dataset.iterate_episodes():
        assert ep.terminations[-1] or ep.truncations[-1], "an episode must end in a termination or truncation"
        obs.append(ep.observations[:-1])
        act.append(ep.actions)
        rew.append(ep.rewards)
        term.append(ep.terminations)
        trunc.append(ep.truncations)
    return d3rlpy.dataset.MDPDataset(
        observations=np.concatenate(obs).astype(np.float32),
        actions=np.concatenate(act).astype(np.float32),
        rewards=np.concatenate(rew).astype(np.float32),
        terminals=np.concatenate(term).astype(np.float32),
        timeouts=np.concatenate(trunc).astype(np.float32),
    )


def evaluate(algo, env, episodes: int) -> np.ndarray:
    returns = []
    for ep in range(episodes):
        obs, _ = env.reset(seed=ep)
        total, done = 0.0, False
        while not done:
            action = algo.predict(np.asarray(obs, dtype=np.float32)[None])[0]
            obs, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    return np.array(returns)


def stderr(x: np.ndarray) -> float:
    return float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else 0.0


def main(args: Args) -> None:
    torch.set_num_threads(1)
    fields = ["dataset", "seed", "steps", "episodes", "return_mean", "return_se", "score_mean", "score_se", "wall_s"]
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for dataset_id in args.datasets:
            dataset = minari.load_dataset(dataset_id)
            lo, hi, source = reference_scores(dataset)  # as emaq_offline.py scores its runs
            print(f"{dataset_id}: normalizing with {source} (min {lo}, max {hi})", flush=True)
            mdp = to_mdp(dataset)
            for seed in args.seeds:
                start = time.time()
                d3rlpy.seed(seed)
                algo = d3rlpy.algos.BCConfig(
                    batch_size=256, observation_scaler=d3rlpy.preprocessing.StandardObservationScaler()
                ).create(device="cpu:0")
                algo.fit(
                    mdp,
                    n_steps=args.steps,
                    n_steps_per_epoch=args.steps,
                    experiment_name=f"bc_{dataset_id.replace('/', '_')}_s{seed}",
                    logger_adapter=d3rlpy.logging.NoopAdapterFactory(),
                    show_progress=False,
                    save_interval=10**9,
                )
                returns = evaluate(algo, dataset.recover_environment(), args.eval_episodes)
                scores = 100.0 * (returns - lo) / (hi - lo)
                row = dict(
                    dataset=dataset_id,
                    seed=seed,
                    steps=args.steps,
                    episodes=args.eval_episodes,
                    return_mean=round(float(returns.mean()), 2),
                    return_se=round(stderr(returns), 2),
                    score_mean=round(float(scores.mean()), 2),
                    score_se=round(stderr(scores), 2),
                    wall_s=round(time.time() - start, 1),
                )
                writer.writerow(row)
                f.flush()
                print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)


if __name__ == "__main__":
    main(tyro.cli(Args))
