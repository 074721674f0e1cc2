"""Offline EMaQ (Expected-Max Q-learning; Ghasemipour, Schuurmans & Gu, ICML 2021) on Minari datasets: Args, data, the
Q ensemble, EMaQ (eq. 11, eq. 10, Algorithm 1), evaluation, datasets, main, small helpers. Copied into another project,
it needs behavior_model.py beside it, and tools/make_random_dataset.py for our random ids. Analyses of a run: tools/."""

import contextlib
import copy
import dataclasses
import json
import os
import re
import signal
import socket
import sys
import time
import warnings
from typing import Literal

import gymnasium as gym
import minari
import numpy as np
import torch
import tyro
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from behavior_model import MU_OUTPUT, BehaviorModel, VAEBehaviorModel, action_bounds, bf16_copy, fp32_output_layer


@dataclasses.dataclass
class Args:
    exp_name: str = "emaq_offline"
    """the name of this experiment (part of the run directory's name)"""
    seed: int = 1
    """seed of torch (training) and of mu's split of the data"""
    cuda: bool = True
    """use the GPU when one is present"""
    runs_dir: str = "runs"
    """TensorBoard logs, checkpoints and mu go to runs_dir/<run name>/"""
    dataset_id: str = "emaq/HalfCheetah-v5/random-v0"
    """a Minari dataset id; emaq/<EnvId>/random-v0 (1M steps) or random_<steps>-v0 is generated locally on first use"""
    normalize_obs: bool = True
    """normalize observations with the dataset's mean and std (std + 1e-3), here and in the evaluation env"""
    preset: Literal["auto", "mujoco", "table3", "cpu"] = "auto"
    """the values below: Table 2 (mujoco), Table 3 (kitchen/antmaze/adroit), or cpu (NOT the paper's); auto: by id"""
    behavior_model: Literal["autoregressive", "vae"] = "autoregressive"
    """mu: the paper's autoregressive model (App. B) or the VAE of prior work (App. H.1), to compare (Section 5.1)"""
    behavior_path: str | None = None
    """load a saved mu (mu.pt of an earlier run) instead of pretraining one; a sweep over N reuses one mu"""
    behavior_updates: int = 300_000
    """maximum-likelihood updates of mu before EMaQ training"""
    behavior_lr: float = 5e-4
    """Adam learning rate of mu (Tables 2 and 3)"""
    behavior_holdout: float = 0.01
    """fraction of transitions (at most 10,000) held out of mu's training to report its held-out NLL"""
    total_updates: int = 1_000_000
    """Q-ensemble updates"""
    batch_size: int = 256
    """minibatch size of mu and of the Q ensemble"""
    num_samples: int = 10
    """N: actions sampled from mu for the target (eq. 11) and the test-time policy (Algorithm 1)"""
    num_qs: int = 8
    """K: Q functions in the ensemble"""
    q_hidden: int = 750
    """hidden width of every Q network"""
    q_layers: int = 3
    """hidden layers of every Q network"""
    q_lr: float = 1e-4
    """Adam learning rate of the Q ensemble"""
    gamma: float = 0.99
    """discount factor"""
    ema: float = 0.995
    """alpha: target <- alpha * target + (1 - alpha) * online, after every update"""
    ensemble_lambda: float = 1.0
    """Ensemble(values) = lambda * min + (1 - lambda) * max over the K targets (eq. 11)"""
    test_ensemble_lambda: float = 1.0
    """lambda of TestEnsemble in the test-time policy (Algorithm 1)"""
    eval_every: int = 5_000
    """evaluate the test-time policy every this many updates"""
    eval_episodes: int = 10
    """episodes per evaluation, run as one vectorized environment"""
    final_eval_episodes: int = 0
    """episodes of mu's baselines and of the last evaluation, the scores reported (e.g. 100); 0: --eval-episodes"""
    eval_seed: int = 0
    """seed of the evaluation episodes and of their samples from mu (the same at every evaluation)"""
    log_every: int = 1_000
    """move losses to the host and log them every this many updates"""
    checkpoint_every: int = 10_000
    """write the full training state (atomically) every this many updates of mu and of the Q ensemble"""
    resume: str | None = None
    """continue the run in this run directory from its last checkpoint (a larger --total-updates extends it)"""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """bf16 matmuls in mu's and the Q updates (Q values, targets, losses, logits stay fp32); auto: bf16 where native"""
    compile: Literal["auto", "on", "off"] = "auto"
    """torch.compile the Q update; auto: on for a GPU, off for a CPU (no gain there); falls back to eager if it fails"""
    cudagraphs: Literal["auto", "on", "off"] = "auto"
    """replay the compiled Q update as one CUDA graph (GPU only); auto: on whenever --compile is on a GPU"""
    target_memory_gb: float | None = None
    """memory budget of the target's B x N x K values; unset: half of the free device memory"""


