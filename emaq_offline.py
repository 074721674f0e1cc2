"""Offline EMaQ (Expected-Max Q-learning; Ghasemipour, Schuurmans & Gu, ICML 2021) on Minari datasets.

Read top to bottom: Args, data (a Minari dataset as tensors), the Q ensemble, EMaQ (the target of eq. 11, the update
of eq. 10, the test-time policy of Algorithm 1), evaluation, main. Run plumbing (checks, checkpoints, resume,
signals, dataset generation, the cost estimate and MFU, videos, Delta's files, Q's diagnostics, --evaluate-run) comes
after main. Docs: README.md.
"""

import copy
import dataclasses
import functools
import gc
import io
import json
import os
import random
import re
import signal
import socket
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Literal

import gymnasium as gym
import numpy as np
import torch
import tyro
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from behavior_model import BehaviorModel, VAEBehaviorModel, action_bounds, fp32_output_layer


@dataclass
class Args:
    exp_name: str = "emaq_offline"
    """the name of this experiment (part of the run directory's name)"""
    seed: int = 1
    """seed of python, numpy, torch and the evaluation environments"""
    torch_deterministic: bool = True
    """sets torch.backends.cudnn.deterministic"""
    cuda: bool = True
    """use the GPU when one is present"""
    runs_dir: str = "runs"
    """TensorBoard logs and saved models go to runs_dir/<run name>/"""

    # Data
    dataset_id: str = "emaq/HalfCheetah-v5/random-v0"
    """a Minari dataset id; emaq/<EnvId>/random-v0 (1M steps) or random_<steps>-v0 is generated locally on first use"""
    normalize_obs: bool = True
    """normalize observations with the dataset's mean and std (std + 1e-3), here and in the evaluation env"""
    preset: Literal["auto", "mujoco", "table3", "cpu"] = "auto"
    """Table 2 (mujoco), Table 3 (kitchen/antmaze/adroit) or cpu (NOT the paper's: README, CPU preset); auto: by id"""

    # Behavior model mu(a|s)
    behavior_model: Literal["autoregressive", "vae"] = "autoregressive"
    """mu: the paper's autoregressive model (App. B) or the VAE of prior work (App. H.1), to compare (Section 5.1)"""
    behavior_path: str | None = None
    """load a saved mu (mu.pt of an earlier run) instead of pretraining one; a sweep over N reuses one mu"""
    behavior_updates: int | None = None
    """maximum-likelihood updates of mu before EMaQ training; unset: 300,000 (20,000 under --preset cpu)"""
    behavior_lr: float = 5e-4
    """Adam learning rate of mu (Tables 2 and 3)"""
    behavior_holdout: float = 0.01
    """fraction of transitions (at most 10,000) held out of mu's training to report its held-out NLL"""

    # EMaQ
    total_updates: int | None = None
    """Q-ensemble updates; unset: 1,000,000 (30,000 under --preset cpu)"""
    batch_size: int | None = None
    """minibatch size; unset: 256 (mujoco preset) or 128 (table3)"""
    num_samples: int | None = None
    """N: actions sampled from mu for the target (eq. 11) and the test-time policy (Algorithm 1); unset: 10 (cpu: 5)"""
    num_qs: int | None = None
    """K: Q functions in the ensemble; unset: 8 (mujoco) or 16 (table3)"""
    q_hidden: int | None = None
    """hidden width of every Q network; unset: 750 (mujoco) or 256 (table3)"""
    q_layers: int | None = None
    """hidden layers of every Q network; unset: 3 (mujoco) or 4 (table3)"""
    q_lr: float | None = None
    """Adam learning rate of the Q ensemble; unset: 1e-4 (3e-4 under --preset cpu)"""
    gamma: float = 0.99
    """discount factor"""
    ema: float | None = None
    """alpha: target <- alpha * target + (1 - alpha) * online, after every update; unset: 0.995 (cpu: 0.98)"""
    ensemble_lambda: float = 1.0
    """Ensemble(values) = lambda * min + (1 - lambda) * max over the K targets (eq. 11)"""
    test_ensemble_lambda: float = 1.0
    """lambda of TestEnsemble in the test-time policy (Algorithm 1)"""
    backup: Literal["max", "soft"] = "max"
    """'max': the EMaQ backup; 'soft': the softmax-weighted average over the N samples (Appendix J)"""
    soft_alpha: float = 10.0
    """alpha of the soft backup, weights softmax(alpha * Q) (Appendix J, eq. 74)"""

    # Evaluation, logging, saving
    eval_every: int = 5_000
    """evaluate the test-time policy every this many updates"""
    eval_episodes: int = 10
    """episodes per evaluation, run as one vectorized environment"""
    final_eval_episodes: int | None = None
    """episodes of the last evaluation, the score a paper reports (e.g. 100 for a tight one); unset: --eval-episodes"""
    capture_video: bool = False
    """record the first episode of every evaluation to runs/<run>/videos/ (mp4) and to TensorBoard (eval/video)"""
    eval_seed: int = 0
    """seed of the evaluation episodes and of their samples from mu (the same at every evaluation)"""
    diagnostic_states: int = 2_000
    """dataset states of Q's diagnostics, logged at every evaluation (diagnostics/*; README, "Medium-quality data")"""
    log_every: int = 1_000
    """move losses to the host and log them every this many updates"""
    save_model: bool = False
    """write mu, the Q ensemble, its targets and optimizers, and the config into the run directory"""
    evaluate_run: str | None = None
    """evaluate the model saved in this run directory and exit, without training"""
    delta_ns: tuple[int, ...] = (1, 2, 5, 10, 25, 50, 100, 200, 400)
    """N grid of the difficulty curve Delta(s, N) computed after training (Section 3.3); empty turns it off"""
    delta_support_samples: int = 4096
    """mu samples per state that stand in for mu's support in Delta(s, N)"""
    delta_states: int = 256
    """dataset states in Delta(s, N), beside the initial states of the evaluation episodes"""
    checkpoint_every: int = 10_000
    """write the full training state (atomically) every this many updates of mu and of the Q ensemble"""
    resume: str | None = None
    """continue the run in this run directory from its last checkpoint (a larger --total-updates extends it)"""

    # Speed: how fast, never what is computed (README.md, "Benchmarks")
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """bf16 matmuls in mu's and the Q updates (Q values, targets, losses, logits stay fp32); auto: bf16 where native"""
    compile: Literal["auto", "on", "off"] = "auto"
    """torch.compile the Q update; auto: on for a GPU, off for a CPU (no gain there); falls back to eager if it fails"""
    cudagraphs: Literal["auto", "on", "off"] = "auto"
    """replay the compiled Q update as one CUDA graph (GPU only); auto: on whenever --compile is on a GPU"""
    target_memory_gb: float | None = None
    """memory budget of the target's B x N x K values; unset: half of the free device memory"""


# The flags that decide what mu is (its data, its architecture, its training): mu.json records them, and a sweep
# over any of them trains one mu per value (benchmarks/sweep.py reads this tuple).
MU_ARGS = (
    "dataset_id",
    "normalize_obs",
    "preset",
    "behavior_model",
    "behavior_updates",
    "behavior_lr",
    "behavior_holdout",
    "batch_size",
    "precision",
)


# ---------------------------------------------------------------------------------------------------
# Data: a Minari dataset -> transitions (s, a, r, s', terminal) as tensors on the training device
# ---------------------------------------------------------------------------------------------------
def flatten_obs(space: gym.Space, obs) -> np.ndarray:
    """[T, ...] observations -> [T, obs_dim] float32. Dict spaces are concatenated in the space's key order, by the
    same function for the dataset and the evaluation environment, so the order always agrees."""
    if isinstance(space, gym.spaces.Dict):
        return np.concatenate([flatten_obs(sub, obs[key]) for key, sub in space.spaces.items()], axis=1)
    if isinstance(space, gym.spaces.Box):
        obs = np.asarray(obs, dtype=np.float32)
        return obs.reshape(obs.shape[0], -1)
    fail(f"unsupported observation space {space}: use Box or (nested) Dict of Box observations")


def episodes_to_transitions(dataset, gamma: float) -> dict[str, np.ndarray]:
    """Every episode has T+1 observations and T actions: transition t is (o_t, a_t, r_t, o_{t+1}, terminated_t).
    terminal is termination only: a truncated (time-limit) ending still bootstraps from o_{t+1}.
    For the diagnostics only, returns_to_go is the discounted return of the rest of the episode (the value of the
    behavior policy, which EMaQ with N = 1 estimates); rtg_known marks where it is exact to 1%: a terminated episode,
    or a truncated one whose missing tail weighs gamma^(steps left) < 0.01."""
    keys = ("obs", "actions", "rewards", "next_obs", "terminals", "returns_to_go", "rtg_known")
    parts = {key: [] for key in keys}
    for episode in dataset.iterate_episodes():
        obs = flatten_obs(dataset.observation_space, episode.observations)
        steps = len(episode.rewards)
        if obs.shape[0] != steps + 1:
            fail(f"episode {episode.id} has {obs.shape[0]} observations for {steps} steps: expected T+1")
        parts["obs"].append(obs[:-1])
        parts["next_obs"].append(obs[1:])
        parts["actions"].append(np.asarray(episode.actions, dtype=np.float32).reshape(steps, -1))
        parts["rewards"].append(np.asarray(episode.rewards, dtype=np.float32))
        parts["terminals"].append(np.asarray(episode.terminations, dtype=np.float32))
        returns_to_go, future = [], 0.0
        for reward in reversed(np.asarray(episode.rewards, dtype=np.float64).tolist()):
            future = reward + gamma * future
            returns_to_go.append(future)
        known = np.full(steps, True) if episode.terminations[-1] else gamma ** np.arange(steps, 0, -1) < 0.01
        parts["returns_to_go"].append(np.asarray(returns_to_go[::-1], dtype=np.float32))
        parts["rtg_known"].append(known.astype(np.float32))
    return {key: np.concatenate(value) for key, value in parts.items()}


