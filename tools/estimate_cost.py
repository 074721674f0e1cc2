"""What a run of emaq_offline.py will cost on this machine, and its MFU (model FLOP utilization), before it starts:
given the flags of the run, it times a few updates of mu and of EMaQ and a few evaluation steps on models of the
run's sizes and prints the expected wall time and the rates.

    python tools/estimate_cost.py                    # the default run: the paper's configuration
    python tools/estimate_cost.py --preset cpu       # any flags of emaq_offline.py
"""

import copy
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import emaq_offline as eo  # noqa: E402
from behavior_model import VAEBehaviorModel  # noqa: E402


def sample_flops(mu, num_states: int, n: int) -> int:
    """Matmul FLOPs of `mu.sample(obs, n)` for `num_states` states. Autoregressive: the state MLP and the heads' state
    part once per state, head 0 once per state, heads 1.. once per sample. VAE: the decoder's state part once per
    state, the rest once per sample."""
    c = mu.config
    if isinstance(mu, VAEBehaviorModel):
        per_sample = c.latent_dim * c.hidden + (c.layers - 1) * c.hidden**2 + c.hidden * mu.act_dim
        return 2 * num_states * (mu.obs_dim * c.hidden + n * per_sample)
    widths = [mu.obs_dim] + [c.state_hidden] * c.state_layers + [c.embed_dim]
    per_state = (
        sum(a * b for a, b in zip(widths[:-1], widths[1:], strict=True)) + c.embed_dim * mu.act_dim * c.head_hidden
    )
    flops = 2 * num_states * per_state
    for i in range(mu.act_dim):
        prefix = (i * c.prefix_dim + c.prefix_dim * c.head_hidden) if c.prefix_dim else i * c.head_hidden
        head = prefix + (c.head_layers - 1) * c.head_hidden**2 + c.head_hidden * c.num_bins
        flops += 2 * (num_states if i == 0 else num_states * n) * head
    return flops


def update_flops(args, mu, obs_dim: int, act_dim: int) -> int:
    """Matmul FLOPs of one EMaQ update, counted as benchmarks/bench_update.py counts them: mu's N samples for B next
    states, the K target networks on B x N pairs (their state part once per state), and the K online networks'
    forward and backward (3 x forward) on B pairs."""
    b, n, k, h = args.batch_size, args.num_samples, args.num_qs, args.q_hidden
    hidden = (args.q_layers - 1) * h * h + h
    target = 2 * k * (b * obs_dim * h + b * n * (act_dim * h + hidden))
    online = 3 * 2 * k * b * ((obs_dim + act_dim) * h + hidden)
    return sample_flops(mu, b, n) + target + online


