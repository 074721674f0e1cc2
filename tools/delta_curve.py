"""Delta(s, N), the difficulty curve of Section 3.3, for a finished run of emaq_offline.py: how far the best of N
samples of mu falls short of the best action in mu's support, under the run's Q (TestEnsemble), as N grows.

    python tools/delta_curve.py runs/<run> --ns 1 2 5 10 25 50 100 200 400

It writes delta_curve.csv, delta_curve.png and TensorBoard's delta/* (step = N) into the run folder.
"""

import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
import tyro
from torch.utils.tensorboard import SummaryWriter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import emaq_offline as eo  # noqa: E402
from tools.evaluate_run import load_run  # noqa: E402


@dataclass
class Args:
    run_dir: tyro.conf.Positional[str]
    """a finished run of emaq_offline.py (runs/<run name>)"""
    ns: tuple[int, ...] = (1, 2, 5, 10, 25, 50, 100, 200, 400)
    """the N of the curve"""
    support_samples: int = 4096
    """M: samples of mu(.|s) that stand in for its support"""
    states: int = 256
    """dataset states, besides the initial states of the run's evaluation episodes"""
    cuda: bool = True
    """use the GPU when one is present"""


@torch.no_grad()
def delta_curve(mu, q_ensemble, states, ns, support_samples: int, test_lambda: float, generator=None) -> np.ndarray:
    """Delta(s, N) = max_{a in supp mu(.|s)} Q(s, a) - E_{a_1..a_N ~ mu}[max_i Q(s, a_i)] with Q = TestEnsemble,
    [S, len(ns)] (Section 3.3, Theorem 3.5). M samples of mu(.|s) stand in for its support: the max over the support
    is their max, and E[max of N] is exact over their empirical distribution: with the M values sorted,
    P(max = v_(j)) = (j/M)^N - ((j-1)/M)^N."""
    m = support_samples
    j = torch.arange(1, m + 1, dtype=torch.float64, device=states.device) / m
    weights = torch.stack([j**n - (j - 1 / m) ** n for n in ns]).float()  # [len(ns), M]
    rows = []
    for chunk in states.split(max(1, 16_384 // m)):  # bound the memory of K x chunk x M values
        samples = mu.sample(chunk, m, generator=generator)
        values = eo.ensemble(q_ensemble(chunk, samples), test_lambda).sort(-1).values  # [b, M]
        rows.append(values[:, -1:] - values @ weights.T)
    return torch.cat(rows).cpu().numpy()


def write_delta_curve(run_dir, ns, deltas: np.ndarray, num_initial: int):
    """delta_curve.csv (N, mean, 10th and 90th percentile over states, mean over the initial states), delta_curve.png
    and TensorBoard (step = N)."""
    mean, p10, p90 = deltas.mean(0), np.percentile(deltas, 10, axis=0), np.percentile(deltas, 90, axis=0)
    initial, tags = deltas[:num_initial].mean(0), ("mean", "p10", "p90", "initial_states_mean")
    table = np.stack([np.asarray(ns, dtype=float), mean, p10, p90, initial], 1)
    header = "N," + ",".join(tags)
    np.savetxt(os.path.join(run_dir, "delta_curve.csv"), table, fmt="%.6g", delimiter=",", header=header, comments="")
    with SummaryWriter(run_dir) as writer:
        for n, *values in table:
            for tag, value in zip(tags, values, strict=True):
                writer.add_scalar(f"delta/{tag}", value, int(n))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.fill_between(ns, p10, p90, alpha=0.3, label="10th-90th percentile over states")
    ax.plot(ns, mean, marker="o", label="mean over states")
    ax.plot(ns, initial, linestyle="--", label="initial states")
    ax.set(xscale="log", xlabel="N (samples from mu)", ylabel="Delta(s, N)", title="EMaQ difficulty curve")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(run_dir, "delta_curve.png"), dpi=120)
    plt.close(fig)


def main(args: Args) -> np.ndarray:
    """Delta(s, N) over the initial states of the run's evaluation episodes and a fixed draw of dataset states."""
    if not args.ns or min(args.ns) < 1 or min(args.support_samples, args.states) < 1:
        eo.fail("--ns must be a list of N >= 1, and --support-samples and --states must be >= 1")
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    config, _, mu, q_ensemble, normalize = load_run(args.run_dir, device)
    dataset = eo.load_dataset(config.dataset_id, config.seed)
    envs = eo.make_eval_envs(dataset, config.eval_episodes)
    initial = eo.flatten_obs(dataset.observation_space, envs.reset(seed=config.eval_seed)[0])
    envs.close()
    data_obs = eo.load_transitions(dataset, config.dataset_id)[0]["obs"]
    picked = torch.randperm(len(data_obs), generator=torch.Generator().manual_seed(config.seed))[: args.states]
    states = normalize(torch.as_tensor(np.concatenate([initial, data_obs[picked.numpy()]]), device=device))
    generator = torch.Generator(device).manual_seed(config.seed)
    deltas = delta_curve(mu, q_ensemble, states, args.ns, args.support_samples, config.test_ensemble_lambda, generator)
    write_delta_curve(args.run_dir, args.ns, deltas, len(initial))
    means = ", ".join(f"N={n}: {d:.3g}" for n, d in zip(args.ns, deltas.mean(0), strict=True))
    print(f"{args.run_dir}: Delta(s, N) mean over {len(states)} states: {means}")
    return deltas


if __name__ == "__main__":
    main(tyro.cli(Args))