# ---------------------------------------------------------------------------------------------------
# Q ensemble: K MLPs evaluated together, one batched matmul per layer
# ---------------------------------------------------------------------------------------------------
class QEnsemble(nn.Module):
    """K Q networks Q_k(s, a), weights stacked as [K, in, out]. The first layer is split into a state part, computed
    once per state, and an action part, computed per sampled action: Q(s', a'_i) for N samples costs one state
    projection, not N."""

    def __init__(self, obs_dim: int, act_dim: int, num_qs: int, hidden: int, layers: int):
        super().__init__()

        def stacked(fan_in, *shape):  # nn.Linear's default initialization, for every member
            bound = 1 / fan_in**0.5
            return nn.Parameter(torch.empty(num_qs, *shape).uniform_(-bound, bound))

        self.w_obs = stacked(obs_dim + act_dim, obs_dim, hidden)
        self.w_act = stacked(obs_dim + act_dim, act_dim, hidden)
        self.b_in = stacked(obs_dim + act_dim, 1, hidden)
        self.w_hidden = nn.ParameterList([stacked(hidden, hidden, hidden) for _ in range(layers - 1)])
        self.b_hidden = nn.ParameterList([stacked(hidden, 1, hidden) for _ in range(layers - 1)])
        self.w_out, self.b_out = stacked(hidden, hidden, 1), stacked(hidden, 1, 1)

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """obs [B, S], actions [B, N, A] -> Q values [K, B, N]."""
        (batch, n, act_dim), k = actions.shape, self.w_obs.shape[0]
        state_part = torch.baddbmm(self.b_in, obs.expand(k, -1, -1), self.w_obs)  # [K, B, H], once per state
        action_part = torch.bmm(actions.reshape(1, batch * n, act_dim).expand(k, -1, -1), self.w_act)  # [K, B*N, H]
        x = (action_part.view(k, batch, n, -1) + state_part.unsqueeze(2)).relu_().view(k, batch * n, -1)
        for w, b in zip(self.w_hidden, self.b_hidden, strict=True):
            x = torch.baddbmm(b, x, w).relu_()
        # The values EMaQ compares (max over N) and regresses (eq. 10) leave in fp32, also under bf16 autocast:
        # bf16's spacing at Q = 1000 is 4 to 8, as large as the differences between the N candidates.
        return fp32_output_layer(x, self.w_out, self.b_out).view(k, batch, n)


def ensemble(q_values: torch.Tensor, lam: float) -> torch.Tensor:
    """Ensemble / TestEnsemble over the K members (dim 0): lambda * min + (1 - lambda) * max."""
    return lam * q_values.min(0).values + (1 - lam) * q_values.max(0).values


# ---------------------------------------------------------------------------------------------------
# EMaQ: the target (eq. 11), one update (eq. 10), and the test-time policy (Algorithm 1)
# ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def emaq_target(mu, q_target, rewards, next_obs, terminals, args, states_per_chunk: int | None = None) -> torch.Tensor:
    """y = r + gamma * (1 - t) * max_{i<=N} Ensemble(Q_target(s', a'_i)), a'_i ~ mu(.|s')   (eq. 11).
    The B x N x K values are computed `states_per_chunk` next states at a time (see `target_states_per_chunk`)."""
    samples = mu.sample(next_obs, args.num_samples)  # [B, N, A], all at once: mu sizes its own chunks
    backups, chunk = [], states_per_chunk or len(next_obs)
    for obs_chunk, samples_chunk in zip(next_obs.split(chunk), samples.split(chunk), strict=True):
        values = ensemble(q_target(obs_chunk, samples_chunk), args.ensemble_lambda)  # [b, N], fp32
        if args.backup == "max":
            backups.append(values.max(-1).values)
        else:  # soft-EMaQ (Appendix J, eq. 71-74): softmax(alpha * Q)-weighted average of the N values
            backups.append((torch.softmax(args.soft_alpha * values, -1) * values).sum(-1))
    return rewards + args.gamma * (1 - terminals) * torch.cat(backups)


def emaq_update(batch, target_mu, target_q, q_ensemble, q_target, q_optimizer, args, states_per_chunk) -> dict:
    """One Q-ensemble update (eq. 10) on a batch; metrics stay on the device. The target reads `target_mu` and
    `target_q`: mu and q_target themselves, or their bf16 read copies (refreshed here after the EMA)."""
    obs, actions, rewards, next_obs, terminals = batch
    with autocast(args.precision, obs.device):
        target = emaq_target(target_mu, target_q, rewards, next_obs, terminals, args, states_per_chunk)  # eq. 11
        q = q_ensemble(obs, actions.unsqueeze(1)).squeeze(-1)  # [K, B]
    loss = ((q - target) ** 2).mean(1).sum()  # eq. 10: each member's mean squared error, summed (independent members)
    q_optimizer.zero_grad(set_to_none=True)
    loss.backward()
    q_optimizer.step()
    with torch.no_grad():
        for p_target, p, p_read in zip(
            q_target.parameters(), q_ensemble.parameters(), target_q.parameters(), strict=True
        ):
            p_target.lerp_(p, 1 - args.ema)  # theta_target <- alpha theta_target + (1 - alpha) theta
            if p_read is not p_target:
                p_read.copy_(p_target)
    return {
        "qf_loss": loss.detach() / args.num_qs,
        "qf_values": q.detach().mean(),
        "q_ensemble_std": q.detach().std(0).mean(),
        "target_values": target.mean(),
    }


@torch.no_grad()
def test_time_policy(
    mu, q_ensemble, obs, num_samples: int, test_lambda: float, generator=None, temperature: float = 1.0
) -> torch.Tensor:
    """Algorithm 1: sample N actions from mu(.|s), return the argmax of TestEnsemble({Q_k(s, a_i)}). The paper samples
    mu itself (temperature 1); other temperatures are for diagnostics."""
    candidates = mu.sample(obs, num_samples, temperature=temperature, generator=generator)  # [B, N, A]
    scores = ensemble(q_ensemble(obs, candidates), test_lambda)  # [B, N]
    return candidates[torch.arange(len(obs), device=obs.device), scores.argmax(-1)]


# ---------------------------------------------------------------------------------------------------
# Evaluation in the environment recovered from the dataset, vectorized over episodes
# ---------------------------------------------------------------------------------------------------
def evaluate(policy, envs, obs_space, normalize, seed: int, device, frames: list | None = None) -> np.ndarray:
    """Undiscounted return of the first episode of every sub-environment. The policy draws from its own generator,
    seeded like the episodes: evaluating never moves the training's random streams. With a `frames` list, the first
    sub-environment's episode is rendered into it (rendering reads the simulation, never changes it)."""
    obs, _ = envs.reset(seed=seed)
    generator = torch.Generator(device).manual_seed(seed)
    returns, done = np.zeros(envs.num_envs), np.zeros(envs.num_envs, dtype=bool)
    if frames is not None:
        frames.append(envs.unwrapped.envs[0].render())
    while not done.all():
        obs_t = normalize(torch.as_tensor(flatten_obs(obs_space, obs), device=device))
        actions = policy(obs_t, generator).cpu().numpy()
        obs, rewards, terminated, truncated, _ = envs.step(actions)
        if frames is not None and not done[0]:
            frames.append(envs.unwrapped.envs[0].render())
        returns += rewards * ~done
        done |= terminated | truncated
    return returns


def normalized(returns, ref):
    """D4RL convention: 100 * (return - random) / (expert - random)."""
    return None if ref is None else float(100 * (np.mean(returns) - ref[0]) / (ref[1] - ref[0]))


def standard_error(returns) -> float:
    """The standard error of the mean return over episodes: std (ddof 1) / sqrt(episodes); NaN for one episode."""
    returns = np.asarray(returns, dtype=float)
    return float(returns.std(ddof=1) / np.sqrt(len(returns))) if len(returns) > 1 else float("nan")


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
        values = ensemble(q_ensemble(chunk, samples), test_lambda).sort(-1).values  # [b, M]
        rows.append(values[:, -1:] - values @ weights.T)
    return torch.cat(rows).cpu().numpy()