# --preset: a run's starting values (flags passed win; `--help` shows them); Args' own: Table 2's; cpu: not the paper's
PRESETS = dict(mujoco={}, table3=dict(batch_size=128, num_qs=16, q_hidden=256, q_layers=4))
PRESETS["cpu"] = dict(num_qs=4, q_hidden=256, num_samples=2, q_lr=3e-4, ema=0.98, behavior_updates=20_000)
PRESETS["cpu"] |= dict(total_updates=10_000, eval_every=2_500, final_eval_episodes=50)  # as judged (docs)
# The flags that decide what mu is: mu.json records them, and a sweep over one of them trains one mu per value.
MU_ARGS = ("dataset_id", "normalize_obs", "preset", "behavior_model", "behavior_updates", "behavior_lr")
MU_ARGS += ("behavior_holdout", "batch_size", "precision")


# ----- Console and errors: what the data code, the algorithm and main report through --------------------------------
def log(message: str):
    """Progress notes go to stderr beside the progress bars; stdout carries only the final summary line."""
    tqdm.write(message, file=sys.stderr)


def fail(message: str, code: int = 2):
    """End the run with one clear line, the last on the screen: an error (code 2; no traceback), or a stop (130)."""
    for bar in list(getattr(tqdm, "_instances", [])):
        bar.close()
    log(f"error: {message}" if code == 2 else message)
    sys.exit(code)


def preset_for(dataset_id: str) -> str:
    """Table 3's sizes for kitchen, antmaze, adroit, by the id's environment part ("pen" is not "invertedpendulum")."""
    parts = dataset_id.lower().split("/")
    env = re.sub(r"-v\d+$", "", parts[-2] if len(parts) >= 2 else parts[0])
    table3 = env in ("kitchen", "antmaze", "door", "hammer", "pen", "relocate")  # Minari's D4RL names
    return "table3" if table3 or env.startswith(("frankakitchen", "antmaze_", "adroithand")) else "mujoco"


def read_config(run_dir: str) -> Args:
    """The flags of the run in `run_dir` (its config.json)."""
    try:
        return Args(**json.load(open(os.path.join(run_dir, "config.json"))))
    except (OSError, ValueError, TypeError) as e:
        fail(f"{run_dir} is not a run directory of emaq_offline.py ({e}); pass runs/<run name>")


def cli(argv=None) -> Args:
    """The command line over the defaults a run uses (the preset's, or a resumed run's), so that --help shows them."""
    argv = sys.argv[1:] if argv is None else argv
    pre, _ = tyro.cli(Args, args=[a for a in argv if a not in ("-h", "--help")], return_unknown_args=True)
    preset = preset_for(pre.dataset_id) if pre.preset == "auto" else pre.preset
    defaults = Args(**PRESETS[preset], preset=preset, dataset_id=pre.dataset_id)
    defaults = read_config(pre.resume) if pre.resume else defaults
    return tyro.cli(Args, args=argv, default=dataclasses.replace(defaults, resume=pre.resume))


# ----- Data: a Minari dataset -> transitions (s, a, r, s', terminal), then tensors on the training device -----------
def flatten_obs(space: gym.Space, obs) -> np.ndarray:
    """[T, ...] observations -> [T, obs_dim] float32; Dict spaces concatenated in the space's key order."""
    if isinstance(space, gym.spaces.Dict):
        return np.concatenate([flatten_obs(sub, obs[key]) for key, sub in space.spaces.items()], axis=1)
    if isinstance(space, gym.spaces.Box):
        obs = np.asarray(obs, dtype=np.float32)
        return obs.reshape(obs.shape[0], -1)
    fail(f"unsupported observation space {space}: use Box or (nested) Dict of Box observations")


def load_transitions(dataset, dataset_id: str):
    """Transitions (o_t, a_t, r_t, o_{t+1}, terminated_t) (a truncated end still bootstraps) and action bounds; NaN/Inf
    refused (naming where), actions clipped to the bounds."""
    try:
        low, high = action_bounds(dataset.action_space)
    except ValueError as e:
        fail(f"dataset {dataset_id}: {e}")
    data = {key: [] for key in ("obs", "actions", "rewards", "next_obs", "terminals")}
    for episode in dataset.iterate_episodes():
        obs, steps = flatten_obs(dataset.observation_space, episode.observations), len(episode.rewards)
        if obs.shape[0] != steps + 1:
            fail(f"episode {episode.id} has {obs.shape[0]} observations for {steps} steps: expected T+1")
        actions = np.asarray(episode.actions, dtype=np.float32).reshape(steps, -1)
        for key, value in zip(data, (obs[:-1], actions, episode.rewards, obs[1:], episode.terminations), strict=True):
            data[key].append(np.asarray(value, dtype=np.float32))
    data = {key: np.concatenate(value) for key, value in data.items()}
    for key, value in data.items():
        finite = np.isfinite(value.reshape(len(value), -1)).all(1)
        if not finite.all():
            row, count = np.nonzero(~finite)[0][0], int((~np.isfinite(value)).sum())
            fail(f"dataset {dataset_id} has {count} NaN/Inf values in {key} (first at transition {row}): clean it")
    low32, high32 = np.float32(low), np.float32(high)
    outside = int(((data["actions"] < low32) | (data["actions"] > high32)).sum())
    if outside:
        log(f"note: clipped {outside} action coordinates that lay outside the action space [{min(low)}, {max(high)}]")
        data["actions"] = np.clip(data["actions"], low32, high32)
    return data, low, high


