"""Online EMaQ (Ghasemipour, Schuurmans & Gu, ICML 2021, Appendix F): collect M environment steps with the current
policy, frozen while it collects (N samples from a temperature-smoothed mu, the best by eq. 67), then run M updates of
mu (maximum likelihood on the replay buffer) and of the Q ensemble (eq. 11). M = 1 is fully online; M = 50,000 is the
paper's deployment-efficient setting. Read top to bottom; small helpers follow main. tools/export_replay.py turns a
run's replay buffer into a Minari dataset for emaq_offline.py. Docs: docs/online.md."""

import copy
import dataclasses
import json
import os
import signal
import sys
import time
import warnings
from types import SimpleNamespace
from typing import Literal

import gymnasium as gym
import numpy as np
import torch
import tyro
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from behavior_model import MU_OUTPUT, BehaviorModel, VAEBehaviorModel, action_bounds, bf16_copy, fp32_output_layer


@dataclasses.dataclass
class Args:
    exp_name: str = "emaq_online"
    """the name of this experiment (part of the run directory's name)"""
    seed: int = 1
    """seed of torch (training draws from its generator alone) and of the environments"""
    cuda: bool = True
    """use the GPU when one is present"""
    runs_dir: str = "runs"
    """TensorBoard logs, config.json and checkpoints go to runs_dir/<run name>/"""
    preset: Literal["paper", "cpu"] = "paper"
    """'paper': Appendix F's sizes (days on a CPU); 'cpu': small sizes, 100k steps, not the paper's (docs/online.md)"""
    env_id: str = "HalfCheetah-v5"
    """a Gymnasium environment with a bounded Box action space and Box observations"""
    total_timesteps: int = 1_000_000
    """environment steps (transitions) to collect; with --resume, a larger value extends the run"""
    learning_starts: int = 10_000
    """uniform random actions, and no updates, for this many environment steps"""
    trajectory_batch_size: int = 1
    """M: collect M environment steps with the frozen policy, then run M updates (1: fully online; 50000: deployment)"""
    num_envs: int = 1
    """environments stepped together during collection"""
    buffer_size: int = 1_000_000
    """replay buffer capacity (transitions), preallocated on the training device"""
    num_samples: int = 200
    """N: actions sampled from mu for exploration, the target (eq. 11) and the test-time policy"""
    temperature: float = 1.0
    """mu's temperature in exploration (logits / T; the VAE's z * T), paper: 1, 5, 10, 20; targets and evaluation: 1"""
    ucb_beta: float = 1.0
    """beta of the exploration score mean(Q) + beta * std(Q) over the ensemble"""
    behavior_model: Literal["autoregressive", "vae"] = "autoregressive"
    """mu: the paper's autoregressive model (App. B) or the VAE of prior work (App. H.1), to compare (Section 5.1)"""
    behavior_preset: Literal["mujoco", "table3", "small"] = "mujoco"
    """the autoregressive mu's sizes: 'mujoco' (750x2 state MLP, heads 3x256, 40 bins), 'table3', 'small' (CPU runs)"""
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
    eval_every: int = 10_000
    """evaluate the test-time policy every this many environment steps"""
    eval_episodes: int = 10
    """episodes per evaluation, run as one vectorized environment"""
    eval_seed: int = 0
    """seed of the evaluation episodes and of their samples from mu (the same at every evaluation)"""
    log_every: int = 1_000
    """move losses to the host and log them every this many updates"""
    checkpoint_every: int = 50_000
    """write the full state (models, optimizers, replay buffer, torch's RNG, counters) every this many steps+updates"""
    resume: str | None = None
    """continue this run from its last checkpoint, in fresh environments (its running episodes end there, truncated)"""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """bf16 matmuls in mu's and the Q updates (Q values, targets, losses, logits stay fp32); auto: bf16 where native"""
    compile: Literal["auto", "on", "off"] = "auto"
    """torch.compile the update; auto: on for a GPU, off for a CPU (no gain there); falls back to eager if it fails"""
    cudagraphs: Literal["auto", "on", "off"] = "auto"
    """replay the compiled update as one CUDA graph (GPU only); auto: on whenever --compile is on a GPU"""
    target_memory_gb: float | None = None
    """memory budget of the target's B x N x K values; unset: half of the free device memory"""