# ---------------------------------------------------------------------------------------------------
def main(args: Args):
    if args.evaluate_run:
        return evaluate_saved_run(args)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    args, ckpt = resolve_resume(args)
    args = check_args(args, device)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic

    # Data: the whole dataset lives on the device, observations normalized once
    dataset = load_minari_dataset(args.dataset_id, args.seed)
    low, high = dataset_action_bounds(dataset, args.dataset_id)
    data = check_and_clip(episodes_to_transitions(dataset, args.gamma), low, high, args.dataset_id)
    data = {key: torch.as_tensor(value, device=device) for key, value in data.items()}
    num_transitions, obs_dim, act_dim = *data["obs"].shape, data["actions"].shape[1]
    obs_mean, obs_std = data["obs"].mean(0), data["obs"].std(0) + 1e-3
    if not args.normalize_obs:
        obs_mean, obs_std = torch.zeros_like(obs_mean), torch.ones_like(obs_std)
    normalize = lambda o: (o - obs_mean) / obs_std  # noqa: E731
    data["obs"], data["next_obs"] = normalize(data["obs"]), normalize(data["next_obs"])
    batch_keys = ("obs", "actions", "rewards", "next_obs", "terminals")
    render_env = functools.partial(dataset.recover_environment, eval_env=True, **VIDEO_RENDER)
    video = args.capture_video and not video_unavailable(render_env)  # the first episode of every evaluation, as mp4
    envs, ref = make_eval_envs(dataset, args.eval_episodes, video), reference_scores(dataset)
    perm = torch.randperm(num_transitions, generator=torch.Generator().manual_seed(args.seed)).to(device)
    num_holdout = min(int(args.behavior_holdout * num_transitions), 10_000)
    holdout_idx, train_idx = perm[:num_holdout], perm[num_holdout:]  # mu's held-out NLL
    diagnostic_idx = diagnostic_states(data, args.diagnostic_states, args.eval_seed)  # Q's diagnostics, at evaluations

    # Models: mu, the Q ensemble and its EMA target; a checkpoint, if resuming, is restored here and only here
    if args.behavior_path:
        mu = load_behavior_model(args, obs_dim, act_dim).to(device)
    else:
        mu = (
            VAEBehaviorModel(obs_dim, low, high)
            if args.behavior_model == "vae"
            else BehaviorModel.from_preset(args.preset, obs_dim, low, high)
        ).to(device)
    mu_optimizer = torch.optim.Adam(mu.parameters(), lr=args.behavior_lr, fused=True)
    q_ensemble = QEnsemble(obs_dim, act_dim, args.num_qs, args.q_hidden, args.q_layers).to(device)
    q_target = copy.deepcopy(q_ensemble).requires_grad_(False)
    q_optimizer = torch.optim.Adam(q_ensemble.parameters(), lr=args.q_lr, fused=True)
    models = dict(mu=mu, mu_optimizer=mu_optimizer, q_ensemble=q_ensemble, q_target=q_target, q_optimizer=q_optimizer)
    run = dict(phase="behavior", step=0, history=[], mu_eval=None, last_returns=None)  # checkpointed
    if ckpt:
        run = restore_checkpoint(ckpt, models, args)
    run_dir, writer = open_run_dir(args, ckpt)
    log(
        f"{args.dataset_id}: {num_transitions} transitions, obs {obs_dim}, actions {act_dim}, device {device}, "
        f"run {run_dir}" + (f", resuming {ckpt['phase']} at update {ckpt['step']}" if ckpt else "")
    )
    nonfinite_at = torch.full((), -1, device=device)  # the first update whose loss was NaN/Inf; read when logging
    save = lambda: save_checkpoint(run_dir, run, models, nonfinite_at)  # noqa: E731
    handle_stop_signals()
    # What the run will cost, before it starts (a few timed updates on copies), and the device's peak for the MFU
    estimate, estimated_rate = estimate_run_time(
        args, device, run, data, mu, q_ensemble, q_target, envs, dataset.observation_space, normalize
    )
    log(estimate)
    writer.add_scalar("charts/estimated_SPS", estimated_rate, run["step"])
    flops, (peak, peak_how) = update_flops(args, mu, obs_dim, act_dim), peak_flops(device, args.precision)
    log(f"MFU: {flops / 1e9:.2f} GFLOP per Q update, peak {peak / 1e12:.2f} TFLOP/s ({peak_how})")
    fps = envs.unwrapped.envs[0].metadata.get("render_fps", 30)

    # mu(a|s): maximum likelihood on the training split (teacher forcing, all dimensions in one pass)
    if run["phase"] == "behavior" and not args.behavior_path:
        progress = progress_bar("mu", run["step"], args.behavior_updates)
        for step in progress:
            idx = train_idx[torch.randint(len(train_idx), (args.batch_size,), device=device)]
            with autocast(args.precision, device):
                nll = mu.loss(data["obs"][idx], data["actions"][idx])
            mu_optimizer.zero_grad(set_to_none=True)
            nll.backward()
            mu_optimizer.step()
            nonfinite_at = torch.where((nonfinite_at < 0) & ~torch.isfinite(nll), step, nonfinite_at)
            run["step"] = step
            if step % args.log_every == 0 or step == args.behavior_updates:
                stop_if_nonfinite(nonfinite_at, run_dir)  # host syncs: once per log interval
                writer.add_scalar("losses/behavior_nll", nll.item(), step)
                progress.set_postfix(nll=f"{nll.item():.3f}")
            if step % args.checkpoint_every == 0:
                save()
            stop_if_requested(run, save, run_dir)
    mu.eval().requires_grad_(False)
    if run["phase"] == "behavior":  # mu alone: the behavior-cloning baseline, before any EMaQ training
        mu.save(os.path.join(run_dir, "mu.pt"))
        atomic_save(dict(dataset_id=args.dataset_id, normalize_obs=args.normalize_obs), f"{run_dir}/mu.json")
        with torch.no_grad():
            heldout = [-mu.log_prob(data["obs"][i], data["actions"][i]) for i in holdout_idx.split(4096)]
        if heldout:
            writer.add_scalar("eval/behavior_heldout_nll", torch.cat(heldout).mean().item(), 0)

        # Behavior cloning, two ways: mu sampled (one sample per step), and mu's deterministic policy (temperature 0:
        # the most likely bin of every dimension; for the VAE, the decoder's mean at z = 0), the usual BC column
        run["mu_eval"] = {}
        for name, temperature in (("", 1.0), ("greedy_", 0.0)):

            def behavior_policy(obs, generator, temperature=temperature):
                return mu.sample(obs, 1, temperature=temperature, generator=generator)[:, 0]

            frames = [] if video and not name else None
            returns = evaluate(
                behavior_policy, envs, dataset.observation_space, normalize, args.eval_seed, device, frames
            )
            if frames:
                write_video(run_dir, writer, "mu_sampled", frames, fps, 0)
            run["mu_eval"] |= {f"{name}returns": returns.tolist(), f"{name}score": normalized(returns, ref)}
            writer.add_scalar(f"eval/behavior_{name}return", returns.mean(), 0)
            if ref:
                writer.add_scalar(f"eval/behavior_{name}{ref[2]}", normalized(returns, ref), 0)
        run["phase"], run["step"] = "emaq", 0
    mu_return, mu_score = float(np.mean(run["mu_eval"]["returns"])), run["mu_eval"]["score"]
    log(f"mu alone: return {mu_return:.1f}" + (f", {ref[2]} {mu_score:.1f}" if ref else ""))

    # EMaQ: the Q ensemble trained with the target of eq. 11 (Algorithm 1, Appendix C)
    target_mu, target_q = mu, q_target  # in bf16, the target reads bf16 copies (the fp32 target stays the EMA's master)
    if args.precision == "bf16":
        target_mu, target_q = bf16_copy(mu, MU_OUTPUT), bf16_copy(q_target, Q_OUTPUT)
    states_per_chunk = target_states_per_chunk(args, mu, device)

    def update():
        idx = torch.randint(num_transitions, (args.batch_size,), device=device)  # drawn on the device
        batch = [data[key][idx] for key in batch_keys]
        return emaq_update(batch, target_mu, target_q, q_ensemble, q_target, q_optimizer, args, states_per_chunk)

    update = compile_update(update, args)  # torch.compile (+ CUDA graphs) where it pays; eager otherwise

    def policy(obs, generator):  # Algorithm 1
        return test_time_policy(mu, q_ensemble, obs, args.num_samples, args.test_ensemble_lambda, generator)

    progress = progress_bar("EMaQ", run["step"], args.total_updates)
    # updates/s are measured from 10 updates in (a burn-in), so compiling does not count as training speed
    burn_in_end, speed_from, speed_step, postfix = run["step"] + 10, None, None, {}
    for step in progress:
        metrics = update()
        finite = torch.isfinite(metrics["qf_loss"]) & torch.isfinite(metrics["qf_values"])
        nonfinite_at = torch.where((nonfinite_at < 0) & ~finite, step, nonfinite_at)
        run["step"] = step
        is_last = step == args.total_updates
        if step == burn_in_end:
            speed_from, speed_step = time.time(), step
        if step % args.log_every == 0 or step % args.checkpoint_every == 0 or is_last:
            stop_if_nonfinite(nonfinite_at, run_dir)  # host syncs: once per log or checkpoint interval
            for key, value in metrics.items():
                writer.add_scalar(f"losses/{key}", value.item(), step)
            if speed_from is not None and step > speed_step:
                sps = (step - speed_step) / (time.time() - speed_from)
                writer.add_scalar("charts/SPS", sps, step)
                mfu = 100 * sps * flops / peak  # percent of the measured peak
                writer.add_scalar("charts/mfu", mfu, step)
                postfix["mfu"] = f"{mfu:.2g}%"
                progress.set_postfix(postfix)
                speed_from, speed_step = time.time(), step
        if step % args.eval_every == 0 or is_last:
            eval_envs = envs
            if is_last and args.final_eval_episodes != args.eval_episodes:  # the reported score: more episodes
                eval_envs = make_eval_envs(dataset, args.final_eval_episodes, video)
            frames = [] if video else None
            returns = evaluate(policy, eval_envs, dataset.observation_space, normalize, args.eval_seed, device, frames)
            if frames:
                write_video(run_dir, writer, f"update_{step:07d}", frames, fps, step)
            if eval_envs is not envs:
                eval_envs.close()
            score = normalized(returns, ref)
            run["history"].append([step, float(returns.mean()), score])
            run["last_returns"] = returns.tolist()
            writer.add_scalar("eval/episodic_return", returns.mean(), step)
            writer.add_scalar("eval/episodic_return_std", returns.std(), step)
            writer.add_scalar("eval/episodic_return_stderr", standard_error(returns), step)
            if ref:
                writer.add_scalar(f"eval/{ref[2]}", score, step)
            postfix.update(ret=f"{returns.mean():.0f}", **({"score": f"{score:.1f}"} if ref else {}))
            progress.set_postfix(postfix)
            log_q_diagnostics(writer, step, mu, q_ensemble, data, diagnostic_idx, args)
            if speed_from is not None:  # updates/s count updates only, never the evaluations between them
                speed_from, speed_step = time.time(), step
        if step % args.checkpoint_every == 0 and not is_last:
            save()
        stop_if_requested(run, save, run_dir)
    progress.close()

    # Delta(s, N) (Section 3.3), the final checkpoint and the summary
    if args.delta_ns:
        compute_delta(args, run_dir, writer, mu, q_ensemble, envs, dataset.observation_space, normalize, data["obs"])
    envs.close()
    if args.save_model:
        mu.save(os.path.join(run_dir, "mu.pt"))
        saved = {key: models[key].state_dict() for key in ("q_ensemble", "q_target", "q_optimizer")}
        saved.update(obs_mean=obs_mean.cpu(), obs_std=obs_std.cpu(), step=args.total_updates)
        atomic_save(saved, os.path.join(run_dir, "model.pt"))
    run["phase"] = "done"
    save()
    summary = dict(dataset_id=args.dataset_id, mu_return=mu_return, mu_score=mu_score, history=run["history"])
    summary.update(mu_return_stderr=standard_error(run["mu_eval"]["returns"]), score_tag=ref[2] if ref else None)
    if "greedy_returns" in run["mu_eval"]:  # runs checkpointed before the greedy baseline existed lack it
        greedy = run["mu_eval"]["greedy_returns"]
        summary |= dict(mu_greedy_return=float(np.mean(greedy)), mu_greedy_score=run["mu_eval"]["greedy_score"])
        summary |= dict(mu_greedy_return_stderr=standard_error(greedy))
    summary["last_eval"] = evaluation_summary(run["last_returns"], ref) if run["last_returns"] else None
    atomic_save(summary, os.path.join(run_dir, "summary.json"))
    writer.close()
    print(one_line_summary(summary, run_dir))
    return summary