# ----- Q ensemble: K MLPs evaluated together, one batched matmul per layer -------------------------------------------
class QEnsemble(nn.Module):
    """K Q networks, weights stacked [K, in, out]; the first layer's state part is computed once per state, not N."""

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
        # fp32 values out, also under bf16: bf16's spacing at Q = 1000 (4 to 8) is as large as the N candidates' gaps
        return fp32_output_layer(x, self.w_out, self.b_out).view(k, batch, n)


def ensemble(q_values: torch.Tensor, lam: float) -> torch.Tensor:
    """Ensemble / TestEnsemble over the K members (dim 0): lambda * min + (1 - lambda) * max."""
    return lam * q_values.min(0).values + (1 - lam) * q_values.max(0).values


# ----- EMaQ: the target (eq. 11), one update (eq. 10), and the test-time policy (Algorithm 1) ------------------------
def autocast(precision: str, device):
    """bf16 autocast for the matmuls, or nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


@torch.no_grad()
def emaq_target(mu, q_target, rewards, next_obs, terminals, args, states_per_chunk: int | None = None) -> torch.Tensor:
    """y = r + gamma * (1 - t) * max_{i<=N} Ensemble(Q_target(s', a'_i)), a'_i ~ mu(.|s'), in chunks of next states."""
    samples = mu.sample(next_obs, args.num_samples)  # [B, N, A], all at once: mu sizes its own chunks
    chunk = states_per_chunk or len(next_obs)
    backups = []
    for obs_chunk, samples_chunk in zip(next_obs.split(chunk), samples.split(chunk), strict=True):  # [b, N] values
        backups.append(ensemble(q_target(obs_chunk, samples_chunk), args.ensemble_lambda).max(-1).values)
    return rewards + args.gamma * (1 - terminals) * torch.cat(backups)


def emaq_update(batch, mu_read, q_target_read, q_ensemble, q_target, q_optimizer, args, states_per_chunk) -> dict:
    """One update (eq. 10); metrics stay on the device. The target reads mu_read and q_target_read: mu and q_target (the
    EMA network) themselves, or their bf16 read copies, refreshed here from q_target after its EMA step."""
    obs, actions, rewards, next_obs, terminals = batch
    with autocast(args.precision, obs.device):
        target = emaq_target(mu_read, q_target_read, rewards, next_obs, terminals, args, states_per_chunk)  # eq. 11
        q = q_ensemble(obs, actions.unsqueeze(1)).squeeze(-1)  # [K, B]
    loss = ((q - target) ** 2).mean(1).sum()  # eq. 10: each member's mean squared error, summed (independent members)
    q_optimizer.zero_grad(set_to_none=True)
    loss.backward()
    q_optimizer.step()
    with torch.no_grad():
        parameters = zip(q_target.parameters(), q_ensemble.parameters(), q_target_read.parameters(), strict=True)
        for p_target, p, p_read in parameters:
            p_target.lerp_(p, 1 - args.ema)  # theta_target <- alpha theta_target + (1 - alpha) theta
            if p_read is not p_target:
                p_read.copy_(p_target)
    q = q.detach()  # the target came from no_grad
    metrics = dict(qf_loss=loss.detach() / args.num_qs, qf_values=q.mean(), q_ensemble_std=q.std(0).mean())
    return metrics | dict(target_values=target.mean())


@torch.no_grad()
def test_time_policy(mu, q_ensemble, obs, num_samples, test_lambda, generator=None, temperature=1.0) -> torch.Tensor:
    """Algorithm 1: N actions from mu(.|s), the argmax of TestEnsemble({Q_k(s, a_i)}) (temperature 1: the paper's)."""
    candidates = mu.sample(obs, num_samples, temperature=temperature, generator=generator)  # [B, N, A]
    scores = ensemble(q_ensemble(obs, candidates), test_lambda)  # [B, N]
    return candidates[torch.arange(len(obs), device=obs.device), scores.argmax(-1)]


# ----- Evaluation in the environment recovered from the dataset, vectorized over episodes ----------------------------
def evaluate(policy, envs, obs_space, normalize, seed: int, device) -> np.ndarray:
    """Return of every sub-environment's first episode (the policy's own generator: training's streams never move)."""
    obs, _ = envs.reset(seed=seed)
    generator = torch.Generator(device).manual_seed(seed)
    returns, done = np.zeros(envs.num_envs), np.zeros(envs.num_envs, dtype=bool)
    while not done.all():
        obs_t = normalize(torch.as_tensor(flatten_obs(obs_space, obs), device=device))
        actions = policy(obs_t, generator).cpu().numpy()
        obs, rewards, terminated, truncated, _ = envs.step(actions)
        returns += rewards * ~done
        done |= terminated | truncated
    return returns


def evaluation_summary(returns, ref) -> dict:
    """Mean return, D4RL-normalized score 100 (return - random) / (expert - random), standard errors, a text line."""
    returns = np.asarray(returns, dtype=float)
    se = float(returns.std(ddof=1) / np.sqrt(len(returns))) if len(returns) > 1 else float("nan")
    score = None if ref is None else float(100 * (returns.mean() - ref[0]) / (ref[1] - ref[0]))
    s = dict(episodes=len(returns), returns=returns.tolist(), return_mean=float(returns.mean()), return_stderr=se)
    s |= dict(score=score, score_stderr=None if ref is None else 100 * se / (ref[1] - ref[0]))
    score_text = f" (score {score:.1f} ± {s['score_stderr']:.1f})" if ref else ""
    return s | dict(text=f"return {s['return_mean']:.1f} ± {se:.1f}{score_text} over {len(returns)} episodes")


# ----- Minari datasets: generate (ours) or download on first use, load, reference scores, evaluation environments ---
RANDOM_ID = re.compile(r"emaq/(?P<env_id>[^/]+)/random(?:_(?P<steps>\d+))?-v0")
D4RL_REF_SCORES = dict(halfcheetah=(-280.178953, 12135.0), hopper=(-20.272305, 3234.3), walker2d=(1.629008, 4592.3))
D4RL_REF_SCORES["ant"] = (-325.6, 3879.7)  # D4RL's (random, expert) returns, for datasets with no reference scores


def load_dataset(dataset_id: str, seed: int):
    """A local dataset as it is; our generated ids on first use (tools/make_random_dataset.py); others downloaded."""
    if dataset_id not in minari.list_local_datasets():
        if match := RANDOM_ID.fullmatch(dataset_id):
            try:  # lazily: only generated ids need the tool, so a script copied without tools/ runs on any other
                from tools.make_random_dataset import generate_random_dataset
            except ImportError:
                fail(f"{dataset_id} is made by tools/make_random_dataset.py: copy it (as tools/) beside this script")
            steps = int(match["steps"] or 1_000_000)
            generate_random_dataset(dataset_id, match["env_id"], steps, seed, D4RL_REF_SCORES)
        else:
            try:  # without a network, a download would hang in retries
                socket.create_connection(("huggingface.co", 443), timeout=3.0).close()
            except OSError:
                where = minari.storage.get_dataset_path()
                fail(f"dataset {dataset_id!r} is not in {where} and there is no network: minari download it elsewhere")
            try:
                minari.download_dataset(dataset_id)
            except Exception as e:
                fail(f"could not download dataset {dataset_id!r} ({e}): check the id with `minari list remote`")
    try:
        return minari.load_dataset(dataset_id)
    except Exception as e:
        fail(f"could not load dataset {dataset_id!r}: {e}")


def reference_scores(dataset):
    """(min, max, tag): the dataset's own reference scores, else D4RL's for the same env family, else None."""
    meta = dataset.storage.metadata
    if meta.get("ref_min_score") is not None and meta.get("ref_max_score") is not None:
        return meta["ref_min_score"], meta["ref_max_score"], "normalized_score"
    family = dataset.env_spec.id.split("-")[0].lower() if dataset.env_spec is not None else ""
    return (*D4RL_REF_SCORES[family], "normalized_score_d4rl_ref") if family in D4RL_REF_SCORES else None


def make_eval_envs(dataset, num_episodes: int, **render):
    """`num_episodes` evaluation environments in one vector env (`render`: the first one's render settings)."""
    kwargs = [render] + [{}] * (num_episodes - 1)
    try:
        with warnings.catch_warnings(action="ignore"):
            return gym.vector.SyncVectorEnv([lambda kw=kw: dataset.recover_environment(True, **kw) for kw in kwargs])
    except Exception as e:
        fail(f"cannot build the evaluation environment of {dataset.spec.dataset_id}: {e}")


def main(args: Args):
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    ckpt = load_checkpoint(args) if args.resume else None
    args = check_args(args, device)
    torch.manual_seed(args.seed)  # training draws from torch's generator only (evaluation from its own)

    # Data: the whole dataset lives on the device, observations normalized once
    dataset = load_dataset(args.dataset_id, args.seed)
    data, low, high = load_transitions(dataset, args.dataset_id)
    data = {key: torch.as_tensor(value, device=device) for key, value in data.items()}
    num_transitions, obs_dim, act_dim = *data["obs"].shape, data["actions"].shape[1]
    obs_mean, obs_std = data["obs"].mean(0), data["obs"].std(0) + 1e-3
    if not args.normalize_obs:
        obs_mean, obs_std = torch.zeros_like(obs_mean), torch.ones_like(obs_std)
    normalize = lambda o: (o - obs_mean) / obs_std  # noqa: E731
    data["obs"], data["next_obs"] = normalize(data["obs"]), normalize(data["next_obs"])
    envs = make_eval_envs(dataset, args.final_eval_episodes)  # mu's baselines and the last evaluation
    ref = reference_scores(dataset)
    perm = torch.randperm(num_transitions, generator=torch.Generator().manual_seed(args.seed)).to(device)
    num_holdout = min(int(args.behavior_holdout * num_transitions), 10_000)
    holdout_idx, train_idx = perm[:num_holdout], perm[num_holdout:]  # mu's held-out NLL

    # Models, and the run's state (obs_mean/std: for tools/); a checkpoint, if resuming, is restored here and only here
    mu = build_or_load_mu(args, obs_dim, act_dim, low, high).to(device)
    mu_optimizer = torch.optim.Adam(mu.parameters(), lr=args.behavior_lr, fused=True)
    q_ensemble = QEnsemble(obs_dim, act_dim, args.num_qs, args.q_hidden, args.q_layers).to(device)
    q_target = copy.deepcopy(q_ensemble).requires_grad_(False)  # the EMA network of eq. 11
    q_optimizer = torch.optim.Adam(q_ensemble.parameters(), lr=args.q_lr, fused=True)
    models = dict(mu=mu, mu_optimizer=mu_optimizer, q_ensemble=q_ensemble, q_target=q_target, q_optimizer=q_optimizer)
    run = dict(phase="behavior", step=0, history=[], mu_eval={}, last_returns=None, obs_mean=obs_mean, obs_std=obs_std)
    if ckpt:
        restore_checkpoint(ckpt, models, run, args)
    run_dir, writer = open_run_dir(args, ckpt)
    resuming = f", resuming {ckpt['phase']} at update {ckpt['step']}" if ckpt else ""
    log(f"{args.dataset_id}: {num_transitions} transitions, obs {obs_dim}, actions {act_dim}, {run_dir}{resuming}")
    if device.type == "cpu" and args.total_updates >= 1_000_000:
        log("note: the paper's budget takes days on a CPU; try --preset cpu (not the paper's configuration)")
    nonfinite_at = torch.full((), -1, device=device)  # the first update whose loss was NaN/Inf; read when logging
    save = lambda: save_checkpoint(run_dir, run, models, nonfinite_at)  # noqa: E731
    for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C, kill: checkpoint at the next update, then exit
        signal.signal(sig, lambda signum, frame: STOP.update(signal=signum))

    # mu(a|s): maximum likelihood on the training split (teacher forcing, all dimensions in one pass)
    if run["phase"] == "behavior" and not args.behavior_path:
        steps = range(run["step"] + 1, args.behavior_updates + 1)
        for step in tqdm(steps, "mu", args.behavior_updates, initial=run["step"]):
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
            if step % args.checkpoint_every == 0:
                save()
            stop_if_requested(run, save, run_dir)
    mu.eval().requires_grad_(False)
    if run["phase"] == "behavior":  # mu alone: the behavior-cloning baselines, before any EMaQ training
        mu.save(os.path.join(run_dir, "mu.pt"))
        atomic_save({key: getattr(args, key) for key in MU_ARGS}, f"{run_dir}/mu.json")
        if len(holdout_idx):  # mu is frozen: no graph is built
            nll = torch.cat([-mu.log_prob(data["obs"][i], data["actions"][i]) for i in holdout_idx.split(4096)])
            writer.add_scalar("eval/behavior_heldout_nll", nll.mean().item(), 0)
        # mu sampled, and mu's deterministic policy (temperature 0: each dimension's likeliest bin; the VAE's mean)
        for name, temperature in (("", 1.0), ("greedy_", 0.0)):
            policy = lambda obs, gen, t=temperature: mu.sample(obs, 1, temperature=t, generator=gen)[:, 0]  # noqa: E731
            returns = evaluate(policy, envs, dataset.observation_space, normalize, args.eval_seed, device)
            run["mu_eval"][f"{name}returns"] = returns.tolist()
            writer.add_scalar(f"eval/behavior_{name}return", returns.mean(), 0)
            if ref:
                writer.add_scalar(f"eval/behavior_{name}{ref[2]}", evaluation_summary(returns, ref)["score"], 0)
        run["phase"] = "emaq"
        run["step"] = 0
    log(f"mu alone: {evaluation_summary(run['mu_eval']['returns'], ref)['text']}")

    # EMaQ (Algorithm 1, Appendix C): the target (eq. 11) reads mu and the EMA net q_target, or their bf16 read copies
    mu_read, q_target_read = mu, q_target
    if args.precision == "bf16":
        mu_read, q_target_read = bf16_copy(mu, MU_OUTPUT), bf16_copy(q_target, Q_OUTPUT)
    states_per_chunk = target_states_per_chunk(args, mu, device)

    def update():
        idx = torch.randint(num_transitions, (args.batch_size,), device=device)  # drawn on the device
        batch = [data[key][idx] for key in ("obs", "actions", "rewards", "next_obs", "terminals")]
        return emaq_update(batch, mu_read, q_target_read, q_ensemble, q_target, q_optimizer, args, states_per_chunk)

    update = compile_update(update, args)  # torch.compile (+ CUDA graphs) where it pays; eager otherwise

    def policy(obs, generator):  # Algorithm 1
        return test_time_policy(mu, q_ensemble, obs, args.num_samples, args.test_ensemble_lambda, generator)

    progress = tqdm(range(run["step"] + 1, args.total_updates + 1), "EMaQ", args.total_updates, initial=run["step"])
    clock = (time.time(), run["step"])  # charts/SPS: updates per second since the last log, evaluations excluded
    for step in progress:
        metrics = update()
        finite = torch.isfinite(metrics["qf_loss"]) & torch.isfinite(metrics["qf_values"])
        nonfinite_at = torch.where((nonfinite_at < 0) & ~finite, step, nonfinite_at)
        run["step"] = step
        is_last = step == args.total_updates
        if step % args.log_every == 0 or is_last:
            stop_if_nonfinite(nonfinite_at, run_dir)  # host syncs: once per log interval
            for key, value in metrics.items():
                writer.add_scalar(f"losses/{key}", value.item(), step)
            writer.add_scalar("charts/SPS", (step - clock[1]) / (time.time() - clock[0]), step)
            clock = (time.time(), step)
        if step % args.eval_every == 0 or is_last:
            eval_envs = envs if is_last else make_eval_envs(dataset, args.eval_episodes)  # the last: more episodes
            returns = evaluate(policy, eval_envs, dataset.observation_space, normalize, args.eval_seed, device)
            result = evaluation_summary(returns, ref)
            run["history"].append([step, result["return_mean"], result["score"]])
            run["last_returns"] = result["returns"]
            writer.add_scalar("eval/episodic_return", result["return_mean"], step)
            writer.add_scalar("eval/episodic_return_stderr", result["return_stderr"], step)
            if ref:
                writer.add_scalar(f"eval/{ref[2]}", result["score"], step)
            clock = (time.time(), step)
        if step % args.checkpoint_every == 0 and not is_last:
            save()
        stop_if_requested(run, save, run_dir)
    progress.close()

    # The final checkpoint (the saved run that tools/ read) and the summary
    run["phase"] = "done"
    save()
    summary = dict(dataset_id=args.dataset_id, score_tag=ref[2] if ref else None, history=run["history"])
    line = []
    for name, key in (("mu", "returns"), ("mu_greedy", "greedy_returns")):  # the behavior-cloning baselines
        s = evaluation_summary(run["mu_eval"][key], ref)
        summary |= {f"{name}_{k}": s[v] for k, v in (("return", "return_mean"), ("score", "score"))}
        summary[f"{name}_return_stderr"] = s["return_stderr"]
        line.append(f"{name.replace('_', ' ')} {s['text']}")
    summary["last_eval"] = evaluation_summary(run["last_returns"], ref) if run["last_returns"] else None
    atomic_save(summary, os.path.join(run_dir, "summary.json"))
    writer.close()
    line.append(f"EMaQ last {evaluation_summary(run['last_returns'] or [np.nan], ref)['text']}")
    print(" | ".join([args.dataset_id, *line, run_dir]))
    return summary


# ----- Helpers of main: the flags, mu; speed; the run directory, checkpoints and resume, signals ------------------
def resolve_speed_flags(args, device):
    """'auto': bf16 where native (CUDA, AVX512-BF16, AMX); compile and CUDA graphs on a GPU only (no gain on a CPU)."""
    cpu_flags = open("/proc/cpuinfo").read().split() if os.path.isfile("/proc/cpuinfo") else []  # not Linux: fp32
    cpu_bf16 = "avx512_bf16" in cpu_flags or "amx_bf16" in cpu_flags  # native bf16 matmuls (emulated ones are slower)
    native = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_bf16
    args.precision = ("bf16" if native else "fp32") if args.precision == "auto" else args.precision
    args.compile = ("on" if device.type == "cuda" else "off") if args.compile == "auto" else args.compile
    if args.cudagraphs == "auto":
        args.cudagraphs = "on" if device.type == "cuda" and args.compile == "on" else "off"


def check_shared_args(args, device):
    """Refuse impossible values of the flags both scripts share, the first with one `error:` line (NaN is refused too).
    A verbatim copy in both scripts: tests/test_shared_code.py keeps them identical, tests/test_flags.py runs both."""
    letters = {"num_samples": " (N)", "num_qs": " (K)"}  # the paper's names
    at_least_one = ["num_samples", "num_qs", "q_hidden", "q_layers", "batch_size", "eval_episodes", "eval_every"]
    rules = {name: ("be >= 1", lambda v: v >= 1) for name in [*at_least_one, "log_every", "checkpoint_every"]}
    rules |= {name: ("be > 0", lambda v: v > 0) for name in ["q_lr", "behavior_lr"]}  # name: (the rule, its test)
    rules["gamma"] = ("lie in [0, 1]", lambda v: 0 <= v <= 1)
    rules["ema"] = ("lie in [0, 1) (at 1 the target never moves)", lambda v: 0 <= v < 1)
    rules["target_memory_gb"] = ("be > 0 (or unset: half the free memory)", lambda v: v is None or v > 0)
    for name, (rule, holds) in rules.items():
        if not holds(getattr(args, name)):
            fail(f"--{name.replace('_', '-')}{letters.get(name, '')} must {rule}, got {getattr(args, name)}")
    lambdas = (args.ensemble_lambda, args.test_ensemble_lambda)
    if not (0 <= lambdas[0] <= 1 and 0 <= lambdas[1] <= 1):
        fail(f"--ensemble-lambda and --test-ensemble-lambda must lie in [0, 1], got {lambdas[0]} and {lambdas[1]}")
    if args.cudagraphs == "on" and (args.compile == "off" or device.type != "cuda"):
        fail("--cudagraphs on replays the compiled update on a CUDA GPU: it needs --compile on and a GPU")


def check_args(args: Args, device) -> Args:
    """Resolve 'auto' flags; refuse impossible values: the flags both scripts share, then this script's own."""
    args = dataclasses.replace(args, preset=preset_for(args.dataset_id) if args.preset == "auto" else args.preset)
    args.final_eval_episodes = args.final_eval_episodes or args.eval_episodes
    resolve_speed_flags(args, device)
    check_shared_args(args, device)
    if min(args.total_updates, args.behavior_updates, args.final_eval_episodes) < 0:
        fail("--total-updates, --behavior-updates and --final-eval-episodes must be >= 0")
    if not 0 <= args.behavior_holdout < 0.5:
        fail(f"--behavior-holdout must lie in [0, 0.5), got {args.behavior_holdout}")
    if not (args.behavior_path or args.behavior_updates):
        fail("--behavior-updates 0 needs --behavior-path (a saved mu)")
    return args


def build_or_load_mu(args: Args, obs_dim: int, act_dim: int, low, high):
    """A new mu, or a saved one (--behavior-path) trained on this dataset, with this normalization, for these shapes."""
    if not args.behavior_path and args.behavior_model == "vae":
        return VAEBehaviorModel(obs_dim, low, high)
    if not args.behavior_path:
        return BehaviorModel.from_preset(args.preset, obs_dim, low, high)
    model_class = VAEBehaviorModel if args.behavior_model == "vae" else BehaviorModel
    try:
        mu = model_class.load(args.behavior_path, obs_dim, act_dim)
    except ValueError as e:
        fail(str(e))
    meta_path = os.path.join(os.path.dirname(os.path.abspath(args.behavior_path)), "mu.json")
    meta = json.load(open(meta_path)) if os.path.exists(meta_path) else dataclasses.asdict(args)  # else: trusted
    trained, this_run = (meta["dataset_id"], meta["normalize_obs"]), (args.dataset_id, args.normalize_obs)
    if trained != this_run:
        fail(f"{args.behavior_path} was trained on (dataset, normalize_obs) {trained}, this run has {this_run}")
    return mu


# ----- speed: bf16 read copies, target chunks, torch.compile and CUDA graphs (docs/benchmarks.md) ----------------
Q_OUTPUT = ("w_out", "b_out")  # the Q ensemble's output layer: fp32 in the bf16 read copy (mu's: MU_OUTPUT)
CPU_TARGET_ROWS = 640  # (s', a') rows per target chunk on a CPU: a few MB stay in the caches (30-60 MB page-fault)


def target_states_per_chunk(args, mu, device) -> int:
    """Next states per target chunk: what --target-memory-gb (or half the free memory) holds; a CPU: CPU_TARGET_ROWS."""
    per_state = 4 * args.num_samples * (3 * args.num_qs * args.q_hidden + mu.floats_per_sample)
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else float("inf")  # a CPU: chunks of a few MB
    budget = args.target_memory_gb * 2**30 if args.target_memory_gb else free / 2
    if per_state > budget:
        needs = f"{per_state / 2**30:.2f} GiB per state (N={args.num_samples})"
        fail(f"the EMaQ target needs {needs} (budget {budget / 2**30:.2f} GiB): lower --num-samples or --num-qs")
    states = int(min(args.batch_size, budget // per_state))
    return states if device.type != "cpu" else max(1, min(states, CPU_TARGET_ROWS // args.num_samples))


def compile_update(update, args):
    """torch.compile the update (+ one CUDA graph per update); if compiling fails (no C++ compiler), go on eagerly."""
    if args.compile != "on":
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
            log(f"warning: torch.compile failed ({type(e).__name__}: {str(e)[:150]}); continuing eagerly")
            compiled = update
            return update(*batches)

    return compiled_update


# ----- run directory, checkpoints and resume, signals --------------------------------------------------------------
def atomic_save(obj, path: str):
    """Write a temporary file beside `path`, then rename it: a crash or a full disk never leaves a torn file."""
    try:
        if path.endswith(".json"):
            with open(f"{path}.tmp", "w") as f:
                json.dump(obj, f, indent=2)
        else:
            torch.save(obj, f"{path}.tmp")
        os.replace(f"{path}.tmp", path)
    finally:
        if os.path.exists(f"{path}.tmp"):
            os.remove(f"{path}.tmp")


def open_run_dir(args: Args, ckpt):
    """runs_dir/<dataset>__<exp_name>__<seed>__<time>, or the resumed run's; config.json and the TensorBoard writer."""
    run_name = f"{args.dataset_id.replace('/', '__')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = args.resume or os.path.join(args.runs_dir, run_name)
    try:
        os.makedirs(run_dir, exist_ok=True)
        atomic_save(dataclasses.asdict(args), os.path.join(run_dir, "config.json"))  # a resumed run's may be extended
    except OSError as e:
        fail(f"cannot write the run directory {run_dir}: {e.strerror}; pass a writable --runs-dir")
    return run_dir, SummaryWriter(run_dir)


def last_checkpoint(run_dir) -> str:
    with contextlib.suppress(OSError, ValueError, KeyError):
        meta = json.load(open(os.path.join(run_dir, "checkpoint.json")))
        return f"the checkpoint {run_dir}/checkpoint.pt ({meta['phase']} update {meta['step']})"
    return "no earlier checkpoint"


def stop_if_nonfinite(nonfinite_at: torch.Tensor, run_dir):
    """Fail, naming the first update whose loss or Q values were NaN/Inf (a host sync: call at log intervals)."""
    bad = int(nonfinite_at)
    if bad >= 0:
        good = last_checkpoint(run_dir)
        fail(f"the losses became NaN/Inf at update {bad}; resume from {good} with a lower --q-lr (or --behavior-lr)")


def save_checkpoint(run_dir, run: dict, models: dict, nonfinite_at):
    """Models, optimizers, torch's RNG (training draws from it alone), counters; never a NaN/Inf state."""
    stop_if_nonfinite(nonfinite_at, run_dir)
    rng = dict(rng=torch.get_rng_state(), cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])
    try:
        atomic_save(run | rng | {key: model.state_dict() for key, model in models.items()}, f"{run_dir}/checkpoint.pt")
        atomic_save({"phase": run["phase"], "step": run["step"]}, f"{run_dir}/checkpoint.json")
    except OSError as e:
        fail(f"no checkpoint written ({e.strerror}); {last_checkpoint(run_dir)} is intact: free space and --resume it")


def load_checkpoint(args: Args) -> dict:
    """--resume: refuse flags that change what is computed (speed flags may change; more --total-updates extend)."""
    saved = read_config(args.resume)
    free = ("resume", "cuda", "compile", "cudagraphs", "target_memory_gb", "total_updates")  # a larger one extends
    changed = [k for k, v in dataclasses.asdict(args).items() if k not in free and v != getattr(saved, k)]
    conflicts = [f"--{k.replace('_', '-')} {getattr(args, k)} (the run has {getattr(saved, k)})" for k in changed]
    if conflicts:
        fail(f"cannot resume {args.resume} with {', '.join(conflicts)}: resume without them, or start a new run")
    path = os.path.join(args.resume, "checkpoint.pt")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert {"phase", "step", "rng", "mu", "history", "mu_eval"} <= set(ckpt), "keys missing"
    except FileNotFoundError:
        fail(f"{args.resume} has no checkpoint.pt yet (one comes every --checkpoint-every updates): start a new run")
    except Exception as e:
        fail(f"{path} is truncated or not a checkpoint of this script ({type(e).__name__}): nothing was overwritten")
    if ckpt["phase"] == "done" and args.total_updates <= ckpt["step"]:
        fail(f"the run in {args.resume} already finished: extend it with a larger --total-updates, or start a new run")
    if ckpt["phase"] == "emaq" and args.total_updates < ckpt["step"]:
        fail(f"--total-updates {args.total_updates} is below the run's {ckpt['step']} updates: pass a larger one")
    return ckpt


def restore_checkpoint(ckpt: dict, models: dict, run: dict, args: Args):
    """Models, optimizers, RNG, counters; an extended run drops a last evaluation off --eval-every (never made)."""
    for key, model in models.items():
        model.load_state_dict(ckpt[key])
    torch.set_rng_state(ckpt["rng"])
    if torch.cuda.is_available() and ckpt["cuda_rng"]:
        torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
    run |= {key: ckpt[key] for key in ("phase", "step", "history", "mu_eval", "last_returns")}
    if run["phase"] == "done":
        run["phase"] = "emaq"
        if run["history"] and run["history"][-1][0] % args.eval_every:
            run["history"].pop()


STOP = {"signal": None}  # set by SIGINT/SIGTERM; the training loops checkpoint and exit at the next update


def stop_if_requested(run: dict, save, run_dir):
    if STOP["signal"] is not None:
        save()
        where = f"{run['phase']} update {run['step']}"
        resume = f"python emaq_offline.py --resume {run_dir}"
        fail(f"stopped by signal {STOP['signal']} at {where}: checkpoint written. Resume with: {resume}", code=130)


if __name__ == "__main__":
    main(cli())