# --preset cpu (flags passed win; `--preset cpu --help` shows it): chosen by a grid on Hopper-v5 (docs/online.md)
PRESETS = dict(paper={}, cpu=dict(num_qs=2, q_hidden=256, q_layers=2, num_samples=20, behavior_preset="small"))
PRESETS["cpu"] |= dict(q_lr=3e-4, ema=0.98, temperature=10.0, total_timesteps=100_000, learning_starts=5_000)
PRESETS["cpu"] |= dict(eval_every=5_000)


# ----- Console and errors: what the environment code, the algorithm and main report through ---------------------------
def log(message: str):
    """Progress notes go to stderr beside the progress bars; stdout carries only the final summary line."""
    tqdm.write(message, file=sys.stderr)


def fail(message: str, code: int = 2):
    """End the run with one clear line, the last on the screen: an error (code 2; no traceback), or a stop (130)."""
    for bar in list(getattr(tqdm, "_instances", [])):
        bar.close()
    log(f"error: {message}" if code == 2 else message)
    sys.exit(code)


def read_config(run_dir: str) -> Args:
    """The flags of the run in `run_dir` (its config.json)."""
    try:
        return Args(**json.load(open(os.path.join(run_dir, "config.json"))))
    except (OSError, ValueError, TypeError) as e:
        fail(f"{run_dir} is not a run directory of emaq_online.py ({e}); pass runs/<run name>")


def cli(argv=None) -> Args:
    """The command line over the defaults a run uses (a resumed run's own flags), so that --help shows them."""
    argv = sys.argv[1:] if argv is None else argv
    first, _ = tyro.cli(Args, args=[a for a in argv if a not in ("-h", "--help")], return_unknown_args=True)
    defaults = Args(**PRESETS[first.preset], preset=first.preset)
    defaults = dataclasses.replace(read_config(first.resume), resume=first.resume) if first.resume else defaults
    return tyro.cli(Args, args=argv, default=defaults)


# ----- Environment steps into a replay buffer on the training device -------------------------------------------------
def make_envs(env_id: str, num: int, **render):
    """A vector env, refusing what EMaQ cannot handle; with `render` (tools/evaluate_online_run.py --capture-video: a
    render_mode and size), the first sub-environment renders its frames."""
    try:
        with warnings.catch_warnings(action="ignore"):
            make = [lambda i=i: gym.make(env_id, **(render if i == 0 else {})) for i in range(num)]
            envs = gym.wrappers.vector.RecordEpisodeStatistics(gym.vector.SyncVectorEnv(make))
        action_bounds(envs.single_action_space)  # a bounded Box, or a ValueError that says what it is
    except gym.error.Error as e:
        fail(f"cannot make environment {env_id!r}: {e}. Check the id (gymnasium.pprint_registry() lists them)")
    except ValueError as e:
        fail(f"environment {env_id}: {e}")
    if not isinstance(envs.single_observation_space, gym.spaces.Box):
        fail(f"environment {env_id} has {envs.single_observation_space} observations: wrap it in FlattenObservation")
    return envs


def make_buffer(capacity: int, obs_dim: int, act_dim: int, device) -> dict:
    """Preallocated tensors on the device; `env`: the sub-environment that made each transition."""
    shapes = dict(obs=(obs_dim,), actions=(act_dim,), rewards=(), next_obs=(obs_dim,), terminals=(), truncated=())
    buf = {key: torch.zeros(capacity, *shape, device=device) for key, shape in shapes.items()}
    return buf | dict(env=torch.zeros(capacity, dtype=torch.long, device=device), ptr=0, size=0)


def buffer_add(buf, **rows):
    """Append rows (numpy arrays of equal length), overwriting the oldest when full."""
    n, capacity = len(rows["obs"]), len(buf["obs"])
    idx = torch.arange(buf["ptr"], buf["ptr"] + n) % capacity
    for key, value in rows.items():
        buf[key][idx] = torch.as_tensor(np.asarray(value), dtype=buf[key].dtype).to(buf[key].device)
    buf["ptr"] = (buf["ptr"] + n) % capacity
    buf["size"] = min(buf["size"] + n, capacity)