# ===================================================================================================
# Run plumbing. A reader can stop here: what follows checks flags, loads and generates datasets, makes the update
# fast, estimates a run's cost and its MFU, records videos, writes checkpoints and resumes, handles signals, writes
# Delta's files and Q's diagnostics, evaluates saved runs.
# ===================================================================================================
def log(message: str):
    """Progress notes go to stderr beside the progress bars; stdout carries only the final summary line."""
    tqdm.write(message, file=sys.stderr)


def close_progress_bars():
    """Close open progress bars, so that the line printed next is the last one on the screen."""
    for bar in list(getattr(tqdm, "_instances", [])):
        bar.close()


def progress_bar(desc: str, done: int, total: int):
    """Updates done + 1 .. total, with a bar that shows updates/s and starts at `done` (a resumed run)."""
    return tqdm(range(done + 1, total + 1), desc=desc, unit="upd", mininterval=1.0, initial=done, total=total)


def fail(message: str):
    """End the run with one clear line and exit code 2; no traceback for a user's mistake."""
    close_progress_bars()
    log(f"error: {message}")
    sys.exit(2)


# Table 2 (MuJoCo) and Table 3 (kitchen, antmaze, adroit); "cpu" is not the paper's: Table 3's mu, a small ensemble,
# and the settings that scored best in a grid at a 30k-update budget (README, "The CPU preset").
PRESETS = {
    "mujoco": dict(batch_size=256, num_qs=8, q_hidden=750, q_layers=3),
    "table3": dict(batch_size=128, num_qs=16, q_hidden=256, q_layers=4),
    "cpu": dict(batch_size=256, num_qs=4, q_hidden=256, q_layers=3),
}
PAPER = dict(num_samples=10, q_lr=1e-4, ema=0.995, behavior_updates=300_000, total_updates=1_000_000)  # Table 2
CPU_PRESET = dict(num_samples=5, q_lr=3e-4, ema=0.98, behavior_updates=20_000, total_updates=30_000)
TABLE3_ENVS = ("kitchen", "antmaze", "door", "hammer", "pen", "relocate")  # Minari's D4RL names of Table 3's domains


def preset_for(dataset_id: str) -> str:
    """Table 3's sizes for kitchen, antmaze and adroit, decided by the environment part of the id, never a substring
    ("pen" is not "invertedpendulum"): D4RL/pen/cloned-v2 -> pen; emaq/AntMaze_UMaze-v4/random-v0 -> antmaze_umaze."""
    parts = dataset_id.lower().split("/")
    env = re.sub(r"-v\d+$", "", parts[-2] if len(parts) >= 2 else parts[0])
    # generated ids of the same domains name Gymnasium-Robotics environments
    generated = env.startswith(("frankakitchen", "antmaze_", "adroithand"))
    return "table3" if env in TABLE3_ENVS or generated else "mujoco"


def check_args(args: Args, device) -> Args:
    """Fill in presets and 'auto' flags, refuse impossible values. Speed flags' auto: the fastest correct path measured
    (README.md, "Benchmarks"): bf16 where matmuls run natively in it; compile and CUDA graphs on a GPU, not on a CPU."""
    if args.preset == "auto":
        args.preset = preset_for(args.dataset_id)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key, value in (CPU_PRESET if args.preset == "cpu" else PAPER).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    resolve_speed_flags(args, device)
    if args.final_eval_episodes is None:
        args.final_eval_episodes = args.eval_episodes
    problems = [
        (args.num_samples < 1, f"--num-samples (N) must be >= 1, got {args.num_samples}"),
        (args.num_qs < 1, f"--num-qs (K) must be >= 1, got {args.num_qs}"),
        (not 0 <= args.ensemble_lambda <= 1, f"--ensemble-lambda must lie in [0, 1], got {args.ensemble_lambda}"),
        (not 0 <= args.test_ensemble_lambda <= 1, "--test-ensemble-lambda must lie in [0, 1]"),
        (
            min(args.batch_size, args.q_hidden, args.q_layers, args.eval_episodes, args.eval_every, args.log_every) < 1,
            "--batch-size, --q-hidden, --q-layers, --eval-episodes, --eval-every and --log-every must be >= 1",
        ),
        (min(args.total_updates, args.behavior_updates) < 0, "--total-updates and --behavior-updates must be >= 0"),
        (args.final_eval_episodes < 1, f"--final-eval-episodes must be >= 1, got {args.final_eval_episodes}"),
        (args.checkpoint_every < 1, "--checkpoint-every must be >= 1"),
        (not 0 <= args.ema < 1 or not 0 <= args.gamma <= 1, "--ema must lie in [0, 1) and --gamma in [0, 1]"),
        (
            args.behavior_path is None and args.behavior_updates == 0,
            "--behavior-updates 0 needs --behavior-path: mu must come from somewhere",
        ),
        (
            any(n < 1 for n in args.delta_ns) or args.delta_support_samples < 1 or args.delta_states < 0,
            "--delta-ns values and --delta-support-samples must be >= 1, --delta-states >= 0",
        ),
        (not 0 <= args.behavior_holdout < 0.5, f"--behavior-holdout must lie in [0, 0.5), got {args.behavior_holdout}"),
        (
            args.cudagraphs == "on" and device.type != "cuda",
            "--cudagraphs on needs a CUDA GPU, and this run is on the CPU: drop the flag",
        ),
        (
            args.cudagraphs == "on" and args.compile == "off",
            "--cudagraphs on replays the compiled update: pass --compile on, or --cudagraphs off",
        ),
    ]
    for bad, message in problems:
        if bad:
            fail(message)
    return args


# ----- speed: bf16 read copies, target chunks, torch.compile and CUDA graphs ---------------------------
def resolve_speed_flags(args, device):
    """'auto' speed flags: bf16 where the device computes it natively (CUDA with bf16, AVX512-BF16 or AMX on a CPU),
    compile and CUDA graphs on a GPU only (no gain on a CPU; README.md, "Benchmarks")."""
    if args.precision == "auto":  # torch.cpu's helpers are private: where a build lacks them, assume no native bf16
        cpu_checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        cpu_native = any(getattr(torch.cpu, f, lambda: False)() for f in cpu_checks)
        args.precision = "bf16" if (torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_native) else "fp32"
    if args.compile == "auto":
        args.compile = "on" if device.type == "cuda" else "off"
    if args.cudagraphs == "auto":
        args.cudagraphs = "on" if device.type == "cuda" and args.compile == "on" else "off"


