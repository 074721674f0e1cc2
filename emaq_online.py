"""Online EMaQ (Ghasemipour, Schuurmans & Gu, ICML 2021, Appendix F), fully online or deployment-efficient.

The paper's loop: collect M environment steps with the current policy, frozen while it collects (exploration: N samples
from a temperature-smoothed mu, the best by mean + beta * std of the ensemble, eq. 67), then run M updates of mu
(maximum likelihood on the replay buffer) and of the Q ensemble (the EMaQ target, eq. 11). M = 1 is fully online;
M = 50,000 is the paper's deployment-efficient setting. Read top to bottom: Args, the environment and replay buffer,
the Q ensemble, EMaQ, exploration, evaluation, main; run plumbing comes after main. Docs: README.md.
"""

import copy
import dataclasses
import functools
import gc
import io
import json
import os
import random
import signal
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
    exp_name: str = "emaq_online"
    """the name of this experiment (part of the run directory's name)"""
    seed: int = 1
    """seed of python, numpy, torch and the environments"""
    torch_deterministic: bool = True
    """sets torch.backends.cudnn.deterministic"""
    cuda: bool = True
    """use the GPU when one is present"""
    runs_dir: str = "runs"
    """TensorBoard logs and saved models go to runs_dir/<run name>/"""

    # Environment and collection
    env_id: str = "HalfCheetah-v5"
    """a Gymnasium environment with a bounded Box action space and Box observations"""
    total_timesteps: int = 1_000_000
    """environment steps (transitions) to collect"""
    learning_starts: int = 10_000
    """uniform random actions, and no updates, for this many environment steps"""
    trajectory_batch_size: int = 1
    """M: collect M environment steps with the frozen policy, then run M updates (1: fully online; 50000: deployment)"""
    num_envs: int = 1
    """environments stepped together during collection"""
    buffer_size: int = 1_000_000
    """replay buffer capacity (transitions), kept on the training device"""

    # Exploration (Appendix F, eq. 67)
    num_samples: int = 200
    """N: actions sampled from mu for exploration, the target (eq. 11) and the test-time policy"""
    temperature: float = 1.0
    """mu's temperature in exploration (logits / T; the VAE's z * T), paper: 1, 5, 10, 20; targets and evaluation: 1"""
    ucb_beta: float = 1.0
    """beta of the exploration score mean(Q) + beta * std(Q) over the ensemble"""

    # EMaQ (Table 2 sizes)
    behavior_model: Literal["autoregressive", "vae"] = "autoregressive"
    """mu: the paper's autoregressive model (App. B) or the VAE of prior work (App. H.1), to compare (Section 5.1)"""
    behavior_preset: Literal["mujoco", "table3"] = "mujoco"
    """the autoregressive mu's sizes: 'mujoco' (750x2 state MLP, heads 3x256, 40 bins) or the smaller 'table3'"""
    num_qs: int = 8
    """K: Q functions in the ensemble"""
    q_hidden: int = 750
    """hidden width of every Q network"""
    q_layers: int = 3
    """hidden layers of every Q network"""
    batch_size: int = 256
    """minibatch size of mu and Q updates"""
    q_lr: float = 1e-4
    """Adam learning rate of the Q ensemble"""
    behavior_lr: float = 5e-4
    """Adam learning rate of mu"""
    gamma: float = 0.99
    """discount factor"""
    ema: float = 0.995
    """alpha: target <- alpha * target + (1 - alpha) * online, after every update"""
    ensemble_lambda: float = 1.0
    """Ensemble(values) = lambda * min + (1 - lambda) * max over the K targets (eq. 11)"""
    test_ensemble_lambda: float = 1.0
    """lambda of TestEnsemble in the evaluation policy (Algorithm 1)"""
    backup: Literal["max", "soft"] = "max"
    """'max': the EMaQ backup; 'soft': the softmax-weighted average over the N samples (Appendix J)"""
    soft_alpha: float = 10.0
    """alpha of the soft backup, weights softmax(alpha * Q) (Appendix J, eq. 74)"""

    # Evaluation, logging, saving
    eval_every: int = 10_000
    """evaluate the test-time policy every this many environment steps"""
    eval_episodes: int = 10
    """episodes per evaluation, run as one vectorized environment"""
    capture_video: bool = False
    """record the first episode of every evaluation to runs/<run>/videos/ (mp4) and to TensorBoard (eval/video)"""
    eval_seed: int = 0
    """seed of the evaluation episodes and of their samples from mu (the same at every evaluation)"""
    log_every: int = 1_000
    """move losses to the host and log them every this many updates"""
    save_model: bool = False
    """write mu, the Q ensemble, its targets and the config into the run directory at the end"""
    save_dataset: str | None = None
    """write every collected transition as a Minari dataset with this id (emaq_offline.py --dataset-id trains on it)"""
    checkpoint_every: int = 50_000
    """write the full state (models, optimizers, replay buffer, RNGs, environments) every this many steps + updates"""
    resume: str | None = None
    """continue the run in this run directory from its last checkpoint (a larger --total-timesteps extends it)"""

    # Speed: how fast, never what is computed (README.md, "Benchmarks")
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """bf16 matmuls in mu's and the Q updates (Q values, targets, losses, logits stay fp32); auto: bf16 where native"""
    compile: Literal["auto", "on", "off"] = "auto"
    """torch.compile the update; auto: on for a GPU, off for a CPU (no gain there); falls back to eager if it fails"""
    cudagraphs: Literal["auto", "on", "off"] = "auto"
    """replay the compiled update as one CUDA graph (GPU only); auto: on whenever --compile is on a GPU"""
    target_memory_gb: float | None = None
    """memory budget of the target's B x N x K values; unset: half of the free device memory"""