def buffer_sample(buf, batch_size) -> list[torch.Tensor]:
    idx = torch.randint(buf["size"], (batch_size,), device=buf["obs"].device)
    return [buf[key][idx] for key in ("obs", "actions", "rewards", "next_obs", "terminals")]


def replay_order(buf) -> torch.Tensor:
    """The buffer's rows, oldest first (the newest is at ptr - 1)."""
    return (torch.arange(buf["size"], device=buf["obs"].device) + buf["ptr"] - buf["size"]) % len(buf["obs"])


def step_and_store(envs, obs, actions, autoreset, buf):
    """One vector step, storing the real transitions (Gymnasium 1.x only resets a sub-env that ended: `autoreset`)."""
    next_obs, rewards, terminated, truncated, infos = envs.step(actions)
    real = ~autoreset
    if real.any():
        rows = dict(obs=obs, actions=actions, rewards=rewards, next_obs=next_obs, terminals=terminated)
        buffer_add(buf, **{k: v[real] for k, v in rows.items()}, truncated=truncated[real], env=np.nonzero(real)[0])
    return next_obs, terminated | truncated, real, infos


# ----- Q ensemble: K MLPs evaluated together (the same code as emaq_offline.py's) ------------------------------------
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


# ----- EMaQ: the target (eq. 11), one update (eq. 10), the test-time policy (Algorithm 1), exploration (eq. 67) -------
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


@torch.no_grad()
def explore(mu, q_ensemble, obs, args: Args) -> torch.Tensor:
    """Appendix F: N samples from mu at --temperature, the best by eq. 67: mean(Q) + beta * std(Q) over K members."""
    candidates = mu.sample(obs, args.num_samples, temperature=args.temperature)  # [B, N, A]
    q_values = q_ensemble(obs, candidates)  # [K, B, N]
    score = q_values.mean(0) + args.ucb_beta * q_values.std(0, correction=0)  # the population std over K
    return candidates[torch.arange(len(obs), device=obs.device), score.argmax(-1)]


# ----- Evaluation (the same code as emaq_offline.py's; observations are not normalized online) ------------------------
def flatten_obs(space: gym.Space, obs) -> np.ndarray:
    """[T, ...] observations -> [T, obs_dim] float32; Dict spaces concatenated in the space's key order."""
    if isinstance(space, gym.spaces.Dict):
        return np.concatenate([flatten_obs(sub, obs[key]) for key, sub in space.spaces.items()], axis=1)
    if isinstance(space, gym.spaces.Box):
        obs = np.asarray(obs, dtype=np.float32)
        return obs.reshape(obs.shape[0], -1)
    fail(f"unsupported observation space {space}: use Box or (nested) Dict of Box observations")


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