def autocast(precision: str, device):
    """bf16 autocast for the matmuls, or nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


MU_OUTPUT, Q_OUTPUT = (
    ("head_out_w", "head_out_b", "decoder_out"),
    ("w_out", "b_out"),
)  # output layers: fp32 in the bf16 read copies
CPU_TARGET_ROWS = 640  # (s', a') rows per target chunk on a CPU; see target_states_per_chunk


def bf16_copy(module: nn.Module, keep_fp32: tuple[str, ...]) -> nn.Module:
    """A frozen copy with bf16 parameters, except the output layers named in `keep_fp32` (they make the compared values,
    in fp32) and buffers: autocast would cast the fp32 weights again at every call and every chunk; the target reads
    these, refreshed once per update."""
    module = copy.deepcopy(module).requires_grad_(False)
    for name, p in module.named_parameters():
        if name.split(".")[0] not in keep_fp32:
            p.data = p.data.to(torch.bfloat16)
    return module


def target_states_per_chunk(args, mu, device) -> int:
    """Next states per target chunk: as many as half the free memory holds (refused up front if not one), and on a CPU
    at most CPU_TARGET_ROWS // N: [K, rows, H] activations of a few MB stay in the caches and in malloc's heap, where
    30-60 MB tensors are mapped and page-faulted afresh at every layer (README.md, "Benchmarks")."""
    per_state = 4 * args.num_samples * (3 * args.num_qs * args.q_hidden + mu.floats_per_sample)
    if args.target_memory_gb:
        budget = args.target_memory_gb * 2**30
    elif device.type == "cuda":
        budget = torch.cuda.mem_get_info(device)[0] / 2
    else:
        try:
            with open("/proc/meminfo") as f:
                budget = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable")) / 2
        except (OSError, StopIteration):
            budget = 4 * 2**30
    if per_state > budget:
        fail(
            f"the EMaQ target needs {per_state / 2**30:.2f} GiB per state for N={args.num_samples}, more than the "
            f"{budget / 2**30:.2f} GiB budget: lower --num-samples or --num-qs"
        )
    states = int(min(args.batch_size, budget // per_state))
    return states if device.type != "cpu" else max(1, min(states, CPU_TARGET_ROWS // args.num_samples))


def compile_update(update, args):
    """torch.compile the update (mode reduce-overhead: one CUDA graph per update) when asked; if compiling fails
    (no C++ compiler, no Triton, an unsupported op), warn once and go on eagerly (a real error recurs eagerly)."""
    if args.compile != "on":  # "auto" was resolved by check_args
        return update
    compiled = torch.compile(update, mode="reduce-overhead" if args.cudagraphs == "on" else None, dynamic=False)

    def compiled_update(*batches) -> dict:
        nonlocal compiled
        if args.cudagraphs == "on":  # a new step: the replay may overwrite the last step's outputs (read them before)
            torch.compiler.cudagraph_mark_step_begin()
        try:
            return compiled(*batches)
        except Exception as e:
            if compiled is update:
                raise
            reason = f"{type(e).__name__}: {str(e).splitlines()[0][:150]}"
            log(f"warning: torch.compile failed ({reason}); continuing eagerly")
            compiled = update
            return update(*batches)

    return compiled_update


# ----- what a run costs: the estimate before it starts, the model FLOP utilization while it runs ----------
def update_flops(args, mu, obs_dim: int, act_dim: int) -> int:
    """Matmul FLOPs of one EMaQ update, counted as benchmarks/bench_update.py counts them: mu's N samples for B next
    states, the K target networks on B x N pairs (their state part once per state), and the K online networks'
    forward and backward (3 x forward) on B pairs."""
    b, n, k, h = args.batch_size, args.num_samples, args.num_qs, args.q_hidden
    hidden = (args.q_layers - 1) * h * h + h
    target = 2 * k * (b * obs_dim * h + b * n * (act_dim * h + hidden))
    online = 3 * 2 * k * b * ((obs_dim + act_dim) * h + hidden)
    return mu.sample_flops(b, n) + target + online


def peak_flops(device, precision: str) -> tuple[float, str]:
    """The device's dense matmul rate in the run's precision, measured once with a short matmul (nanoGPT takes the
    card's datasheet number instead; a measurement also holds for CPUs and shared machines). (FLOP/s, how)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    size = 8192 if device.type == "cuda" else 1024
    generator = torch.Generator(device).manual_seed(0)  # its own: the run's random streams never move
    a, b = (torch.randn(size, size, device=device, dtype=dtype, generator=generator) for _ in range(2))
    rate = timed_rate(lambda: a @ b, device, min_steps=1, min_seconds=0.2, max_steps=1000)  # products per second
    return 2 * size**3 * rate, f"measured: {size}x{size} {str(dtype).split('.')[-1]} matmul"


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_rate(step, device, min_steps: int = 3, min_seconds: float = 0.5, max_steps: int = 50) -> float:
    """Steps per second of `step()`, after one warm-up call."""
    step()
    synchronize(device)
    start, steps = time.perf_counter(), 0
    while steps < min_steps or (time.perf_counter() - start < min_seconds and steps < max_steps):
        step()
        steps += 1
        synchronize(device)
    return steps / (time.perf_counter() - start)


def human_duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def estimate_run_time(args, device, run: dict, data: dict, mu, q_ensemble, q_target, envs, obs_space, normalize):
    """Time a few updates of mu and of EMaQ and a few evaluation steps, on copies of the models and with the random
    streams restored afterwards (the run computes exactly what it would without this), and return one line with the
    expected wall time of what is left, and the rates."""
    fmt = human_duration
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        batch = [data[key][: args.batch_size] for key in ("obs", "actions", "rewards", "next_obs", "terminals")]
        mu_copy, q_copy, q_target_copy = copy.deepcopy(mu), copy.deepcopy(q_ensemble), copy.deepcopy(q_target)
        q_optimizer = torch.optim.Adam(q_copy.parameters(), lr=args.q_lr)
        target_mu, target_q = mu_copy, q_target_copy
        if args.precision == "bf16":
            target_mu, target_q = bf16_copy(mu_copy, MU_OUTPUT), bf16_copy(q_target_copy, Q_OUTPUT)
        chunk = target_states_per_chunk(args, mu_copy, device)
        emaq_rate = timed_rate(
            lambda: emaq_update(batch, target_mu, target_q, q_copy, q_target_copy, q_optimizer, args, chunk), device
        )
        eval_obs = normalize(torch.as_tensor(flatten_obs(obs_space, envs.reset(seed=args.eval_seed)[0]), device=device))
        eval_actions = test_time_policy(mu_copy, q_copy, eval_obs, args.num_samples, args.test_ensemble_lambda)
        eval_rate = timed_rate(
            lambda: (
                test_time_policy(mu_copy, q_copy, eval_obs, args.num_samples, args.test_ensemble_lambda).cpu(),
                envs.step(eval_actions.cpu().numpy()),
            ),
            device,
        )
        mu_rate = None
        if run["phase"] == "behavior" and not args.behavior_path:
            mu_copy.requires_grad_(True)
            mu_optimizer = torch.optim.Adam(mu_copy.parameters(), lr=args.behavior_lr)

            def mu_step():
                with autocast(args.precision, device):
                    loss = mu_copy.loss(batch[0], batch[1])
                mu_optimizer.zero_grad(set_to_none=True)
                loss.backward()
                mu_optimizer.step()

            mu_rate = timed_rate(mu_step, device)
    mu_left = args.behavior_updates - run["step"] if mu_rate else 0
    emaq_left = args.total_updates - (run["step"] if run["phase"] == "emaq" else 0)
    evaluations = emaq_left // args.eval_every + 1 + (2 if mu_rate else 0)  # mu sampled and greedy, before EMaQ
    spec = envs.unwrapped.envs[0].spec
    eval_seconds = evaluations * spec.max_episode_steps / eval_rate if spec and spec.max_episode_steps else 0
    total = (mu_left / mu_rate if mu_rate else 0) + emaq_left / emaq_rate + eval_seconds
    line = f"estimate on {device.type} ({args.precision}"
    line += ", measured eagerly: compiled updates are faster)" if args.compile == "on" else ")"
    if mu_rate:
        line += f": mu {mu_left:,} updates {fmt(mu_left / mu_rate)} ({mu_rate:.1f} upd/s),"
    line += f" EMaQ {emaq_left:,} updates {fmt(emaq_left / emaq_rate)} ({emaq_rate:.1f} upd/s),"
    line += f" {evaluations} evaluations up to {fmt(eval_seconds)} ({100 * eval_seconds / total:.0f}%): {fmt(total)}"
    if device.type == "cpu" and total > 3 * 3600 and args.preset != "cpu":
        line += "; on a CPU try --preset cpu (not the paper's configuration: README, 'The CPU preset')"
    return line, emaq_rate


# ----- videos of evaluation episodes (--capture-video) -------------------------------------------------
VIDEO_RENDER = dict(render_mode="rgb_array", width=320, height=240)  # mp4 encoders want multiples of 16


def video_unavailable(make_render_env) -> bool:
    """Whether the evaluation environment cannot render offscreen here; if so, say why in one line (the run goes on
    without videos). Without a display, MuJoCo renders with EGL (a GPU's, or Mesa's software renderer on a CPU),
    unless MUJOCO_GL says otherwise."""
    problem = video_renderer_problem(make_render_env)
    if problem:
        log(
            f"note: --capture-video: no videos, the environment cannot render here ({problem}); MUJOCO_GL=egl needs "
            "libEGL (a GPU's driver or Mesa), MUJOCO_GL=osmesa needs libOSMesa; the run goes on without videos"
        )
    return problem is not None


def video_renderer_problem(make_render_env) -> str | None:
    """None if the evaluation environment renders offscreen here, else why not, in a few words."""
    if "MUJOCO_GL" not in os.environ and not os.environ.get("DISPLAY"):
        os.environ["MUJOCO_GL"] = "egl"
    env, problem = None, None
    # a renderer that fails half-way complains when its objects are freed: keep those complaints quiet here
    hook, sys.unraisablehook = sys.unraisablehook, lambda *_: None
    try:
        import imageio.v2  # noqa: F401
        import imageio_ffmpeg  # noqa: F401

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            env = make_render_env()
            env.reset(seed=0)
            frame = env.render()
        if frame is None or frame.shape[:2] != (VIDEO_RENDER["height"], VIDEO_RENDER["width"]):
            problem = "its render() returned no frame of the asked size"
    except Exception as e:
        problem = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else 'no message'}"
    try:
        if env is not None:
            env.close()
    except Exception:
        pass
    env = None
    gc.collect()
    sys.unraisablehook = hook
    return problem