# ---------------------------------------------------------------------------------------------------
# Environment steps into a replay buffer on the training device
# ---------------------------------------------------------------------------------------------------
def make_buffer(capacity, obs_dim, act_dim, device):
    def zeros(*shape, dtype=torch.float32):
        return torch.zeros(capacity, *shape, dtype=dtype, device=device)

    buffer = dict(obs=zeros(obs_dim), actions=zeros(act_dim), rewards=zeros(), next_obs=zeros(obs_dim))
    return dict(**buffer, terminals=zeros(), truncated=zeros(), env=zeros(dtype=torch.long), ptr=0, size=0)


def buffer_add(buf, **rows):
    """Append rows (numpy arrays of equal length), overwriting the oldest when full."""
    n, capacity = len(rows["obs"]), len(buf["obs"])
    idx = torch.arange(buf["ptr"], buf["ptr"] + n) % capacity
    for key, value in rows.items():
        buf[key][idx] = torch.as_tensor(np.asarray(value), dtype=buf[key].dtype).to(buf[key].device)
    buf["ptr"], buf["size"] = (buf["ptr"] + n) % capacity, min(buf["size"] + n, capacity)


def buffer_sample(buf, batch_size) -> list[torch.Tensor]:
    idx = torch.randint(buf["size"], (batch_size,), device=buf["obs"].device)
    return [buf[key][idx] for key in ("obs", "actions", "rewards", "next_obs", "terminals")]


def step_and_store(envs, obs, actions, autoreset, buf):
    """One vector step; stores its real transitions. Returns (next_obs, ended, real, infos).

    Gymnasium 1.x autoreset: a sub-env whose episode ended on the previous step (`autoreset`) is reset by this step,
    which ignores its action. (obs, action, next_obs) there joins two episodes: it is not a transition. The older
    `final_observation` pattern does not apply: the final observation is the next_obs of the ending step."""
    next_obs, rewards, terminated, truncated, infos = envs.step(actions)
    real = ~autoreset
    if real.any():
        rows = dict(obs=obs, actions=actions, rewards=rewards, next_obs=next_obs, terminals=terminated)
        buffer_add(buf, **{k: v[real] for k, v in rows.items()}, truncated=truncated[real], env=np.nonzero(real)[0])
    return next_obs, terminated | truncated, real, infos


# ---------------------------------------------------------------------------------------------------
# Q ensemble (the same code as emaq_offline.py's)
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
# EMaQ: the target (eq. 11), one update (eq. 10), the test-time policy (Algorithm 1), exploration (Appendix F)
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


def ucb_select(q_values: torch.Tensor, candidates: torch.Tensor, beta: float) -> torch.Tensor:
    """eq. 67: the candidate with the highest mean(Q) + beta * std(Q) over the K members (population std).
    q_values [K, B, N], candidates [B, N, A] -> actions [B, A]."""
    score = q_values.mean(0) + beta * q_values.std(0, correction=0)
    return candidates[torch.arange(candidates.shape[0], device=candidates.device), score.argmax(-1)]


@torch.no_grad()
def explore(mu, q_ensemble, obs, args: Args) -> torch.Tensor:
    """Exploration policy (Appendix F): N samples from mu with logits / temperature, the best by eq. 67."""
    candidates = mu.sample(obs, args.num_samples, temperature=args.temperature)
    return ucb_select(q_ensemble(obs, candidates), candidates, args.ucb_beta)


# ---------------------------------------------------------------------------------------------------
# Evaluation (the same code as emaq_offline.py's; observations are not normalized online)
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


def flatten_obs(space: gym.Space, obs) -> np.ndarray:
    """[T, ...] observations -> [T, obs_dim] float32. Dict spaces are concatenated in the space's key order, by the
    same function for the dataset and the evaluation environment, so the order always agrees."""
    if isinstance(space, gym.spaces.Dict):
        return np.concatenate([flatten_obs(sub, obs[key]) for key, sub in space.spaces.items()], axis=1)
    if isinstance(space, gym.spaces.Box):
        obs = np.asarray(obs, dtype=np.float32)
        return obs.reshape(obs.shape[0], -1)
    fail(f"unsupported observation space {space}: use Box or (nested) Dict of Box observations")