def main(args: Args):
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    ckpt = load_checkpoint(args) if args.resume else None
    args = check_args(args, device)
    torch.manual_seed(args.seed)  # training draws from torch's generator only (the environments from their own)

    # Environments, and the replay buffer on the training device
    envs = make_envs(args.env_id, args.num_envs)
    eval_envs = make_envs(args.env_id, args.eval_episodes)
    obs_dim, act_dim = envs.single_observation_space.shape[0], envs.single_action_space.shape[0]
    low, high = action_bounds(envs.single_action_space)
    buf = make_buffer(args.buffer_size, obs_dim, act_dim, device)

    # Models: mu (trained online), the Q ensemble and its EMA target; a checkpoint is restored here and only here
    if args.behavior_model == "vae":
        mu = VAEBehaviorModel(obs_dim, low, high).to(device)
    else:
        mu = BehaviorModel.from_preset(args.behavior_preset, obs_dim, low, high).to(device)
    mu_optimizer = torch.optim.Adam(mu.parameters(), lr=args.behavior_lr, fused=True)
    q_ensemble = QEnsemble(obs_dim, act_dim, args.num_qs, args.q_hidden, args.q_layers).to(device)
    q_target = copy.deepcopy(q_ensemble).requires_grad_(False)  # the EMA network of eq. 11
    q_optimizer = torch.optim.Adam(q_ensemble.parameters(), lr=args.q_lr, fused=True)
    models = dict(mu=mu, mu_optimizer=mu_optimizer, q_ensemble=q_ensemble, q_target=q_target, q_optimizer=q_optimizer)
    # where the loop stands (checkpointed): env steps, updates, this cycle's steps and updates, steps + updates, evals
    at = SimpleNamespace(global_step=0, num_updates=0, cycle_steps=0, cycle_updates=0, work=0, history=[])
    vars(at).update(restore_checkpoint(ckpt, models, buf, args.num_envs) if ckpt else {})
    envs.action_space.seed(args.seed + at.global_step)  # fresh episodes, also on resume
    obs, _ = envs.reset(seed=args.seed + at.global_step)
    ended = np.zeros(args.num_envs, dtype=bool)  # the sub-envs whose episode ended on the last step
    run_dir, writer = open_run_dir(args, ckpt)
    resuming = f", resuming at step {at.global_step}, update {at.num_updates}" if ckpt else ""
    log(f"{args.env_id}: obs {obs_dim}, actions {act_dim}, device {device}, run {run_dir}{resuming}")
    if device.type == "cpu" and args.total_timesteps >= 1_000_000:
        log("note: Appendix F's sizes take days on a CPU: try --preset cpu; tools/estimate_online_cost.py: its cost")
    nonfinite_at = torch.full((), -1, device=device)  # the first update whose loss was NaN/Inf; read when logging
    for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C, kill: checkpoint at the next step or update, then exit
        signal.signal(sig, lambda signum, frame: STOP.update(signal=signum))

    # One update: a maximum-likelihood step of mu, then eq. 10 for the Q ensemble, on two replay batches
    # The target reads mu and the EMA network q_target, or in bf16 their read copies (refreshed after every step)
    mu_read, q_target_read = mu, q_target
    if args.precision == "bf16":
        mu_read, q_target_read = bf16_copy(mu, MU_OUTPUT), bf16_copy(q_target, Q_OUTPUT)
    target_chunk = target_states_per_chunk(args, mu, device)  # next states per chunk of the target

    def update(mu_batch, q_batch):
        with autocast(args.precision, device):
            nll = mu.loss(*mu_batch[:2])  # online, mu tracks the mixture of the policies that filled the buffer
        mu_optimizer.zero_grad(set_to_none=True)
        nll.backward()
        mu_optimizer.step()
        if mu_read is not mu:
            with torch.no_grad():
                for p_read, p in zip(mu_read.parameters(), mu.parameters(), strict=True):
                    p_read.copy_(p)
        metrics = emaq_update(q_batch, mu_read, q_target_read, q_ensemble, q_target, q_optimizer, args, target_chunk)
        return {"behavior_nll": nll.detach(), **metrics}

    update = compile_update(update, args)  # torch.compile (+ CUDA graphs) where it pays; eager otherwise

    def policy(obs, generator):  # Algorithm 1, at temperature 1
        return test_time_policy(mu, q_ensemble, obs, args.num_samples, args.test_ensemble_lambda, generator)

    def checkpoint(end=False):  # every --checkpoint-every steps + updates, at the end, and on a stop signal (then exit)
        stop = STOP["signal"] is not None and not end
        if end or stop or at.work % args.checkpoint_every == 0:
            save_checkpoint(run_dir, vars(at) | {"done": end}, models, buf, nonfinite_at)
        if stop:
            resume = f"python emaq_online.py --resume {run_dir}"
            fail(f"stopped by signal {STOP['signal']}, checkpoint written; resume: {resume}", code=130)

    progress = tqdm(total=args.total_timesteps, initial=at.global_step, desc="env steps", mininterval=1.0)
    t0 = time.time()  # charts/SPS: env steps per second of this process
    step0 = at.global_step
    while at.global_step < args.total_timesteps or at.cycle_steps > 0:
        # Collect M environment steps with the current policy, frozen while it collects
        while at.cycle_steps < args.trajectory_batch_size and at.global_step < args.total_timesteps:
            if at.global_step < args.learning_starts:
                actions = envs.action_space.sample()
            else:
                actions = explore(mu, q_ensemble, torch.as_tensor(obs, device=device).float(), args).cpu().numpy()
            obs, ended, real, infos = step_and_store(envs, obs, actions, ended, buf)
            for i in np.nonzero(ended & infos.get("_episode", ended))[0]:
                writer.add_scalar("charts/episodic_return", infos["episode"]["r"][i], at.global_step)
            n = int(real.sum())  # transitions stored (none from a sub-env that was reset)
            at.global_step += n
            at.cycle_steps += n
            at.work += 1
            progress.update(n)
            if at.global_step >= (len(at.history) + 1) * args.eval_every:
                space = envs.single_observation_space
                returns = evaluate(policy, eval_envs, space, lambda o: o, args.eval_seed, device)
                at.history.append([at.global_step, float(returns.mean())])
                writer.add_scalar("eval/episodic_return", returns.mean(), at.global_step)
                progress.set_postfix(ret=f"{returns.mean():.0f}")
            checkpoint()

        # Then M updates of mu and of the Q ensemble, one per collected step
        learning = at.global_step >= args.learning_starts and buf["size"] >= args.batch_size
        while learning and at.cycle_updates < at.cycle_steps:
            metrics = update(buffer_sample(buf, args.batch_size), buffer_sample(buf, args.batch_size))
            at.num_updates += 1
            at.cycle_updates += 1
            at.work += 1
            finite = torch.stack([torch.isfinite(metrics[k]) for k in ("qf_loss", "qf_values", "behavior_nll")]).all()
            nonfinite_at = torch.where((nonfinite_at < 0) & ~finite, at.num_updates, nonfinite_at)
            if at.num_updates % args.log_every == 0:
                stop_if_nonfinite(nonfinite_at, run_dir)  # host syncs: once per log interval
                for key, value in metrics.items():
                    writer.add_scalar(f"losses/{key}", value.item(), at.global_step)
                writer.add_scalar("charts/SPS", (at.global_step - step0) / (time.time() - t0), at.global_step)
            checkpoint()
        at.cycle_steps = 0
        at.cycle_updates = 0
    progress.close()

    checkpoint(end=True)  # the last checkpoint holds the models and the replay buffer (tools/export_replay.py reads it)
    for closable in (envs, eval_envs, writer):
        closable.close()
    atomic_save(dict(env_id=args.env_id, history=at.history, num_updates=at.num_updates), f"{run_dir}/summary.json")
    last = f"{at.history[-1][1]:.1f} (best {max(h[1] for h in at.history):.1f})" if at.history else "n/a"
    print(f"{args.env_id} | {at.global_step} env steps, {at.num_updates} updates | eval return {last} | {run_dir}")
    return {"history": at.history, "num_updates": at.num_updates}