def write_video(run_dir, writer, name: str, frames: list, fps: float, step: int):
    """The frames as runs/<run>/videos/<name>.mp4, and as a small animated GIF in TensorBoard (eval/video): at most
    100 frames at half size, so that a long run's event file stays small."""
    import imageio.v2 as imageio
    from PIL import Image
    from tensorboard.compat.proto.summary_pb2 import Summary

    os.makedirs(os.path.join(run_dir, "videos"), exist_ok=True)
    path = os.path.join(run_dir, "videos", f"{name}.mp4")
    imageio.mimwrite(path + ".tmp.mp4", frames, fps=fps, macro_block_size=16)
    os.replace(path + ".tmp.mp4", path)
    stride = max(1, -(-len(frames) // 100))
    small = [Image.fromarray(f).reduce(2) for f in frames[::stride]]
    gif = io.BytesIO()
    small[0].save(gif, format="GIF", save_all=True, append_images=small[1:], duration=1000 * stride / fps, loop=0)
    image = Summary.Image(
        height=small[0].height, width=small[0].width, colorspace=3, encoded_image_string=gif.getvalue()
    )
    writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag="eval/video", image=image)]), step)


# ----- datasets: load, download, generate ------------------------------------------------------------
RANDOM_ID = re.compile(r"emaq/(?P<env_id>[^/]+)/random(?:_(?P<steps>\d+))?-v0")

# D4RL's reference returns (random policy, expert), used where a dataset has no reference scores of its own.
D4RL_REF_SCORES = {
    "halfcheetah": (-280.178953, 12135.0),
    "hopper": (-20.272305, 3234.3),
    "walker2d": (1.629008, 4592.3),
    "ant": (-325.6, 3879.7),
}


def load_minari_dataset(dataset_id: str, seed: int):
    """A local dataset as it is; our generated ids on first use; any other id downloaded once."""
    import minari
    from minari.storage.datasets_root_dir import get_dataset_path

    if dataset_id not in minari.list_local_datasets():
        match = RANDOM_ID.fullmatch(dataset_id)
        if match:
            generate_random_dataset(dataset_id, match["env_id"], int(match["steps"] or 1_000_000), seed)
        elif not network_available():
            fail(
                f"dataset {dataset_id!r} is not in {get_dataset_path()} and there is no network: run "
                f"`minari download {dataset_id}` elsewhere and copy it there, or use emaq/HalfCheetah-v5/random-v0"
            )
        else:
            try:
                minari.download_dataset(dataset_id)
            except Exception as e:
                fail(f"could not download dataset {dataset_id!r} ({e}): check the id with `minari list remote`")
    try:
        return minari.load_dataset(dataset_id)
    except Exception as e:
        fail(f"could not load dataset {dataset_id!r}: {e}")


def network_available(host="huggingface.co", port=443, timeout=3.0) -> bool:
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def generate_random_dataset(dataset_id: str, env_id: str, steps: int, seed: int):
    """The paper's 'random' protocol: `steps` transitions of a uniform random policy, saved as a Minari dataset.
    Written into a hidden folder of the Minari root, then renamed into place: a killed generation leaves nothing
    that looks like a dataset, and the next run generates it again."""
    import shutil

    import minari
    from minari.data_collector.episode_buffer import EpisodeBuffer
    from minari.storage.datasets_root_dir import get_dataset_path

    try:
        env = gym.make(env_id)
        action_bounds(env.action_space)
    except (gym.error.Error, ValueError) as e:
        fail(f"cannot generate {dataset_id}: {e}")
    env.action_space.seed(seed)
    buffers, returns, obs = [], [], env.reset(seed=seed)[0]
    episode = dict(observations=[obs], actions=[], rewards=[], terminations=[], truncations=[])
    for t in tqdm(range(steps), desc=f"generating {dataset_id}", unit="step", mininterval=1.0):
        action = env.action_space.sample()
        obs, reward, terminated, truncated, _ = env.step(action)
        truncated = truncated or t == steps - 1  # the last, cut-off episode ends truncated
        for key, value in zip(episode, (obs, action, reward, terminated, truncated), strict=True):
            episode[key].append(value)
        if terminated or truncated:
            if terminated or len(episode["rewards"]) == env.spec.max_episode_steps:
                returns.append(sum(episode["rewards"]))  # complete episodes only: the random policy's return
            buffer = dict(observations=np.asarray(episode["observations"]), actions=np.asarray(episode["actions"]))
            buffers.append(EpisodeBuffer(id=len(buffers), **buffer, **{k: episode[k] for k in list(episode)[2:]}))
            obs, _ = env.reset()
            episode = dict(observations=[obs], actions=[], rewards=[], terminations=[], truncations=[])
    family = env_id.split("-")[0].lower()  # reference min: this random policy's return; max: D4RL's expert constant
    scores = {}
    if family in D4RL_REF_SCORES and returns:
        scores = dict(ref_min_score=float(np.mean(returns)), ref_max_score=D4RL_REF_SCORES[family][1])
    root = get_dataset_path()
    for stale in root.glob(".emaq-generating-*"):  # left by killed generations (their process is gone)
        if not os.path.exists(f"/proc/{stale.name.rsplit('-', 1)[1]}"):
            shutil.rmtree(stale, ignore_errors=True)
    staging = root / f".emaq-generating-{os.getpid()}"
    os.environ["MINARI_DATASETS_PATH"], saved_root = str(staging), os.environ.get("MINARI_DATASETS_PATH")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            about = dict(algorithm_name="uniform random policy", author="emaq_offline.py", author_email="none")
            about["description"] = f"{steps} transitions of a uniform random policy in {env_id} (D4RL's protocol)"
            about["code_permalink"] = "emaq_offline.py: generate_random_dataset"
            minari.create_dataset_from_buffers(dataset_id, buffers, env=env_id, **about, **scores)
        for folder in staging.rglob("*"):  # the namespaces' metadata files first, then the dataset in one rename
            if folder.name == "namespace_metadata.json" and not (root / folder.relative_to(staging)).exists():
                os.makedirs((root / folder.relative_to(staging)).parent, exist_ok=True)
                shutil.copy(folder, root / folder.relative_to(staging))
        os.makedirs((root / dataset_id).parent, exist_ok=True)
        os.replace(staging / dataset_id, root / dataset_id)
    finally:
        os.environ.pop("MINARI_DATASETS_PATH")
        if saved_root is not None:  # as it was: the user's folder, or unset for ~/.minari/datasets
            os.environ["MINARI_DATASETS_PATH"] = saved_root
        shutil.rmtree(staging, ignore_errors=True)


def dataset_action_bounds(dataset, dataset_id: str):
    try:
        return action_bounds(dataset.action_space)
    except ValueError as e:
        fail(f"dataset {dataset_id}: {e}")


def check_and_clip(data: dict, low, high, dataset_id: str):
    """Refuse NaN/Inf (naming where), clip actions to the action space and report the count once."""
    for key, value in data.items():
        bad = ~np.isfinite(value)
        if bad.any():
            row = np.nonzero(bad.reshape(len(value), -1).any(1))[0][0]
            fail(
                f"dataset {dataset_id} has {int(bad.sum())} NaN/Inf values in {key} (first at transition {row}): "
                f"clean those episodes out of the dataset"
            )
    low, high = np.asarray(low, np.float32), np.asarray(high, np.float32)
    outside = int(((data["actions"] < low) | (data["actions"] > high)).sum())
    if outside:
        log(f"note: clipped {outside} action coordinates that lay outside the action space [{low.min()}, {high.max()}]")
        data["actions"] = np.clip(data["actions"], low, high)
    return data


