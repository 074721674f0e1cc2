"""Speed of mu(a|s) at the paper's MuJoCo preset: sampled actions/s and one training step, against a plain version.

    python benchmarks/bench_behavior_model.py            # CPU, or the GPU when there is one
    python benchmarks/bench_behavior_model.py --device cpu

The plain version is what a direct reading of Appendix B gives: one nn.Sequential per action dimension,
the state embedded again for every sample, one dimension at a time. Achieved FLOP/s count only the
matmuls the fast model really needs, and are compared with this machine's measured dense matmul rate.
"""

import os
import sys
import time
from dataclasses import dataclass

import torch
import tyro
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from behavior_model import PRESETS, BehaviorModel  # noqa: E402


@dataclass
class Args:
    device: str = "auto"
    """'auto' (cuda when available), 'cpu' or 'cuda'"""
    batch: int = 256
    """states per call (B)"""
    num_samples: tuple[int, ...] = (10, 100, 400)
    """values of N to time"""
    act_dims: tuple[int, ...] = (6, 24)
    """action dimensions to time"""
    obs_dim: int = 17
    """observation dimension"""
    min_seconds: float = 1.0
    """time every case for at least this long"""
    skip_plain_above: int = 1_000_000
    """skip the plain sampler when B*N*A exceeds this (it is slow on a CPU)"""


class PlainBehaviorModel(nn.Module):
    """Appendix B read literally: per-dimension nn.Sequential heads on [h, a[:i]], no sharing of work."""

    def __init__(self, obs_dim, act_dim, p):
        super().__init__()
        e, h = p["embed_dim"], p["head_hidden"]
        self.state_mlp = nn.Sequential(
            nn.Linear(obs_dim, p["state_hidden"]),
            nn.ReLU(),
            nn.Linear(p["state_hidden"], p["state_hidden"]),
            nn.ReLU(),
            nn.Linear(p["state_hidden"], e),
        )
        self.heads = nn.ModuleList(
            nn.Sequential(
                nn.Linear(e + i, h),
                nn.ReLU(),
                *[m for _ in range(p["head_layers"] - 1) for m in (nn.Linear(h, h), nn.ReLU())],
                nn.Linear(h, p["num_bins"]),
            )
            for i in range(act_dim)
        )
        self.num_bins, self.act_dim = p["num_bins"], act_dim

    def sample(self, obs, n):
        flat = obs.repeat_interleave(n, 0)  # the state is embedded once per sample
        hidden = self.state_mlp(flat)
        actions = flat.new_zeros(flat.shape[0], 0)
        for head in self.heads:
            labels = torch.multinomial(torch.softmax(head(torch.cat([hidden, actions], 1)), -1), 1)
            value = -1 + (labels.float() + torch.rand_like(labels.float())) * 2 / self.num_bins
            actions = torch.cat([actions, value], 1)
        return actions.view(obs.shape[0], n, -1)

    def loss(self, obs, actions):
        hidden = self.state_mlp(obs)
        labels = ((actions + 1) / 2 * self.num_bins).long().clamp(0, self.num_bins - 1)
        return sum(
            nn.functional.cross_entropy(head(torch.cat([hidden, actions[:, :i]], 1)), labels[:, i])
            for i, head in enumerate(self.heads)
        )


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device, min_seconds):
    fn()  # warm-up
    sync(device)
    reps, start = 0, time.perf_counter()
    while True:
        fn()
        reps += 1
        sync(device)
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds and reps >= 3:
            return elapsed / reps


def matmul_rate(device, dtype, min_seconds):
    a, b = torch.randn(2560, 768, device=device, dtype=dtype), torch.randn(768, 768, device=device, dtype=dtype)
    if device.type == "cuda":
        a, b = torch.randn(8192, 8192, device=device, dtype=dtype), torch.randn(8192, 8192, device=device, dtype=dtype)
    seconds = timeit(lambda: a @ b, device, min_seconds)
    return 2 * a.shape[0] * a.shape[1] * b.shape[1] / seconds


def sample_flops(p, obs_dim, act_dim, batch, n):
    """Matmul FLOPs of the fast sampler: state MLP and head inputs per state, heads per sample (dim 0 per state)."""
    s, e, h, bins, layers = p["state_hidden"], p["embed_dim"], p["head_hidden"], p["num_bins"], p["head_layers"]
    per_state = obs_dim * s + s * s + s * e + e * act_dim * h
    flops = 2 * batch * per_state
    for i in range(act_dim):
        rows = batch if i == 0 else batch * n
        flops += 2 * rows * (i * h + (layers - 1) * h * h + h * bins)
    return flops


def main(args: Args):
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    torch.manual_seed(0)
    p = PRESETS["mujoco"]
    fp32 = matmul_rate(device, torch.float32, args.min_seconds)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"device: {name}; torch {torch.__version__}; dense fp32 matmul: {fp32 / 1e9:.0f} GFLOP/s; "
        "mu preset 'mujoco' (750x2 -> 750, heads 3x256, 40 bins)"
    )
    print(
        f"{'A':>3} {'N':>4} | {'fast actions/s':>15} {'plain actions/s':>15} {'speedup':>8} | "
        f"{'GFLOP/s':>8} {'of fp32 mm':>10} | {'train step ms':>13} {'plain ms':>9}"
    )
    for act_dim in args.act_dims:
        fast = BehaviorModel.from_preset("mujoco", args.obs_dim, [-1] * act_dim, [1] * act_dim).to(device)
        plain = PlainBehaviorModel(args.obs_dim, act_dim, p).to(device)
        obs = torch.randn(args.batch, args.obs_dim, device=device)
        actions = torch.rand(args.batch, act_dim, device=device) * 2 - 1
        opt_fast, opt_plain = torch.optim.Adam(fast.parameters(), 5e-4), torch.optim.Adam(plain.parameters(), 5e-4)

        def step(model, opt):
            loss = model.loss(obs, actions)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        train_fast = timeit(lambda: step(fast, opt_fast), device, args.min_seconds)
        train_plain = timeit(lambda: step(plain, opt_plain), device, args.min_seconds)
        for n in args.num_samples:
            with torch.no_grad():
                t_fast = timeit(lambda: fast.sample(obs, n), device, args.min_seconds)
                big = args.batch * n * act_dim > args.skip_plain_above and device.type == "cpu"
                t_plain = float("nan") if big else timeit(lambda: plain.sample(obs, n), device, args.min_seconds)
            rate = args.batch * n / t_fast
            achieved = sample_flops(p, args.obs_dim, act_dim, args.batch, n) / t_fast
            print(
                f"{act_dim:>3} {n:>4} | {rate:>15,.0f} {args.batch * n / t_plain:>15,.0f} {t_plain / t_fast:>7.1f}x | "
                f"{achieved / 1e9:>8.1f} {achieved / fp32:>9.0%} | {train_fast * 1e3:>13.1f} {train_plain * 1e3:>9.1f}"
            )


if __name__ == "__main__":
    main(tyro.cli(Args))