# ----- Helpers of main: the flags; speed; the run directory, checkpoints and resume -----------------------------------
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
    """Resolve the 'auto' speed flags; refuse impossible values: the flags both scripts share, then this script's."""
    resolve_speed_flags(args, device)
    check_shared_args(args, device)
    for name in ("trajectory_batch_size", "num_envs", "buffer_size"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.temperature > 0:
        fail(f"--temperature must be > 0, got {args.temperature}")
    return args


# ----- speed: bf16 read copies, target chunks, torch.compile and CUDA graphs (as in emaq_offline.py) ------------------
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


# ----- run directory, checkpoints and resume --------------------------------------------------------------------------
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
    """runs_dir/<env>__<exp_name>__<seed>__<time>, or the resumed run's; config.json and the TensorBoard writer."""
    run_dir = args.resume or f"{args.runs_dir}/{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    try:
        os.makedirs(run_dir, exist_ok=True)
        atomic_save(dataclasses.asdict(args), f"{run_dir}/config.json")  # a resumed run may have a new total
    except OSError as e:
        fail(f"cannot write the run directory {run_dir}: {e.strerror}; pass a writable --runs-dir")
    writer = SummaryWriter(run_dir)
    if not ckpt:
        table = "\n".join(f"|{key}|{value}|" for key, value in dataclasses.asdict(args).items())
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + table)
    return run_dir, writer