def reference_scores(dataset):
    """(min, max, tag): the dataset's own reference scores, else D4RL's for the same env family, else None."""
    meta = dataset.storage.metadata
    if meta.get("ref_min_score") is not None and meta.get("ref_max_score") is not None:
        return meta["ref_min_score"], meta["ref_max_score"], "normalized_score"
    spec = dataset._eval_env_spec or dataset.env_spec  # Minari keeps the evaluation spec private
    family = spec.id.split("-")[0].lower() if spec is not None else ""
    if family in D4RL_REF_SCORES:
        return (*D4RL_REF_SCORES[family], "normalized_score_d4rl_ref")
    return None


def make_eval_envs(dataset, num_episodes: int, video: bool = False):
    """`num_episodes` evaluation environments in one vector env; with `video`, the first renders its frames."""
    render = VIDEO_RENDER if video else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return gym.vector.SyncVectorEnv(
                [
                    lambda i=i: dataset.recover_environment(eval_env=True, **(render if i == 0 else {}))
                    for i in range(num_episodes)
                ]
            )
        except Exception as e:
            fail(f"cannot build the evaluation environment of {dataset.spec.dataset_id}: {e}")


def load_behavior_model(args: Args, obs_dim: int, act_dim: int):
    """A saved mu; it must have been trained on this dataset, with this observation normalization, for these shapes."""
    try:
        model = VAEBehaviorModel if args.behavior_model == "vae" else BehaviorModel
        mu = model.load(args.behavior_path, obs_dim=obs_dim, act_dim=act_dim)
    except ValueError as e:
        fail(str(e))
    meta_path = os.path.join(os.path.dirname(os.path.abspath(args.behavior_path)), "mu.json")
    if not os.path.exists(meta_path):
        log(f"note: {meta_path} is missing: cannot check that {args.behavior_path} was trained on {args.dataset_id}")
        return mu
    with open(meta_path) as f:
        meta = json.load(f)
    if (meta["dataset_id"], meta["normalize_obs"]) != (args.dataset_id, args.normalize_obs):
        fail(
            f"{args.behavior_path} was trained on {meta['dataset_id']} with normalize_obs={meta['normalize_obs']}, "
            f"unlike this run: pass a mu trained on {args.dataset_id} with normalize_obs={args.normalize_obs}"
        )
    return mu


# ----- run directory, checkpoints, resume, signals ---------------------------------------------------
def open_run_dir(args: Args, ckpt):
    """runs_dir/<dataset>__<exp_name>__<seed>__<time>, or the resumed run's; config.json and the TensorBoard writer."""
    run_name = f"{args.dataset_id.replace('/', '__')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = args.resume or os.path.join(args.runs_dir, run_name)
    try:
        os.makedirs(run_dir, exist_ok=True)
        atomic_save(asdict(args), os.path.join(run_dir, "config.json"))  # a resumed run may have a new total_updates
    except OSError as e:
        fail(f"cannot write the run directory {run_dir}: {e.strerror}; pass a writable --runs-dir")
    writer = SummaryWriter(run_dir)
    if not ckpt:
        table = "\n".join(f"|{key}|{value}|" for key, value in asdict(args).items())
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + table)
    return run_dir, writer


def atomic_save(obj, path: str):
    """Write a temporary file beside `path`, then rename it: a crash or a full disk never leaves a torn file."""
    tmp = f"{path}.tmp"
    try:
        if path.endswith(".json"):
            with open(tmp, "w") as f:
                json.dump(obj, f, indent=2)
        else:
            torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": [version, torch.tensor(py_state), py_gauss],
    }


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate((state["python"][0], tuple(state["python"][1].tolist()), state["python"][2]))


def save_checkpoint(run_dir, run: dict, models: dict, nonfinite_at):
    """Everything a resumed run needs: models, targets, optimizers, RNG states, counters, history. Never a state that
    went NaN/Inf: the previous checkpoint stays the last good one."""
    stop_if_nonfinite(nonfinite_at, run_dir)
    state = {**run, "rng": rng_state(), **{key: module.state_dict() for key, module in models.items()}}
    try:
        atomic_save(state, os.path.join(run_dir, "checkpoint.pt"))
        atomic_save({"phase": run["phase"], "step": run["step"]}, os.path.join(run_dir, "checkpoint.json"))
    except OSError as e:
        fail(
            f"could not write a checkpoint into {run_dir} ({e.strerror}); {last_checkpoint(run_dir)} is intact: "
            f"free some space, then resume with: python emaq_offline.py --resume {run_dir}"
        )


def last_checkpoint(run_dir) -> str:
    try:
        with open(os.path.join(run_dir, "checkpoint.json")) as f:
            meta = json.load(f)
        return f"the checkpoint {run_dir}/checkpoint.pt ({meta['phase']} update {meta['step']})"
    except (OSError, ValueError, KeyError):
        return "no earlier checkpoint"


def stop_if_nonfinite(nonfinite_at: torch.Tensor, run_dir):
    """Fail, naming the first update whose loss or Q values were NaN/Inf (a host sync: call at log intervals)."""
    if (bad := int(nonfinite_at)) >= 0:
        fail(
            f"the losses became NaN/Inf at update {bad}; the last good state is {last_checkpoint(run_dir)}: resume "
            f"from it with a lower --q-lr (or --behavior-lr), or check the rewards"
        )


def resolve_resume(args: Args):
    """--resume: the saved run's flags and its checkpoint. A flag that changes what is computed is refused; speed flags
    may change, and a larger --total-updates extends the run (also a finished one)."""
    if not args.resume:
        return args, None
    try:
        with open(os.path.join(args.resume, "config.json")) as f:
            saved = Args(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.load(f).items()})
    except (OSError, ValueError, TypeError) as e:
        fail(f"{args.resume} is not a run directory of emaq_offline.py ({e}); pass runs/<run name>")
    defaults, free = Args(), {"resume", "cuda", "compile", "cudagraphs", "target_memory_gb", "total_updates"}
    conflicts = [
        f"--{f.name.replace('_', '-')} {getattr(args, f.name)} (the run has {getattr(saved, f.name)})"
        for f in dataclasses.fields(Args)
        if f.name not in free and getattr(args, f.name) not in (getattr(defaults, f.name), getattr(saved, f.name))
    ]
    if conflicts:
        fail(f"cannot resume {args.resume} with {', '.join(conflicts)}: resume without them, or start a new run")
    extend = args.total_updates != defaults.total_updates
    speed = {key: getattr(args, key) for key in free - {"total_updates"}}
    args = dataclasses.replace(saved, **speed, total_updates=args.total_updates if extend else saved.total_updates)
    path = os.path.join(args.resume, "checkpoint.pt")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        missing = [k for k in ("phase", "step", "rng", "mu", "history", "mu_eval") if k not in ckpt]
        if missing:
            raise KeyError(f"missing {missing}")
    except FileNotFoundError:
        fail(f"{args.resume} has no checkpoint.pt yet (one comes every --checkpoint-every updates): start a new run")
    except Exception as e:
        fail(
            f"{path} is truncated or not a checkpoint of emaq_offline.py ({type(e).__name__}); nothing was "
            f"overwritten: resume from a copy of the run, or start a new run"
        )
    done = ckpt["phase"] == "done"
    if done and args.total_updates <= ckpt["step"]:
        fail(
            f"the run in {args.resume} already finished; extend it with a larger --total-updates, evaluate it with "
            f"--evaluate-run {args.resume}, or start a new run"
        )
    if not done and ckpt["phase"] == "emaq" and args.total_updates < ckpt["step"]:
        fail(f"--total-updates {args.total_updates} is below the run's {ckpt['step']} updates: pass a larger one")
    return args, ckpt


def restore_checkpoint(ckpt: dict, models: dict, args: Args) -> dict:
    """Load every saved model and optimizer state and the RNGs; return the run's counters (a finished run that gets
    a larger --total-updates goes on with its EMaQ updates)."""
    for key, module in models.items():
        if ckpt.get(key) is not None:
            module.load_state_dict(ckpt[key])
    set_rng_state(ckpt["rng"])
    run = {key: ckpt[key] for key in ("phase", "step", "history", "mu_eval")} | {
        "last_returns": ckpt.get("last_returns")
    }
    if run["phase"] == "done":
        run["phase"] = "emaq"
    return run


STOP = {"signal": None}  # set by SIGINT/SIGTERM; the training loops checkpoint and exit at the next update


def handle_stop_signals():
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: STOP.update(signal=signum))


def stop_if_requested(run: dict, save, run_dir):
    if STOP["signal"] is not None:
        save()
        close_progress_bars()
        log(
            f"stopped by signal {STOP['signal']} at {run['phase']} update {run['step']}: checkpoint written. "
            f"Resume with: python emaq_offline.py --resume {run_dir}"
        )
        sys.exit(130)


