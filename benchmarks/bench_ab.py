"""A/B speed of the EMaQ update between two checkouts of this repository, in one process, rounds alternating.

    git worktree add /tmp/before 6315eab
    python benchmarks/bench_ab.py --before /tmp/before            # that commit against this working tree

Both trees' update runs at the paper's configuration (B = 256, K = 8 Q networks of 3 x 750, mu's MuJoCo preset,
HalfCheetah's 17/6 dimensions) with the same flags. A shared VM's speed drifts (2x within minutes here), so every round
times both trees twice, A B B A (then B A A B), and the result is the median over rounds of each round's time ratio;
an A/A run (`--before .`) shows the noise that is left. Prints the CPU model too.
"""

import importlib.util
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import tyro


@dataclass
class Args:
    before: str
    """a checkout of the commit to compare against (git worktree add DIR COMMIT)"""
    after: str = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    """the checkout to compare (default: this one)"""
    precision: str = "bf16"
    """--precision of both updates"""
    num_samples: int = 10
    """N"""
    rounds: int = 30
    """rounds; each times both trees twice, in the order A B B A or B A A B"""
    updates_per_round: int = 2
    """updates per tree and slot"""


OBS, ACT, B, K, H = 17, 6, 256, 8, 750


def load(tree: str, name: str):
    """Import tree/emaq_offline.py as `name`, with that tree's behavior_model."""
    sys.modules.pop("behavior_model", None)
    sys.path.insert(0, tree)
    spec = importlib.util.spec_from_file_location(name, os.path.join(tree, "emaq_offline.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.path.remove(tree)
    return module


def build_update(eo, data, args: Args):
    """The tree's own update: make_update where it has one (older trees), else emaq_update as its main builds it."""
    mu = eo.BehaviorModel.from_preset("mujoco", OBS, [-1] * ACT, [1] * ACT).requires_grad_(False)
    q, q_target = eo.QEnsemble(OBS, ACT, K, H, 3), eo.QEnsemble(OBS, ACT, K, H, 3).requires_grad_(False)
    optimizer = torch.optim.Adam(q.parameters(), lr=1e-4, fused=True)
    run = eo.Args(
        num_samples=args.num_samples,
        num_qs=K,
        batch_size=B,
        q_hidden=H,
        q_layers=3,
        precision=args.precision,
        ema=0.995,
    )
    run.compile = "off"
    chunk = eo.target_states_per_chunk(run, mu, torch.device("cpu"))
    if hasattr(eo, "make_update"):
        return eo.make_update(data, mu, q, q_target, optimizer, run, chunk)
    target_mu, target_q = mu, q_target
    if args.precision == "bf16":
        target_mu, target_q = eo.bf16_copy(mu, eo.MU_OUTPUT), eo.bf16_copy(q_target, eo.Q_OUTPUT)

    def update():
        idx = torch.randint(len(data["obs"]), (B,))
        batch = [data[key][idx] for key in ("obs", "actions", "rewards", "next_obs", "terminals")]
        return eo.emaq_update(batch, target_mu, target_q, q, q_target, optimizer, run, chunk)

    return update


def main(args: Args):
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown CPU")
    print(
        f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}; {args.precision}, N={args.num_samples}"
    )
    torch.manual_seed(0)
    data = {"obs": torch.randn(100_000, OBS), "actions": torch.rand(100_000, ACT) * 2 - 1}
    data.update(rewards=torch.randn(100_000), next_obs=torch.randn(100_000, OBS), terminals=torch.zeros(100_000))
    updates = {"before": build_update(load(args.before, "eo_before"), data, args)}
    updates["after"] = build_update(load(args.after, "eo_after"), data, args)
    times = {name: [] for name in updates}
    for update in updates.values():
        for _ in range(3):  # warm-up
            update()
    ratios = []  # per round: the machine's speed drifts (a shared VM: 2x within minutes), adjacent slots share it
    for round_ in range(args.rounds):  # A B B A, then B A A B, ...: a linear drift within a round cancels
        order = list(updates) if round_ % 2 == 0 else list(updates)[::-1]
        spent = dict.fromkeys(updates, 0.0)
        for name in order + order[::-1]:
            start = time.perf_counter()
            for _ in range(args.updates_per_round):
                updates[name]()
            elapsed = time.perf_counter() - start
            spent[name] += elapsed
            times[name].append(elapsed / args.updates_per_round * 1e3)
        ratios.append(spent["after"] / spent["before"])
    for name, ms in times.items():
        print(f"{name:>6}: median {statistics.median(ms):.1f} ms/update, fastest {min(ms):.1f} ms")
    quartiles = statistics.quantiles(ratios, n=4)
    print(
        f"after / before: {statistics.median(ratios):.3f} (median of {args.rounds} rounds' ratios; quartiles "
        f"{quartiles[0]:.3f}-{quartiles[2]:.3f}), {min(times['after']) / min(times['before']):.3f} (fastest slots)"
    )


if __name__ == "__main__":
    main(tyro.cli(Args))
