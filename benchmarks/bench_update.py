"""Speed of one EMaQ update at the paper's MuJoCo configuration, against the same update written plainly.

    python benchmarks/bench_update.py                 # the GPU when there is one, else the CPU
    python benchmarks/bench_update.py --device cpu --num-samples 10

    python benchmarks/bench_update.py --ablation      # also: the default path with one technique taken out at a time

Configuration (Table 2): B=256, K=8 Q networks of 3 hidden layers of 750, mu at the MuJoCo preset, HalfCheetah
dims 17/6. (a) the update emaq_offline.main runs (`emaq_update` on batches drawn on the device) in fp32, bf16, and
compiled (+ CUDA graphs on a GPU);
(b) the plain update in the same process: eager fp32, one Q network at a time, one action dimension at a time, the
state embedded for every sample; (c) this machine's dense matmul rate in fp32 and bf16; (d) peak memory. Also the
test-time policy's latency for one state and the vectorized evaluation's environment steps/s.
"""

import os
import resource
import sys
import time
from dataclasses import dataclass

import torch
import tyro
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_behavior_model import PlainBehaviorModel, matmul_rate, sample_flops, timeit  # noqa: E402

import emaq_offline as eo  # noqa: E402
from behavior_model import PRESETS, BehaviorModel  # noqa: E402


@dataclass
class Args:
    device: str = "auto"
    """'auto' (cuda when available), 'cpu' or 'cuda'"""
    num_samples: tuple[int, ...] = (10, 100)
    """values of N to time"""
    min_seconds: float = 2.0
    """time every case for at least this long"""
    plain: bool = True
    """also time the plain update"""
    eval_env: str = "HalfCheetah-v5"
    """environment of the evaluation-speed row"""
    compile: bool = False
    """also time the compiled update (always on a GPU); compiling takes ~30 s per case on a 2-core CPU"""
    ablation: bool = False
    """time the default path with one speed-up taken out at a time (N=10)"""


OBS, ACT, B, K, H, LAYERS = 17, 6, 256, 8, 750, 3


def update_flops(n):
    """Matmul FLOPs of one update: mu's samples for B next states, K target Q networks on B*N pairs (state part once
    per state), and the K online networks' forward and backward (3x forward) on B pairs."""
    hidden = (LAYERS - 1) * H * H + H
    target = 2 * K * (B * OBS * H + B * n * (ACT * H + hidden))
    online = 3 * 2 * K * B * ((OBS + ACT) * H + hidden)
    return sample_flops(PRESETS["mujoco"], OBS, ACT, B, n) + target + online


class PlainQ(nn.Module):
    def __init__(self):
        super().__init__()
        layers = [nn.Linear(OBS + ACT, H), nn.ReLU()] + [
            m for _ in range(LAYERS - 1) for m in (nn.Linear(H, H), nn.ReLU())
        ]
        self.net = nn.Sequential(*layers, nn.Linear(H, 1))

    def forward(self, obs, actions):
        return self.net(torch.cat([obs, actions], -1)).squeeze(-1)