# ----- Delta's files, the summary line, --evaluate-run ---------------------------------------------------
def compute_delta(args, run_dir, writer, mu, q_ensemble, envs, obs_space, normalize, data_obs):
    """Delta(s, N) over the initial states of the evaluation episodes and a sample of dataset states."""
    device = data_obs.device
    initial = normalize(torch.as_tensor(flatten_obs(obs_space, envs.reset(seed=args.eval_seed)[0]), device=device))
    generator = torch.Generator().manual_seed(args.seed)
    picked = torch.randperm(len(data_obs), generator=generator)[: args.delta_states].to(device)
    states = torch.cat([initial, data_obs[picked]])
    deltas = delta_curve(
        mu,
        q_ensemble,
        states,
        args.delta_ns,
        args.delta_support_samples,
        args.test_ensemble_lambda,
        generator=torch.Generator(device).manual_seed(args.seed),
    )
    write_delta_curve(run_dir, writer, args.delta_ns, deltas, len(initial))
    log(
        "Delta(s, N) mean over states: "
        + ", ".join(f"N={n}: {d:.3g}" for n, d in zip(args.delta_ns, deltas.mean(0), strict=True))
    )


def write_delta_curve(run_dir, writer, ns, deltas: np.ndarray, num_initial: int):
    """delta_curve.csv (N, mean, 10th and 90th percentile over states), delta_curve.png and TensorBoard (step = N)."""
    mean, p10, p90 = deltas.mean(0), np.percentile(deltas, 10, axis=0), np.percentile(deltas, 90, axis=0)
    initial, tags = deltas[:num_initial].mean(0), ("mean", "p10", "p90", "initial_states_mean")
    table = np.stack([np.asarray(ns, dtype=float), mean, p10, p90, initial], 1)
    header = "N," + ",".join(tags)
    np.savetxt(os.path.join(run_dir, "delta_curve.csv"), table, fmt="%.6g", delimiter=",", header=header, comments="")
    for n, *values in table:
        for tag, value in zip(tags, values, strict=True):
            writer.add_scalar(f"delta/{tag}", value, int(n))
    import matplotlib.pyplot as plt  # only here: a run that skips Delta never imports matplotlib

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.fill_between(ns, p10, p90, alpha=0.3, label="10th-90th percentile over states")
    ax.plot(ns, mean, marker="o", label="mean over states")
    ax.plot(ns, initial, linestyle="--", label="initial states")
    ax.set(xscale="log", xlabel="N (samples from mu)", ylabel="Delta(s, N)", title="EMaQ difficulty curve")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(run_dir, "delta_curve.png"), dpi=120)
    plt.close(fig)


@torch.no_grad()
def q_diagnostics(mu, q_ensemble, obs, actions, returns_to_go, num_samples: int, test_lambda: float, generator=None):
    """Does Q rank actions well enough for the argmax over N to pick better ones? On dataset states, with Q =
    TestEnsemble (what the test-time policy maximizes):
    - q_return_to_go_corr, q_minus_return_to_go: Q on the dataset's actions against the discounted return-to-go in
      the data (the behavior policy's value, which EMaQ with N = 1 estimates);
    - candidate_spread (signal) and ensemble_std (noise): the std of Q over N samples of mu at a state, and the std
      over the K members at those samples; when the noise is as large as the signal, the argmax follows the errors;
    - chosen_at_bounds, mu_at_bounds, data_at_bounds: the fraction of action coordinates within 2.5% of the action
      bounds, for the chosen action, for mu's samples and for the dataset's actions."""
    q_data = ensemble(q_ensemble(obs, actions.unsqueeze(1)), test_lambda).squeeze(-1)  # [S]
    candidates = mu.sample(obs, num_samples, generator=generator)  # [S, N, A]
    q_members = q_ensemble(obs, candidates)  # [K, S, N]
    scores = ensemble(q_members, test_lambda)  # [S, N]
    chosen = candidates[torch.arange(len(obs), device=obs.device), scores.argmax(-1)]
    near_a_bound = {"chosen": chosen, "mu": candidates, "data": actions}
    stats = {
        f"{name}_at_bounds": (torch.minimum(a - mu.low, mu.high - a) <= 0.025 * (mu.high - mu.low)).float().mean()
        for name, a in near_a_bound.items()
    }
    stats |= {
        "q_return_to_go_corr": torch.corrcoef(torch.stack([q_data, returns_to_go]))[0, 1],
        "q_minus_return_to_go": (q_data - returns_to_go).mean(),
        "candidate_spread": scores.std(-1).mean(),
        "ensemble_std": q_members.std(0).mean(),
    }
    return {key: value.item() for key, value in stats.items()}


def diagnostic_states(data: dict, num_states: int, seed: int) -> torch.Tensor:
    """A fixed draw of dataset states whose discounted return-to-go is exact (see episodes_to_transitions)."""
    known = torch.nonzero(data["rtg_known"]).squeeze(1)
    draw = torch.randperm(len(known), generator=torch.Generator().manual_seed(seed))
    return known[draw[:num_states].to(known.device)]


def log_q_diagnostics(writer, step: int, mu, q_ensemble, data: dict, idx: torch.Tensor, args: Args):
    """diagnostics/* at an evaluation (README, "Medium-quality data"); mu's samples from a generator of their own."""
    if not len(idx):
        return
    generator = torch.Generator(idx.device).manual_seed(args.eval_seed)
    states = (data[key][idx] for key in ("obs", "actions", "returns_to_go"))
    stats = q_diagnostics(mu, q_ensemble, *states, args.num_samples, args.test_ensemble_lambda, generator)
    for key, value in stats.items():
        writer.add_scalar(f"diagnostics/{key}", value, step)


def evaluation_summary(returns, ref) -> dict:
    """An evaluation with its uncertainty: episodes, mean return and score, and their standard errors."""
    se = standard_error(returns)
    score_se = None if ref is None else 100 * se / (ref[1] - ref[0])
    summary = dict(episodes=len(returns), returns=list(returns), return_mean=float(np.mean(returns)), return_stderr=se)
    return summary | dict(score=normalized(returns, ref), score_stderr=score_se)


def one_line_summary(summary: dict, run_dir) -> str:
    """mu alone, EMaQ's last evaluation (with standard errors over episodes) and its best one."""

    def fmt(ret, score, se=None, score_se=None):
        text = f"return {ret:.1f}" + (f" ± {se:.1f}" if se is not None else "")
        if score is not None:
            text += f" (score {score:.1f}" + (f" ± {score_se:.1f})" if score_se is not None else ")")
        return text

    text = f"{summary['dataset_id']} | mu {fmt(summary['mu_return'], summary['mu_score'], summary['mu_return_stderr'])}"
    if "mu_greedy_return" in summary:
        greedy = summary["mu_greedy_return"], summary["mu_greedy_score"], summary["mu_greedy_return_stderr"]
        text += f" | mu greedy {fmt(*greedy)}"
    if summary["history"]:
        last, best = summary["last_eval"], max(summary["history"], key=lambda h: h[1])
        text += f" | EMaQ last {fmt(last['return_mean'], last['score'], last['return_stderr'], last['score_stderr'])}"
        text += f" over {last['episodes']} episodes | best {fmt(*best[1:])} at update {best[0]}"
    return text + f" | {run_dir}"


def evaluate_saved_run(args: Args):
    """Evaluate a run saved with --save-model, and compute its Delta(s, N) curve, without training."""
    run_dir = args.evaluate_run
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            saved = Args(**json.load(f))
        blob = torch.load(os.path.join(run_dir, "model.pt"), map_location="cpu", weights_only=True)
        mu = (VAEBehaviorModel if saved.behavior_model == "vae" else BehaviorModel).load(os.path.join(run_dir, "mu.pt"))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        fail(f"{run_dir} holds no readable saved run ({e}); train with --save-model first")
    # the model's settings come from the saved run; what to evaluate comes from this command line
    what = ("eval_episodes", "eval_seed", "delta_ns", "delta_support_samples", "delta_states")
    saved = dataclasses.replace(saved, **{key: getattr(args, key) for key in what})
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    dataset = load_minari_dataset(saved.dataset_id, saved.seed)
    q_ensemble = QEnsemble(mu.obs_dim, mu.act_dim, saved.num_qs, saved.q_hidden, saved.q_layers)
    q_ensemble.load_state_dict(blob["q_ensemble"])
    mu, q_ensemble = mu.to(device).eval(), q_ensemble.to(device)
    obs_mean, obs_std = blob["obs_mean"].to(device), blob["obs_std"].to(device)
    normalize = lambda o: (o - obs_mean) / obs_std  # noqa: E731
    envs = make_eval_envs(dataset, saved.eval_episodes)

    def policy(obs, generator):
        return test_time_policy(mu, q_ensemble, obs, saved.num_samples, saved.test_ensemble_lambda, generator)

    returns = evaluate(policy, envs, dataset.observation_space, normalize, saved.eval_seed, device)
    ref = reference_scores(dataset)
    score = normalized(returns, ref)
    print(
        f"{run_dir}: {saved.eval_episodes} episodes, return {returns.mean():.1f} ± {returns.std():.1f}"
        + (f", {ref[2]} {score:.1f}" if ref else "")
    )
    if saved.delta_ns:
        data_obs = normalize(torch.as_tensor(episodes_to_transitions(dataset, saved.gamma)["obs"], device=device))
        with SummaryWriter(run_dir) as writer:
            compute_delta(saved, run_dir, writer, mu, q_ensemble, envs, dataset.observation_space, normalize, data_obs)
    envs.close()
    return {"returns": returns.tolist(), "score": score}


if __name__ == "__main__":
    main(tyro.cli(Args))