def peak_flops(device, precision: str) -> tuple[float, str]:
    """The device's dense matmul rate in the run's precision, measured (nanoGPT takes the card's datasheet number; a
    measurement also holds for CPUs): the fastest of repeated matmuls, the rate the device reaches even on a machine
    that others share for a while. (FLOP/s, how)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    size = 8192 if device.type == "cuda" else 2048
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    a @ b  # warm-up
    synchronize(device)
    fastest, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < 0.5:
        begin = time.perf_counter()
        a @ b
        synchronize(device)
        fastest = min(fastest, time.perf_counter() - begin)
    return 2 * size**3 / fastest, f"measured: fastest {size}x{size} {str(dtype).split('.')[-1]} matmul"


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_rate(step, device, min_steps: int = 3, min_seconds: float = 1.0, max_steps: int = 200) -> float:
    """Calls per second of `step()` after one warm-up call: 1 / the median call's time, which a moment when other jobs
    take the CPU leaves as it is."""
    step()
    synchronize(device)
    start, times = time.perf_counter(), []
    while len(times) < min_steps or (time.perf_counter() - start < min_seconds and len(times) < max_steps):
        begin = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - begin)
    return 1 / float(np.median(times))


def human_duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def estimate(args: eo.Args, device, done: dict, data: dict, mu, q_ensemble, envs, obs_space, normalize):
    """Time mu's updates (if the run trains mu), EMaQ updates and evaluation steps; return the line that says what
    is left of the run (`done`: its phase and step) and its expected wall time, and the EMaQ rate (updates/s)."""
    fmt, num_transitions = human_duration, len(data["obs"])

    def batch():
        idx = torch.randint(num_transitions, (args.batch_size,), device=device)
        return [data[key][idx] for key in ("obs", "actions", "rewards", "next_obs", "terminals")]

    mu_rate = None
    if done["phase"] == "behavior" and not args.behavior_path:
        mu_optimizer = torch.optim.Adam(mu.parameters(), lr=args.behavior_lr, fused=True)

        def mu_update():
            obs, actions = batch()[:2]
            with eo.autocast(args.precision, device):
                loss = mu.loss(obs, actions)
            mu_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            mu_optimizer.step()

        mu_rate = timed_rate(mu_update, device)
    mu.eval().requires_grad_(False)
    q_target = copy.deepcopy(q_ensemble).requires_grad_(False)
    q_optimizer = torch.optim.Adam(q_ensemble.parameters(), lr=args.q_lr, fused=True)
    mu_read, q_target_read = mu, q_target
    if args.precision == "bf16":
        mu_read, q_target_read = eo.bf16_copy(mu, eo.MU_OUTPUT), eo.bf16_copy(q_target, eo.Q_OUTPUT)
    chunk = eo.target_states_per_chunk(args, mu, device)
    emaq_rate = timed_rate(
        lambda: eo.emaq_update(batch(), mu_read, q_target_read, q_ensemble, q_target, q_optimizer, args, chunk), device
    )
    obs = normalize(torch.as_tensor(eo.flatten_obs(obs_space, envs.reset(seed=args.eval_seed)[0]), device=device))

    def eval_step():  # Algorithm 1 for every episode, then one step of every environment
        actions = eo.test_time_policy(mu, q_ensemble, obs, args.num_samples, args.test_ensemble_lambda)
        envs.step(actions.cpu().numpy())

    eval_rate = timed_rate(eval_step, device)
    mu_left = args.behavior_updates - done["step"] if mu_rate else 0
    emaq_done = done["step"] if done["phase"] != "behavior" else 0
    emaq_left, every = args.total_updates - emaq_done, args.eval_every
    evaluations = args.total_updates // every - emaq_done // every + (args.total_updates % every > 0)  # + the last
    evaluations += 2 if done["phase"] == "behavior" else 0  # mu sampled and greedy, before EMaQ
    spec = envs.unwrapped.envs[0].spec
    eval_seconds = evaluations * spec.max_episode_steps / eval_rate if spec and spec.max_episode_steps else 0
    total = (mu_left / mu_rate if mu_rate else 0) + emaq_left / emaq_rate + eval_seconds
    line = f"estimate on {device.type} ({args.precision}"
    line += ", measured eagerly: compiled updates are faster):" if args.compile == "on" else "):"
    if mu_rate:
        line += f" mu {mu_left:,} updates {fmt(mu_left / mu_rate)} ({mu_rate:.1f} upd/s),"
    line += f" EMaQ {emaq_left:,} updates {fmt(emaq_left / emaq_rate)} ({emaq_rate:.1f} upd/s),"
    line += f" {evaluations} evaluations up to {fmt(eval_seconds)} ({100 * eval_seconds / total:.0f}%): {fmt(total)}"
    if device.type == "cpu" and total > 3 * 3600 and args.preset != "cpu":
        line += "; on a CPU try --preset cpu (not the paper's configuration: docs/cpu_preset.md)"
    return line, emaq_rate


def main(args: eo.Args) -> tuple[str, float]:
    """The estimate for the run these flags start (or, with --resume, what is left of that run)."""
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    args = eo.check_args(args, device)
    torch.manual_seed(args.seed)
    dataset = eo.load_dataset(args.dataset_id, args.seed)
    data, low, high = eo.load_transitions(dataset, args.dataset_id)
    data = {key: torch.as_tensor(value, device=device) for key, value in data.items()}
    obs_dim, act_dim = data["obs"].shape[1], data["actions"].shape[1]
    obs_mean, obs_std = data["obs"].mean(0), data["obs"].std(0) + 1e-3
    normalize = (lambda o: (o - obs_mean) / obs_std) if args.normalize_obs else (lambda o: o)
    data["obs"], data["next_obs"] = normalize(data["obs"]), normalize(data["next_obs"])
    mu = eo.build_or_load_mu(args, obs_dim, act_dim, low, high).to(device)
    q_ensemble = eo.QEnsemble(obs_dim, act_dim, args.num_qs, args.q_hidden, args.q_layers).to(device)
    envs = eo.make_eval_envs(dataset, args.eval_episodes)
    done = dict(phase="behavior", step=0)
    if args.resume and os.path.exists(os.path.join(args.resume, "checkpoint.json")):
        done = json.load(open(os.path.join(args.resume, "checkpoint.json")))
    line, rate = estimate(args, device, done, data, mu, q_ensemble, envs, dataset.observation_space, normalize)
    envs.close()
    flops, (peak, how) = update_flops(args, mu, obs_dim, act_dim), peak_flops(device, args.precision)
    print(line)
    print(
        f"MFU {100 * rate * flops / peak:.2f}%: {rate:.1f} upd/s x {flops / 1e9:.3f} GFLOP per Q update / peak "
        f"{peak / 1e12:.3f} TFLOP/s ({how})"
    )
    return line, rate


if __name__ == "__main__":
    main(eo.cli())