# ---------------------------------------------------------------------------------------------------
COUNTERS = ("global_step", "num_updates", "cycle_steps", "cycle_updates", "work", "next_eval")  # checkpointed


def main(args: Args):
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    args, ckpt = resolve_resume(args)
    check_args(args, device)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic

    # Environments and the replay buffer
    envs = make_envs(args.env_id, args.num_envs, args.seed)
    envs.action_space.seed(args.seed)
    render_env = functools.partial(gym.make, args.env_id, **VIDEO_RENDER)
    video = args.capture_video and not video_unavailable(render_env)  # the first episode of every evaluation, as mp4
    eval_envs = make_envs(args.env_id, args.eval_episodes, args.eval_seed, video)
    obs_dim, act_dim = envs.single_observation_space.shape[0], envs.single_action_space.shape[0]
    low, high = action_bounds(envs.single_action_space)
    buf = make_buffer(min(args.buffer_size, args.total_timesteps), obs_dim, act_dim, device)

    # Models: mu (trained online), the Q ensemble and its EMA target; a checkpoint is restored here and only here
    mu = (
        VAEBehaviorModel(obs_dim, low, high)
        if args.behavior_model == "vae"
        else BehaviorModel.from_preset(args.behavior_preset, obs_dim, low, high)
    ).to(device)
    mu_optimizer = torch.optim.Adam(mu.parameters(), lr=args.behavior_lr, fused=True)
    q_ensemble = QEnsemble(obs_dim, act_dim, args.num_qs, args.q_hidden, args.q_layers).to(device)
    q_target = copy.deepcopy(q_ensemble).requires_grad_(False)
    q_optimizer = torch.optim.Adam(q_ensemble.parameters(), lr=args.q_lr, fused=True)
    models = dict(mu=mu, mu_optimizer=mu_optimizer, q_ensemble=q_ensemble, q_target=q_target, q_optimizer=q_optimizer)
    obs, _ = envs.reset(seed=args.seed)
    # where the loop stands: env steps, updates, steps and updates of the current cycle of M, evaluations
    counters = dict(global_step=0, num_updates=0, cycle_steps=0, cycle_updates=0, work=0, next_eval=args.eval_every)
    if ckpt:
        obs = restore_checkpoint(ckpt, models, buf, envs, args)
        counters = ckpt["counters"]
    global_step, num_updates, cycle_steps, cycle_updates, work, next_eval = (counters[key] for key in COUNTERS)
    history = counters.get("history", [])
    run_dir, writer = open_run_dir(args, ckpt)
    log(
        f"{args.env_id}: obs {obs_dim}, actions {act_dim}, M={args.trajectory_batch_size}, N={args.num_samples}, "
        f"temperature {args.temperature}, device {device}, run {run_dir}"
        + (f", resuming at step {global_step}" if ckpt else "")
    )

    nonfinite_at = torch.full((), -1, device=device)  # the first update whose loss was NaN/Inf; read when logging

    def save(done=False):
        values = (global_step, num_updates, cycle_steps, cycle_updates, work, next_eval)
        counters = dict(zip(COUNTERS, values, strict=True), history=history, done=done)
        save_checkpoint(run_dir, counters, models, buf, obs, envs, args, nonfinite_at)

    handle_stop_signals()
    estimate, estimated_rate = estimate_online_run_time(args, device, global_step, mu, q_ensemble, q_target, eval_envs)
    log(estimate)
    writer.add_scalar("charts/estimated_SPS", estimated_rate, global_step)
    flops, (peak, peak_how) = update_flops(args, mu, obs_dim, act_dim), peak_flops(device, args.precision)
    log(f"MFU: {flops / 1e9:.2f} GFLOP per Q update (not mu's step), peak {peak / 1e12:.2f} TFLOP/s ({peak_how})")

    # One update: a maximum-likelihood step of mu, then eq. 10 for the Q ensemble, on two replay batches
    target_mu, target_q = mu, q_target  # in bf16, the target reads bf16 copies (refreshed after every step)
    if args.precision == "bf16":
        target_mu, target_q = bf16_copy(mu, MU_OUTPUT), bf16_copy(q_target, Q_OUTPUT)
    states_per_chunk = target_states_per_chunk(args, mu, device)

    def update(mu_batch, q_batch):
        with autocast(args.precision, device):
            nll = mu.loss(*mu_batch[:2])  # online, mu tracks the mixture of the policies that filled the buffer
        mu_optimizer.zero_grad(set_to_none=True)
        nll.backward()
        mu_optimizer.step()
        if target_mu is not mu:
            with torch.no_grad():
                for p_read, p in zip(target_mu.parameters(), mu.parameters(), strict=True):
                    p_read.copy_(p)
        metrics = emaq_update(q_batch, target_mu, target_q, q_ensemble, q_target, q_optimizer, args, states_per_chunk)
        return {"behavior_nll": nll.detach(), **metrics}

    update = compile_update(update, args)  # torch.compile (+ CUDA graphs) where it pays; eager otherwise

    def policy(obs, generator):  # Algorithm 1, at temperature 1
        return test_time_policy(mu, q_ensemble, obs, args.num_samples, args.test_ensemble_lambda, generator)

    progress = tqdm(total=args.total_timesteps, initial=global_step, desc="env steps", unit="step", mininterval=1.0)
    burn_in_end, speed_from, speed_step, postfix = global_step + 10, None, None, {}  # steps/s after a burn-in
    while global_step < args.total_timesteps or cycle_steps > 0:
        # Collect M environment steps with the current policy, frozen while it collects
        while cycle_steps < args.trajectory_batch_size and global_step < args.total_timesteps:
            if global_step < args.learning_starts:
                actions = envs.action_space.sample()
            else:
                obs_t = torch.as_tensor(obs, dtype=torch.float32, device=device)
                actions = explore(mu, q_ensemble, obs_t, args).cpu().numpy()
            # the vector env's own flags say which sub-envs this step resets (restored exactly on resume)
            obs, ended, real, infos = step_and_store(envs, obs, actions, envs.env._autoreset_envs.copy(), buf)
            for i in np.nonzero(ended & real & infos.get("_episode", np.zeros_like(real)))[0]:
                writer.add_scalar("charts/episodic_return", infos["episode"]["r"][i], global_step)
            global_step, cycle_steps, work = global_step + int(real.sum()), cycle_steps + int(real.sum()), work + 1
            progress.update(int(real.sum()))
            if global_step >= burn_in_end and speed_from is None:
                speed_from, speed_step, speed_updates = time.time(), global_step, num_updates
            if global_step >= next_eval:
                frames = [] if video else None
                returns = evaluate(
                    policy, eval_envs, eval_envs.single_observation_space, lambda o: o, args.eval_seed, device, frames
                )
                if frames:
                    fps = eval_envs.unwrapped.envs[0].metadata.get("render_fps", 30)
                    write_video(run_dir, writer, f"step_{global_step:08d}", frames, fps, global_step)
                history.append([global_step, float(returns.mean())])
                writer.add_scalar("eval/episodic_return", returns.mean(), global_step)
                writer.add_scalar("eval/episodic_return_std", returns.std(), global_step)
                postfix["ret"] = f"{returns.mean():.0f}"
                progress.set_postfix(postfix)
                next_eval += args.eval_every
            if work % args.checkpoint_every == 0:
                save()
            stop_if_requested(save, global_step, num_updates, run_dir)

        # Then M updates of mu and of the Q ensemble, one per collected step
        learning = global_step >= args.learning_starts and buf["size"] >= args.batch_size
        while learning and cycle_updates < cycle_steps:
            metrics = update(buffer_sample(buf, args.batch_size), buffer_sample(buf, args.batch_size))
            num_updates, cycle_updates, work = num_updates + 1, cycle_updates + 1, work + 1
            finite = torch.stack([torch.isfinite(metrics[k]) for k in ("qf_loss", "qf_values", "behavior_nll")]).all()
            nonfinite_at = torch.where((nonfinite_at < 0) & ~finite, num_updates, nonfinite_at)
            if num_updates % args.log_every == 0:
                stop_if_nonfinite(nonfinite_at, run_dir)  # host syncs: once per log interval
                for key, value in metrics.items():
                    writer.add_scalar(f"losses/{key}", value.item(), global_step)
                if speed_from is not None and global_step > speed_step:
                    seconds = time.time() - speed_from
                    writer.add_scalar("charts/SPS", (global_step - speed_step) / seconds, global_step)
                    mfu = 100 * (num_updates - speed_updates) / seconds * flops / peak  # percent of the measured peak
                    writer.add_scalar("charts/mfu", mfu, global_step)
                    postfix["mfu"] = f"{mfu:.2g}%"
                    progress.set_postfix(postfix)
            if work % args.checkpoint_every == 0:
                save()
            stop_if_requested(save, global_step, num_updates, run_dir)
        cycle_steps, cycle_updates = 0, 0
    progress.close()

    if args.save_model:
        mu.save(os.path.join(run_dir, "mu.pt"))
        saved = dict(q_ensemble=q_ensemble.state_dict(), q_target=q_target.state_dict(), config=asdict(args))
        atomic_save(saved, os.path.join(run_dir, "model.pt"))
    if args.save_dataset:
        steps, episodes = save_minari_dataset(args.save_dataset, buf, args.env_id, args.num_envs)
        log(f"saved {steps} transitions in {episodes} episodes as Minari dataset {args.save_dataset}")
    save(done=True)
    envs.close()
    eval_envs.close()
    summary = dict(env_id=args.env_id, history=history, num_updates=num_updates)
    atomic_save(summary, os.path.join(run_dir, "summary.json"))
    writer.close()
    last = f"{history[-1][1]:.1f}" if history else "n/a"
    best = f"{max(h[1] for h in history):.1f}" if history else "n/a"
    print(
        f"{args.env_id} | {global_step} env steps, {num_updates} updates | eval return last {last} | best {best} "
        f"| {run_dir}"
    )
    return {"history": history, "num_updates": num_updates}