def last_checkpoint(run_dir) -> str:
    try:
        meta = json.load(open(os.path.join(run_dir, "checkpoint.json")))
        return f"the checkpoint {run_dir}/checkpoint.pt (env step {meta['global_step']}, update {meta['num_updates']})"
    except (OSError, ValueError, KeyError):
        return "no earlier checkpoint"


def stop_if_nonfinite(nonfinite_at: torch.Tensor, run_dir):
    """Fail, naming the first update whose loss or Q values were NaN/Inf (a host sync: call at log intervals)."""
    bad = int(nonfinite_at)
    if bad >= 0:
        good = last_checkpoint(run_dir)
        fail(f"the losses became NaN/Inf at update {bad}; resume from {good} with a lower --q-lr (or --behavior-lr)")


def save_checkpoint(run_dir, counters: dict, models: dict, buf: dict, nonfinite_at):
    """Models, optimizers, the buffer's rows, torch's RNG (training draws from it alone), counters; never a NaN/Inf."""
    stop_if_nonfinite(nonfinite_at, run_dir)
    rng = dict(rng=torch.get_rng_state(), cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])
    state = {key: module.state_dict() for key, module in models.items()} | dict(counters=counters) | rng
    state["buffer"] = {k: v[: buf["size"]].clone() if torch.is_tensor(v) else v for k, v in buf.items()}  # its rows
    try:
        atomic_save(state, f"{run_dir}/checkpoint.pt")
        atomic_save({key: counters[key] for key in ("global_step", "num_updates")}, f"{run_dir}/checkpoint.json")
    except OSError as e:
        fail(f"could not write a checkpoint into {run_dir} ({e.strerror}); {last_checkpoint(run_dir)} is intact")


def load_checkpoint(args: Args) -> dict:
    """--resume: refuse flags that change what is computed (speed flags may change; more --total-timesteps extend)."""
    saved = read_config(args.resume)
    free = ("resume", "cuda", "compile", "cudagraphs", "target_memory_gb", "total_timesteps")  # a larger one extends
    changed = [k for k, v in dataclasses.asdict(args).items() if k not in free and v != getattr(saved, k)]
    conflicts = [f"--{k.replace('_', '-')} {getattr(args, k)} (the run has {getattr(saved, k)})" for k in changed]
    if conflicts:
        fail(f"cannot resume {args.resume} with {', '.join(conflicts)}: resume without them, or start a new run")
    path = os.path.join(args.resume, "checkpoint.pt")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        steps = ckpt["counters"]["global_step"]
        done = ckpt["counters"]["done"]
    except FileNotFoundError:
        fail(f"{args.resume} has no checkpoint.pt yet (one comes every --checkpoint-every steps): start a new run")
    except Exception as e:
        fail(f"{path} is truncated or not a checkpoint of emaq_online.py ({type(e).__name__}): start a new run")
    if args.total_timesteps < steps or (done and args.total_timesteps == steps):
        fail(f"{args.resume} {'already finished' if done else 'is'} at step {steps}: pass a larger --total-timesteps")
    return ckpt


def restore_checkpoint(ckpt: dict, models: dict, buf: dict, num_envs: int) -> dict:
    """Models, optimizers, the replay buffer and torch's RNG, exactly; returns the counters of the loop."""
    for key, module in models.items():
        module.load_state_dict(ckpt[key])
    for key, value in ckpt["buffer"].items():  # row for row, as it was
        if torch.is_tensor(value):
            buf[key][: len(value)] = value.to(buf[key].device)
    buf["size"] = ckpt["buffer"]["size"]
    buf["ptr"] = ckpt["buffer"]["ptr"]
    order = replay_order(buf)
    for i in range(num_envs):  # the run goes on in fresh environments: each running episode ends here, truncated
        newest = order[buf["env"][order] == i][-1:]
        buf["truncated"][newest] = torch.maximum(buf["truncated"][newest], 1 - buf["terminals"][newest])
    torch.set_rng_state(ckpt["rng"])
    if torch.cuda.is_available() and ckpt["cuda_rng"]:
        torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
    return ckpt["counters"]


STOP = {"signal": None}  # set by SIGINT/SIGTERM; the training loop checkpoints and exits at the next step or update


if __name__ == "__main__":
    main(cli())