def plain_update(data, mu, qs, q_targets, optimizers, n, gamma=0.99, ema=0.995):
    """The update as a direct reading of Algorithm 1 (Appendix C): one network and one sample dimension at a time."""
    idx = torch.randint(len(data["obs"]), (B,), device=data["obs"].device)
    obs, actions, rewards, next_obs, terminals = (
        data[k][idx] for k in ("obs", "actions", "rewards", "next_obs", "terminals")
    )
    with torch.no_grad():
        next_actions = mu.sample(next_obs, n).reshape(B * n, ACT)
        repeated = next_obs.repeat_interleave(n, 0)
        values = torch.stack([q(repeated, next_actions) for q in q_targets]).min(0).values.view(B, n)
        target = rewards + gamma * (1 - terminals) * values.max(1).values
    for q, q_t, opt in zip(qs, q_targets, optimizers, strict=False):
        loss = ((q(obs, actions) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for p_t, p in zip(q_t.parameters(), q.parameters(), strict=False):
                p_t.mul_(ema).add_((1 - ema) * p)


def peak_memory(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # the whole process, in GiB


def real_update(data, mu, n, device, precision="fp32", compile="off", cudagraphs="off", fused_adam=True):
    """emaq_offline's update at the paper configuration, on fresh networks."""
    q = eo.QEnsemble(OBS, ACT, K, H, LAYERS).to(device)
    q_target = eo.QEnsemble(OBS, ACT, K, H, LAYERS).to(device).requires_grad_(False)
    opt = torch.optim.Adam(q.parameters(), lr=1e-4, fused=fused_adam, foreach=None if fused_adam else True)
    run = eo.Args(
        num_samples=n,
        num_qs=K,
        batch_size=B,
        q_hidden=H,
        q_layers=LAYERS,
        precision=precision,
        compile=compile,
        cudagraphs=cudagraphs,
        ema=0.995,
    )
    states_per_chunk = eo.target_states_per_chunk(run, mu, device)
    target_mu, target_q = mu, q_target  # as emaq_offline.main builds its update
    if precision == "bf16":
        target_mu, target_q = eo.bf16_copy(mu, eo.MU_OUTPUT), eo.bf16_copy(q_target, eo.Q_OUTPUT)

    def update():
        idx = torch.randint(len(data["obs"]), (B,), device=device)
        batch = [data[key][idx] for key in ("obs", "actions", "rewards", "next_obs", "terminals")]
        return eo.emaq_update(batch, target_mu, target_q, q, q_target, opt, run, states_per_chunk)

    return eo.compile_update(update, run)


def main(args: Args):
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    torch.manual_seed(0)
    fp32, bf16 = matmul_rate(device, torch.float32, 1.0), matmul_rate(device, torch.bfloat16, 1.0)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"device: {name}; torch {torch.__version__}; "
        f"dense matmul: fp32 {fp32 / 1e9:.0f} GFLOP/s, bf16 {bf16 / 1e9:.0f} GFLOP/s"
    )
    print("config: B=256, K=8 Q nets 3x750, mu preset 'mujoco', obs 17, actions 6 (Table 2)")
    data = {
        "obs": torch.randn(100_000, OBS, device=device),
        "actions": torch.rand(100_000, ACT, device=device) * 2 - 1,
        "rewards": torch.randn(100_000, device=device),
        "next_obs": torch.randn(100_000, OBS, device=device),
        "terminals": torch.zeros(100_000, device=device),
    }
    mu = BehaviorModel.from_preset("mujoco", OBS, [-1] * ACT, [1] * ACT).to(device).requires_grad_(False)
    default = eo.check_args(eo.Args(), device)
    print(
        f"defaults on this device: --precision {default.precision} --compile {default.compile} "
        f"--cudagraphs {default.cudagraphs}"
    )
    cases = [("fp32", "off", "off"), ("bf16", "off", "off")]
    if args.compile or device.type == "cuda":
        cases += [("bf16", "on", "off")] + ([("bf16", "on", "on")] if device.type == "cuda" else [])
    print(
        f"{'N':>4} {'path':>22} | {'updates/s':>9} {'ms/update':>9} | "
        f"{'GFLOP/s':>8} {'of fp32 mm':>10} {'of bf16 mm':>10} | {'vs plain':>8}"
    )
    for n in args.num_samples:
        rows = []
        for precision, compile, cudagraphs in cases:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            update = real_update(data, mu, n, device, precision, compile, cudagraphs)
            update()  # compiles, when compiling
            label = (
                f"fast {precision}"
                + (" compiled" if compile == "on" else "")
                + (" +graphs" if cudagraphs == "on" else "")
            )
            rows.append((label, timeit(update, device, args.min_seconds), peak_memory(device)))
        if args.plain:
            plain_mu = PlainBehaviorModel(OBS, ACT, PRESETS["mujoco"]).to(device).requires_grad_(False)
            qs = [PlainQ().to(device) for _ in range(K)]
            q_targets = [PlainQ().to(device).requires_grad_(False) for _ in range(K)]
            optimizers = [torch.optim.Adam(m.parameters(), lr=1e-4) for m in qs]
            seconds = timeit(
                lambda: plain_update(data, plain_mu, qs, q_targets, optimizers, n), device, args.min_seconds
            )
            rows.append(("plain fp32", seconds, peak_memory(device)))
        plain_seconds = rows[-1][1] if args.plain else float("nan")
        for path, seconds, _ in rows:
            achieved = update_flops(n) / seconds
            print(
                f"{n:>4} {path:>22} | {1 / seconds:>9.1f} {seconds * 1e3:>9.1f} | "
                f"{achieved / 1e9:>8.1f} {achieved / fp32:>9.0%} "
                f"{achieved / bf16:>9.0%} | {plain_seconds / seconds:>7.1f}x"
            )
        print(
            f"     {update_flops(n) / 1e9:.1f} GFLOP per update: "
            f"at least {update_flops(n) / bf16 * 1e3:.0f} ms at the bf16 matmul rate, "
            f"{update_flops(n) / fp32 * 1e3:.0f} ms at fp32's"
        )
        print(
            f"     peak memory after N={n}: "
            + ", ".join(f"{p} {m:.2f} GiB" for p, _, m in rows)
            + (" (CPU: the process's peak RSS)" if device.type == "cpu" else "")
        )

    if args.ablation:
        # The default path, then the same with one technique taken out (N=10). Stacking the ensemble, splitting the
        # first layer and sampling mu once per state are structural; bench_behavior_model.py measures mu's share.
        n, base = 10, dict(precision=default.precision, compile="off")
        variants = [
            ("default (eager)", base, None),
            ("- fused Adam (foreach)", {**base, "fused_adam": False}, None),
            ("- bf16 weight copies", base, "copies"),
            ("- CPU target chunks", base, "chunks"),
            ("- bf16 (fp32)", {**base, "precision": "fp32"}, None),
            ("+ torch.compile", {**base, "compile": "on"}, None),
        ]
        print(f"ablation, N={n}: {'variant':>24} | {'ms/update':>9} | vs default")
        base_seconds = None
        for label, kwargs, removed in variants:
            saved = eo.bf16_copy, eo.CPU_TARGET_ROWS
            if removed == "copies":
                eo.bf16_copy = lambda module, keep_fp32: module  # the target then reads the fp32 weights under autocast
            if removed == "chunks":
                eo.CPU_TARGET_ROWS = 10**9
            update = real_update(data, mu, n, device, **kwargs)
            update()
            seconds = timeit(update, device, args.min_seconds)
            eo.bf16_copy, eo.CPU_TARGET_ROWS = saved
            base_seconds = base_seconds or seconds
            print(f"{'':>18}{label:>24} | {seconds * 1e3:>9.1f} | {seconds / base_seconds:>6.2f}x time")

    # Evaluation: the test-time policy (Algorithm 1) for one state, and a vectorized evaluation in the real env.
    q = eo.QEnsemble(OBS, ACT, K, H, LAYERS).to(device)
    obs = torch.randn(1, OBS, device=device)
    latency = timeit(lambda: eo.test_time_policy(mu, q, obs, 10, 1.0), device, 1.0)
    import gymnasium as gym

    envs = gym.vector.SyncVectorEnv([lambda: gym.make(args.eval_env)] * 10)
    start = time.perf_counter()
    eo.evaluate(
        lambda o: eo.test_time_policy(mu, q, o, 10, 1.0), envs, envs.single_observation_space, lambda o: o, 0, device
    )
    steps_per_second = 10 * 1000 / (time.perf_counter() - start)
    print(
        f"test-time policy (N=10, 1 state): {latency * 1e3:.2f} ms/step; evaluation of 10 {args.eval_env} episodes: "
        f"{steps_per_second:,.0f} env steps/s"
    )


if __name__ == "__main__":
    main(tyro.cli(Args))