# ===================================================================================================
# Run plumbing. A reader can stop here: what follows checks flags, makes the update fast, builds the environments,
# measures the MFU, records videos, hands the buffer to offline training, writes checkpoints and resumes, and handles
# signals.
# ===================================================================================================
def log(message: str):
    """Progress notes go to stderr beside the progress bars; stdout carries only the final summary line."""
    tqdm.write(message, file=sys.stderr)


def close_progress_bars():
    """Close open progress bars, so that the line printed next is the last one on the screen."""
    for bar in list(getattr(tqdm, "_instances", [])):
        bar.close()


def fail(message: str):
    """End the run with one clear line and exit code 2; no traceback for a user's mistake."""
    close_progress_bars()
    log(f"error: {message}")
    sys.exit(2)


def check_args(args: Args, device):
    resolve_speed_flags(args, device)
    sizes = (args.num_envs, args.batch_size, args.buffer_size, args.eval_every, args.eval_episodes, args.log_every)
    problems = [
        (args.trajectory_batch_size < 1, f"--trajectory-batch-size (M) must be >= 1, got {args.trajectory_batch_size}"),
        (args.num_samples < 1, f"--num-samples (N) must be >= 1, got {args.num_samples}"),
        (args.num_qs < 1, f"--num-qs (K) must be >= 1, got {args.num_qs}"),
        (
            not 0 <= args.ensemble_lambda <= 1 or not 0 <= args.test_ensemble_lambda <= 1,
            "--ensemble-lambda and --test-ensemble-lambda must lie in [0, 1]",
        ),
        (args.temperature <= 0, f"--temperature must be > 0, got {args.temperature}"),
        (args.checkpoint_every < 1, "--checkpoint-every must be >= 1"),
        (
            min(*sizes, args.q_hidden, args.q_layers) < 1,
            "--num-envs, --batch-size, --buffer-size, --eval-every, --eval-episodes, --log-every, --q-hidden and "
            "--q-layers must be >= 1",
        ),
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
    if args.save_dataset and not args.resume:
        import minari
        from minari.dataset.minari_dataset import DATASET_ID_RE

        if not DATASET_ID_RE.fullmatch(args.save_dataset):
            fail(f"--save-dataset {args.save_dataset!r} is not a Minari id: use (namespace/)name-v<version>")
        if args.save_dataset in minari.list_local_datasets():
            fail(f"a Minari dataset {args.save_dataset!r} already exists: pick another --save-dataset id")


# ----- speed: bf16 read copies, target chunks, torch.compile and CUDA graphs (as in emaq_offline.py) -------
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


# ----- what a run costs: the estimate before it starts, the MFU of the Q update (charts/mfu) -----------
def estimate_online_run_time(args, device, global_step: int, mu, q_ensemble, q_target, eval_envs) -> tuple[str, float]:
    """Time a few updates (mu's step and the Q update), exploration and evaluation steps, on copies of the models and
    random batches of the right shapes, with the random streams restored afterwards (the training environments are
    not stepped), and return one line with the expected wall time of what is left, and the update rate."""
    fmt = human_duration
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        obs_dim, act_dim = mu.obs_dim, mu.act_dim
        mu_copy, q_copy, q_target_copy = copy.deepcopy(mu), copy.deepcopy(q_ensemble), copy.deepcopy(q_target)
        mu_optimizer = torch.optim.Adam(mu_copy.parameters(), lr=args.behavior_lr)
        q_optimizer = torch.optim.Adam(q_copy.parameters(), lr=args.q_lr)
        target_mu, target_q = mu_copy, q_target_copy
        if args.precision == "bf16":
            target_mu, target_q = bf16_copy(mu_copy, MU_OUTPUT), bf16_copy(q_target_copy, Q_OUTPUT)
        chunk = target_states_per_chunk(args, mu_copy, device)
        b = args.batch_size
        actions = mu.low + (mu.high - mu.low) * torch.rand(b, act_dim, device=device)
        batch = [torch.randn(b, obs_dim, device=device), actions, torch.zeros(b, device=device)]
        batch += [torch.randn(b, obs_dim, device=device), torch.zeros(b, device=device)]

        def update():
            with autocast(args.precision, device):
                nll = mu_copy.loss(batch[0], batch[1])
            mu_optimizer.zero_grad(set_to_none=True)
            nll.backward()
            mu_optimizer.step()
            emaq_update(batch, target_mu, target_q, q_copy, q_target_copy, q_optimizer, args, chunk)

        update_rate = timed_rate(update, device)
        explore_obs = torch.randn(args.num_envs, obs_dim, device=device)
        explore_rate = timed_rate(lambda: explore(mu_copy, q_copy, explore_obs, args).cpu(), device)
        eval_obs = torch.as_tensor(eval_envs.reset(seed=args.eval_seed)[0], dtype=torch.float32, device=device)
        eval_action = test_time_policy(mu_copy, q_copy, eval_obs, args.num_samples, args.test_ensemble_lambda)
        eval_rate = timed_rate(
            lambda: (
                test_time_policy(mu_copy, q_copy, eval_obs, args.num_samples, args.test_ensemble_lambda).cpu(),
                eval_envs.step(eval_action.cpu().numpy()),
            ),
            device,
        )
    steps_left = args.total_timesteps - global_step
    learning_steps = max(0, min(steps_left, args.total_timesteps - max(args.learning_starts, args.batch_size)))
    update_seconds = learning_steps / update_rate  # one update per collected step
    explore_seconds = learning_steps / args.num_envs / explore_rate
    evaluations = steps_left // args.eval_every
    spec = eval_envs.unwrapped.envs[0].spec
    eval_seconds = evaluations * spec.max_episode_steps / eval_rate if spec and spec.max_episode_steps else 0
    total = update_seconds + explore_seconds + eval_seconds
    line = f"estimate on {device.type} ({args.precision}"
    line += ", measured eagerly: compiled updates are faster)" if args.compile == "on" else ")"
    line += f": {learning_steps:,} updates {fmt(update_seconds)} ({update_rate:.1f} upd/s), exploration"
    line += f" {fmt(explore_seconds)} (N = {args.num_samples}), {evaluations} evaluations up to {fmt(eval_seconds)}"
    line += f" ({100 * eval_seconds / max(total, 1e-9):.0f}%): {fmt(total)}, environment steps not counted"
    return line, update_rate


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


# ----- environments, and the hand-off to offline training ------------------------------------------------
def make_envs(env_id: str, num: int, seed: int, video: bool = False):
    """A vector env (Gymnasium 1.x, autoreset on the step after an episode ends), refusing what EMaQ cannot handle;
    with `video`, the first sub-environment renders its frames."""

    def make_env(index):
        def thunk():
            env = gym.make(env_id, **(VIDEO_RENDER if video and index == 0 else {}))
            env.action_space.seed(seed + index)
            return env

        return thunk

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            envs = gym.vector.SyncVectorEnv([make_env(i) for i in range(num)])
        envs = gym.wrappers.vector.RecordEpisodeStatistics(envs)
    except gym.error.Error as e:
        fail(f"cannot make environment {env_id!r}: {e}. Check the id (gymnasium.pprint_registry() lists them)")
    try:
        action_bounds(envs.single_action_space)
    except ValueError as e:
        fail(f"environment {env_id}: {e}")
    if not isinstance(envs.single_observation_space, gym.spaces.Box):
        fail(f"environment {env_id} has {envs.single_observation_space} observations: wrap it in FlattenObservation")
    return envs


# D4RL's reference returns (random policy, expert), attached to saved datasets of these environment families.
D4RL_REF_SCORES = {
    "halfcheetah": (-280.178953, 12135.0),
    "hopper": (-20.272305, 3234.3),
    "walker2d": (1.629008, 4592.3),
    "ant": (-325.6, 3879.7),
}


def save_minari_dataset(dataset_id: str, buf, env_id: str, num_envs: int):
    """Rebuild each environment's episodes (T+1 observations, T actions) from the buffer and write a Minari dataset."""
    import minari
    from minari.data_collector.episode_buffer import EpisodeBuffer

    order = (torch.arange(buf["size"]) + (buf["ptr"] if buf["size"] == len(buf["obs"]) else 0)) % len(buf["obs"])
    keys = ("obs", "actions", "rewards", "next_obs", "terminals", "truncated", "env")
    rows = {key: buf[key][order.to(buf["obs"].device)].cpu().numpy() for key in keys}
    episodes = []
    for env_index in range(num_envs):
        idx = np.nonzero(rows["env"] == env_index)[0]
        ends = np.nonzero(rows["terminals"][idx] + rows["truncated"][idx])[0].tolist()
        if not ends or ends[-1] != len(idx) - 1:
            ends.append(len(idx) - 1)  # the running episode ends here, truncated
        start = 0
        for end in ends:
            ep = idx[start : end + 1]
            truncations = rows["truncated"][ep].astype(bool)
            truncations[-1] = not rows["terminals"][ep[-1]]
            episode = EpisodeBuffer(
                id=len(episodes),
                observations=np.concatenate([rows["obs"][ep[:1]], rows["next_obs"][ep]]),
                actions=rows["actions"][ep],
                rewards=rows["rewards"][ep].tolist(),
                terminations=rows["terminals"][ep].astype(bool).tolist(),
                truncations=truncations.tolist(),
            )
            episodes.append(episode)
            start = end + 1
    family = env_id.split("-")[0].lower()
    scores = (
        dict(zip(("ref_min_score", "ref_max_score"), D4RL_REF_SCORES[family], strict=True))
        if family in D4RL_REF_SCORES
        else {}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        minari.create_dataset_from_buffers(
            dataset_id,
            episodes,
            env=env_id,
            algorithm_name="EMaQ online (emaq_online.py)",
            author="emaq_online.py",
            author_email="none",
            code_permalink="emaq_online.py",
            description=f"Every transition collected by online EMaQ in {env_id}.",
            **scores,
        )
    return sum(len(e.rewards) for e in episodes), len(episodes)


# ----- run directory, checkpoints, resume, signals -------------------------------------------------------
def open_run_dir(args: Args, ckpt):
    """runs_dir/<env>__<exp_name>__<seed>__<time>, or the resumed run's; config.json and the TensorBoard writer."""
    run_dir = args.resume or os.path.join(
        args.runs_dir, f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    )
    try:
        os.makedirs(run_dir, exist_ok=True)
        atomic_save(asdict(args), os.path.join(run_dir, "config.json"))  # a resumed run may have a new total
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


def env_state(envs) -> dict:
    """The vector env's exact state: MuJoCo's integration state (mj_getState), time limits, RNGs, autoreset flags,
    episode statistics. Non-MuJoCo environments keep their RNGs only; their running episodes restart on resume."""
    import mujoco

    subs = []
    for env in envs.env.envs:
        u, sub = env.unwrapped, {"np_random": json.dumps(env.unwrapped.np_random.bit_generator.state)}
        if hasattr(u, "model") and hasattr(u, "data"):
            full = np.empty(mujoco.mj_stateSize(u.model, mujoco.mjtState.mjSTATE_INTEGRATION))
            mujoco.mj_getState(u.model, u.data, full, mujoco.mjtState.mjSTATE_INTEGRATION)
            sub["mujoco"] = torch.from_numpy(full)
        wrapper = env
        while isinstance(wrapper, gym.Wrapper):
            if isinstance(wrapper, gym.wrappers.TimeLimit):
                sub["elapsed_steps"] = int(wrapper._elapsed_steps)
            wrapper = wrapper.env
        subs.append(sub)
    return {
        "subs": subs,
        "autoreset": torch.from_numpy(envs.env._autoreset_envs.copy()),
        "episode_returns": torch.from_numpy(envs.episode_returns.copy()),
        "episode_lengths": torch.from_numpy(envs.episode_lengths.copy()),
        "prev_dones": torch.from_numpy(envs.prev_dones.copy()),
        "episode_count": int(envs.episode_count),
        "action_space": json.dumps(envs.action_space.np_random.bit_generator.state),
    }


def set_env_state(envs, state: dict) -> bool:
    """Restore env_state(); returns False when a running episode could not be restored exactly (not MuJoCo)."""
    import mujoco

    exact = True
    for env, sub in zip(envs.env.envs, state["subs"], strict=True):
        u = env.unwrapped
        u.np_random.bit_generator.state = json.loads(sub["np_random"])
        if "mujoco" in sub:
            mujoco.mj_setState(u.model, u.data, sub["mujoco"].numpy(), mujoco.mjtState.mjSTATE_INTEGRATION)
        else:
            exact = False
        wrapper = env
        while isinstance(wrapper, gym.Wrapper):
            if isinstance(wrapper, gym.wrappers.TimeLimit):
                wrapper._elapsed_steps = sub["elapsed_steps"]
            wrapper = wrapper.env
    envs.env._autoreset_envs[:] = state["autoreset"].numpy()
    envs.episode_returns[:], envs.episode_lengths[:] = (
        state["episode_returns"].numpy(),
        state["episode_lengths"].numpy(),
    )
    envs.prev_dones[:], envs.episode_count = state["prev_dones"].numpy(), state["episode_count"]
    envs.action_space.np_random.bit_generator.state = json.loads(state["action_space"])
    return exact


def save_checkpoint(run_dir, counters: dict, models: dict, buf, obs, envs, args: Args, nonfinite_at):
    """Models, optimizers, the replay buffer, RNGs, the environments' exact state and the loop's counters. Never a
    state that went NaN/Inf: the previous checkpoint stays the last good one."""
    stop_if_nonfinite(nonfinite_at, run_dir)
    state = {key: module.state_dict() for key, module in models.items()}
    state.update(counters=counters, obs=torch.from_numpy(obs), envs=env_state(envs), rng=rng_state(), buffer=buf)
    try:
        atomic_save(state, os.path.join(run_dir, "checkpoint.pt"))
        meta = {"global_step": counters["global_step"], "num_updates": counters["num_updates"]}
        atomic_save(meta, os.path.join(run_dir, "checkpoint.json"))
    except OSError as e:
        fail(
            f"could not write a checkpoint into {run_dir} ({e.strerror}); {last_checkpoint(run_dir)} is intact: "
            f"free some space, then resume with: python emaq_online.py --resume {run_dir}"
        )


def last_checkpoint(run_dir) -> str:
    try:
        with open(os.path.join(run_dir, "checkpoint.json")) as f:
            meta = json.load(f)
        return f"the checkpoint {run_dir}/checkpoint.pt (env step {meta['global_step']}, update {meta['num_updates']})"
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
    may change, and a larger --total-timesteps extends the run (also a finished one)."""
    if not args.resume:
        return args, None
    try:
        with open(os.path.join(args.resume, "config.json")) as f:
            saved = Args(**json.load(f))
    except (OSError, ValueError, TypeError) as e:
        fail(f"{args.resume} is not a run directory of emaq_online.py ({e}); pass runs/<run name>")
    defaults, free = Args(), {"resume", "cuda", "compile", "cudagraphs", "target_memory_gb", "total_timesteps"}
    conflicts = [
        f"--{f.name.replace('_', '-')} {getattr(args, f.name)} (the run has {getattr(saved, f.name)})"
        for f in dataclasses.fields(Args)
        if f.name not in free and getattr(args, f.name) not in (getattr(defaults, f.name), getattr(saved, f.name))
    ]
    if conflicts:
        fail(f"cannot resume {args.resume} with {', '.join(conflicts)}: resume without them, or start a new run")
    extend = args.total_timesteps != defaults.total_timesteps
    speed = {key: getattr(args, key) for key in free - {"total_timesteps"}}
    total = args.total_timesteps if extend else saved.total_timesteps
    args = dataclasses.replace(saved, **speed, total_timesteps=total)
    path = os.path.join(args.resume, "checkpoint.pt")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        missing = [k for k in ("counters", "envs", "buffer", "rng", "mu", "q_ensemble") if k not in ckpt]
        if missing:
            raise KeyError(f"missing {missing}")
    except FileNotFoundError:
        fail(f"{args.resume} has no checkpoint.pt yet (one comes every --checkpoint-every steps): start a new run")
    except Exception as e:
        fail(
            f"{path} is truncated or not a checkpoint of emaq_online.py ({type(e).__name__}); nothing was "
            f"overwritten: resume from a copy of the run, or start a new run"
        )
    if ckpt["counters"]["done"] and args.total_timesteps <= ckpt["counters"]["global_step"]:
        fail(
            f"the run in {args.resume} already finished; extend it with a larger --total-timesteps, or start a new run"
        )
    if args.total_timesteps < ckpt["counters"]["global_step"]:
        fail(f"--total-timesteps {args.total_timesteps} is below the run's {ckpt['counters']['global_step']} steps")
    return args, ckpt


def restore_checkpoint(ckpt: dict, models: dict, buf: dict, envs, args: Args):
    """Models, optimizers, the replay buffer (into a larger one when the run is extended), the environments and the
    RNGs; returns the current observations."""
    for key, module in models.items():
        module.load_state_dict(ckpt[key])
    saved = ckpt["buffer"]
    size, capacity = saved["size"], len(saved["obs"])
    oldest_first = (torch.arange(size) + (saved["ptr"] if size == capacity else 0)) % capacity
    same = capacity == len(buf["obs"])  # then row for row, as it was: the same rows give the same batches
    for key, value in saved.items():
        if torch.is_tensor(value):
            buf[key][:size] = (value if same else value[oldest_first]).to(buf[key].device)[:size]
    buf["size"], buf["ptr"] = size, saved["ptr"] if same else size % len(buf["obs"])
    obs = ckpt["obs"].numpy()
    if not set_env_state(envs, ckpt["envs"]):
        log("note: this environment's running episodes cannot be restored exactly (not MuJoCo); they restart")
        obs, _ = envs.reset(seed=args.seed + ckpt["counters"]["global_step"])
    set_rng_state(ckpt["rng"])
    return obs


STOP = {"signal": None}  # set by SIGINT/SIGTERM; the training loops checkpoint and exit at the next update


def handle_stop_signals():
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: STOP.update(signal=signum))


def stop_if_requested(save, global_step: int, num_updates: int, run_dir):
    if STOP["signal"] is not None:
        save()
        close_progress_bars()
        log(
            f"stopped by signal {STOP['signal']} at env step {global_step}, update {num_updates}: checkpoint written. "
            f"Resume with: python emaq_online.py --resume {run_dir}"
        )
        sys.exit(130)


if __name__ == "__main__":
    main(tyro.cli(Args))
