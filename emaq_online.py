"""Online EMaQ (Ghasemipour, Schuurmans & Gu, ICML 2021, Appendix F), fully online or deployment-efficient.

One file, read top to bottom: collect M environment steps with the current policy (exploration: N samples from
a temperature-smoothed mu, keep the best by mean + beta * std of the ensemble, eq. 67), then run M updates of
mu (maximum likelihood on the replay buffer) and of the Q ensemble (the EMaQ target, eq. 11). M = 1 is fully
online; M = 50,000 is the paper's deployment-efficient setting. Docs: README.md.
"""

import copy
import dataclasses
import json
import os
import random
import signal
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Literal, Optional

import gymnasium as gym
import numpy as np
import torch
import tyro
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from behavior_model import BehaviorModel, action_bounds


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
    total_steps: int = 1_000_000
    """environment steps (transitions) to collect"""
    learning_starts: int = 10_000
    """uniform random actions, and no updates, for this many environment steps"""
    trajectory_batch_size: int = 1
    """M: collect M environment steps with the current, frozen policy, then run M updates (1: fully online; 50000: deployment-efficient)"""
    num_envs: int = 1
    """environments stepped together during collection"""
    buffer_size: int = 1_000_000
    """replay buffer capacity (transitions), kept on the training device"""

    # Exploration (Appendix F, eq. 67)
    num_samples: int = 200
    """N: actions sampled from mu for exploration, the target (eq. 11) and the test-time policy"""
    temperature: float = 1.0
    """exploration divides mu's logits by this (the paper sweeps 1, 5, 10, 20); targets and evaluation use 1"""
    ucb_beta: float = 1.0
    """beta of the exploration score mean(Q) + beta * std(Q) over the ensemble"""

    # EMaQ (Table 2 sizes)
    behavior_preset: Literal["mujoco", "table3"] = "mujoco"
    """mu's sizes: 'mujoco' (750x2 state MLP, heads 3x256, 40 bins) or the smaller 'table3'"""
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

    # Evaluation, logging, saving
    eval_every: int = 10_000
    """evaluate the test-time policy every this many environment steps"""
    eval_episodes: int = 10
    """episodes per evaluation, run as one vectorized environment"""
    eval_seed: int = 0
    """seed of the evaluation episodes"""
    log_every: int = 1_000
    """move losses to the host and log them every this many updates"""
    save_model: bool = False
    """write mu, the Q ensemble, its targets and the config into the run directory at the end"""
    save_dataset: Optional[str] = None
    """write every collected transition as a Minari dataset with this id (emaq_offline.py --dataset-id trains on it)"""
    checkpoint_every: int = 50_000
    """write the full state (models, optimizers, replay buffer, RNGs, environments) every this many env steps + updates"""
    resume: Optional[str] = None
    """continue the run in this run directory from its last checkpoint"""


# D4RL's reference returns (random policy, expert), attached to saved datasets of these environment families.
D4RL_REF_SCORES = {
    "halfcheetah": (-280.178953, 12135.0),
    "hopper": (-20.272305, 3234.3),
    "walker2d": (1.629008, 4592.3),
    "ant": (-325.6, 3879.7),
}


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


def check_args(args: Args):
    problems = [
        (args.trajectory_batch_size < 1, f"--trajectory-batch-size (M) must be >= 1, got {args.trajectory_batch_size}"),
        (args.num_samples < 1, f"--num-samples (N) must be >= 1, got {args.num_samples}"),
        (args.num_qs < 1, f"--num-qs (K) must be >= 1, got {args.num_qs}"),
        (not 0 <= args.ensemble_lambda <= 1 or not 0 <= args.test_ensemble_lambda <= 1, "--ensemble-lambda and --test-ensemble-lambda must lie in [0, 1]"),
        (args.temperature <= 0, f"--temperature must be > 0, got {args.temperature}"),
        (args.checkpoint_every < 1, "--checkpoint-every must be >= 1"),
        (min(args.num_envs, args.batch_size, args.buffer_size, args.eval_every, args.eval_episodes, args.log_every, args.q_hidden, args.q_layers) < 1,
         "--num-envs, --batch-size, --buffer-size, --eval-every, --eval-episodes, --log-every, --q-hidden and --q-layers must be >= 1"),
    ]
    for bad, message in problems:
        if bad:
            fail(message)
    if args.save_dataset and not args.resume:
        import minari
        from minari.dataset.minari_dataset import DATASET_ID_RE

        if not DATASET_ID_RE.fullmatch(args.save_dataset):
            fail(f"--save-dataset {args.save_dataset!r} is not a Minari id: use (namespace/)name-v<version>, e.g. online/hopper-v0")
        if args.save_dataset in minari.list_local_datasets():
            fail(f"a Minari dataset {args.save_dataset!r} already exists: pick another --save-dataset id or delete it (minari delete)")


def make_env(env_id: str, seed: int):
    def thunk():
        env = gym.make(env_id)
        env.action_space.seed(seed)
        return env

    return thunk


def make_envs(env_id: str, num: int, seed: int):
    """A vector env (Gymnasium 1.x, autoreset on the step after an episode ends), refusing what EMaQ cannot handle."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            envs = gym.vector.SyncVectorEnv([make_env(env_id, seed + i) for i in range(num)])
        envs = gym.wrappers.vector.RecordEpisodeStatistics(envs)
    except gym.error.Error as e:
        fail(f"cannot make environment {env_id!r}: {e}. Check the id (gymnasium.pprint_registry() lists them)")
    try:
        action_bounds(envs.single_action_space)
    except ValueError as e:
        fail(f"environment {env_id}: {e}")
    if not isinstance(envs.single_observation_space, gym.spaces.Box):
        fail(f"environment {env_id} has {envs.single_observation_space} observations: emaq_online.py takes Box observations "
             f"(wrap a Dict space with gymnasium.wrappers.FlattenObservation in your own registration)")
    return envs


# ---------------------------------------------------------------------------------------------------
# Replay buffer on the training device
# ---------------------------------------------------------------------------------------------------
def make_buffer(capacity, obs_dim, act_dim, device):
    zeros = lambda *shape: torch.zeros(capacity, *shape, device=device)  # noqa: E731
    return {"obs": zeros(obs_dim), "actions": zeros(act_dim), "rewards": zeros(), "next_obs": zeros(obs_dim),
            "terminals": zeros(), "truncated": zeros(), "env": torch.zeros(capacity, dtype=torch.long, device=device),
            "ptr": 0, "size": 0}


def buffer_add(buf, **rows):
    """Append rows (numpy arrays of equal length), overwriting the oldest when full."""
    n, capacity = len(rows["obs"]), len(buf["obs"])
    idx = torch.arange(buf["ptr"], buf["ptr"] + n) % capacity
    for key, value in rows.items():
        buf[key][idx] = torch.as_tensor(np.asarray(value), dtype=buf[key].dtype).to(buf[key].device)
    buf["ptr"], buf["size"] = (buf["ptr"] + n) % capacity, min(buf["size"] + n, capacity)


def buffer_sample(buf, batch_size):
    idx = torch.randint(buf["size"], (batch_size,), device=buf["obs"].device)
    return (buf[k][idx] for k in ("obs", "actions", "rewards", "next_obs", "terminals"))


def step_and_store(envs, obs, actions, autoreset, buf):
    """One vector step; stores its real transitions. Returns (next_obs, ended, real, infos).

    Gymnasium 1.x autoreset: a sub-env whose episode ended on the previous step (`autoreset`) is reset by this
    step, which ignores its action. (obs, action, next_obs) there joins two episodes: it is not a transition.
    The older `final_observation` pattern does not apply: the final observation is the next_obs of the ending step."""
    next_obs, rewards, terminated, truncated, infos = envs.step(actions)
    real = ~autoreset
    if real.any():
        buffer_add(buf, obs=obs[real], actions=actions[real], rewards=rewards[real], next_obs=next_obs[real],
                   terminals=terminated[real], truncated=truncated[real], env=np.nonzero(real)[0])
    return next_obs, terminated | truncated, real, infos


# ---------------------------------------------------------------------------------------------------
# Q ensemble, EMaQ target, exploration and test-time policies
# ---------------------------------------------------------------------------------------------------
class QEnsemble(nn.Module):
    """K Q networks with weights stacked [K, in, out]; the first layer projects each state once, not once per sample."""

    def __init__(self, obs_dim: int, act_dim: int, num_qs: int, hidden: int, layers: int):
        super().__init__()

        def stacked(fan_in, *shape):  # nn.Linear's default initialization, for every member
            bound = 1 / fan_in**0.5
            return nn.Parameter(torch.empty(num_qs, *shape).uniform_(-bound, bound))

        self.w_obs, self.w_act = stacked(obs_dim + act_dim, obs_dim, hidden), stacked(obs_dim + act_dim, act_dim, hidden)
        self.b_in = stacked(obs_dim + act_dim, 1, hidden)
        self.w_hidden = nn.ParameterList([stacked(hidden, hidden, hidden) for _ in range(layers - 1)])
        self.b_hidden = nn.ParameterList([stacked(hidden, 1, hidden) for _ in range(layers - 1)])
        self.w_out, self.b_out = stacked(hidden, hidden, 1), stacked(hidden, 1, 1)
        self.num_qs = num_qs

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """obs [B, S], actions [B, N, A] -> Q values [K, B, N]."""
        batch, n, act_dim = actions.shape
        k = self.num_qs
        state_part = torch.baddbmm(self.b_in, obs.expand(k, -1, -1), self.w_obs)
        action_part = torch.bmm(actions.reshape(1, batch * n, act_dim).expand(k, -1, -1), self.w_act)
        x = (action_part.view(k, batch, n, -1) + state_part.unsqueeze(2)).relu_().view(k, batch * n, -1)
        for w, b in zip(self.w_hidden, self.b_hidden):
            x = torch.baddbmm(b, x, w).relu_()
        return torch.baddbmm(self.b_out, x, self.w_out).view(k, batch, n)


def ensemble(q_values: torch.Tensor, lam: float) -> torch.Tensor:
    """Ensemble / TestEnsemble over the K members (dim 0): lambda * min + (1 - lambda) * max."""
    return lam * q_values.min(0).values + (1 - lam) * q_values.max(0).values


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


@torch.no_grad()
def test_time_policy(mu, q_ensemble, obs, args: Args) -> torch.Tensor:
    """Algorithm 1: N samples from mu at temperature 1, the argmax of TestEnsemble."""
    candidates = mu.sample(obs, args.num_samples)
    scores = ensemble(q_ensemble(obs, candidates), args.test_ensemble_lambda)
    return candidates[torch.arange(len(obs), device=obs.device), scores.argmax(-1)]


def target_states_per_chunk(args: Args, mu: BehaviorModel, device) -> int:
    """How many next states the target may process at once (half the free memory); refuse up front if not one fits."""
    per_state = 4 * args.num_samples * (3 * args.num_qs * args.q_hidden + 4 * mu.config["head_hidden"] + 3 * mu.num_bins)  # bytes
    if device.type == "cuda":
        budget = torch.cuda.mem_get_info(device)[0] / 2
    else:
        try:
            with open("/proc/meminfo") as f:
                budget = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable")) / 2
        except (OSError, StopIteration):
            budget = 4 * 2**30
    if per_state > budget:
        fail(f"the EMaQ target needs {per_state / 2**30:.2f} GiB per state for N={args.num_samples}, K={args.num_qs}, "
             f"q_hidden={args.q_hidden}, more than the {budget / 2**30:.2f} GiB budget: lower --num-samples or --num-qs")
    return int(min(args.batch_size, budget // per_state))


def update(buf, mu, mu_optimizer, q_ensemble, q_target, q_optimizer, args: Args, states_per_chunk=None) -> dict:
    """One maximum-likelihood step of mu and one EMaQ step of the Q ensemble (eqs. 10-11), on replay batches."""
    obs, actions, *_ = buffer_sample(buf, args.batch_size)
    nll = mu.loss(obs, actions)  # online, mu tracks the mixture of the policies that filled the buffer
    mu_optimizer.zero_grad(set_to_none=True)
    nll.backward()
    mu_optimizer.step()

    obs, actions, rewards, next_obs, terminals = buffer_sample(buf, args.batch_size)
    with torch.no_grad():  # eq. 11, with N samples of mu at temperature 1, a chunk of next states at a time if needed
        backup = torch.cat([ensemble(q_target(chunk, mu.sample(chunk, args.num_samples)), args.ensemble_lambda).max(-1).values
                            for chunk in next_obs.split(states_per_chunk or len(next_obs))])
        target = rewards + args.gamma * (1 - terminals) * backup
    q = q_ensemble(obs, actions.unsqueeze(1)).squeeze(-1)
    loss = ((q - target) ** 2).mean(1).sum()  # eq. 10, summed over independent members
    q_optimizer.zero_grad(set_to_none=True)
    loss.backward()
    q_optimizer.step()
    with torch.no_grad():
        for p_target, p in zip(q_target.parameters(), q_ensemble.parameters()):
            p_target.lerp_(p, 1 - args.ema)
    return {"behavior_nll": nll.detach(), "qf_loss": loss.detach() / args.num_qs, "qf_values": q.detach().mean(),
            "q_ensemble_std": q.detach().std(0).mean(), "target_values": target.mean()}


def evaluate(policy, envs, seed: int, device) -> np.ndarray:
    """Undiscounted return of the first episode of every sub-environment."""
    obs, _ = envs.reset(seed=seed)
    returns, done = np.zeros(envs.num_envs), np.zeros(envs.num_envs, dtype=bool)
    while not done.all():
        actions = policy(torch.as_tensor(obs, dtype=torch.float32, device=device)).cpu().numpy()
        obs, rewards, terminated, truncated, _ = envs.step(actions)
        returns += rewards * ~done
        done |= terminated | truncated
    return returns


# ---------------------------------------------------------------------------------------------------
# Hand-off to offline: the replay buffer as a Minari dataset
# ---------------------------------------------------------------------------------------------------
def save_minari_dataset(dataset_id: str, buf, env_id: str, num_envs: int):
    """Rebuild each environment's episodes (T+1 observations, T actions) from the buffer and write a Minari dataset."""
    import minari
    from minari.data_collector.episode_buffer import EpisodeBuffer

    order = (torch.arange(buf["size"]) + (buf["ptr"] if buf["size"] == len(buf["obs"]) else 0)) % len(buf["obs"])
    rows = {k: buf[k][order.to(buf["obs"].device)].cpu().numpy() for k in ("obs", "actions", "rewards", "next_obs", "terminals", "truncated", "env")}
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
            episodes.append(EpisodeBuffer(id=len(episodes), observations=np.concatenate([rows["obs"][ep[:1]], rows["next_obs"][ep]]),
                                          actions=rows["actions"][ep], rewards=rows["rewards"][ep].tolist(),
                                          terminations=rows["terminals"][ep].astype(bool).tolist(), truncations=truncations.tolist()))
            start = end + 1
    family = env_id.split("-")[0].lower()
    scores = dict(zip(("ref_min_score", "ref_max_score"), D4RL_REF_SCORES[family])) if family in D4RL_REF_SCORES else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        minari.create_dataset_from_buffers(dataset_id, episodes, env=env_id, algorithm_name="EMaQ online (emaq_online.py)",
                                           author="emaq_online.py", author_email="none", code_permalink="emaq_online.py",
                                           description=f"Every transition collected by online EMaQ in {env_id}.", **scores)
    return sum(len(e.rewards) for e in episodes), len(episodes)


# ---------------------------------------------------------------------------------------------------
# Checkpoints: models, optimizers, replay buffer, RNGs and the environments' exact state
# ---------------------------------------------------------------------------------------------------
STOP = {"signal": None}  # set by SIGINT/SIGTERM; the loop checkpoints and exits at the next step


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
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "python": [version, torch.tensor(py_state), py_gauss]}


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
    return {"subs": subs, "autoreset": torch.from_numpy(envs.env._autoreset_envs.copy()),
            "episode_returns": torch.from_numpy(envs.episode_returns.copy()), "episode_lengths": torch.from_numpy(envs.episode_lengths.copy()),
            "prev_dones": torch.from_numpy(envs.prev_dones.copy()), "episode_count": int(envs.episode_count),
            "action_space": json.dumps(envs.action_space.np_random.bit_generator.state)}


def set_env_state(envs, state: dict) -> bool:
    """Restore env_state(); returns False when a running episode could not be restored exactly (not MuJoCo)."""
    import mujoco

    exact = True
    for env, sub in zip(envs.env.envs, state["subs"]):
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
    envs.episode_returns[:], envs.episode_lengths[:] = state["episode_returns"].numpy(), state["episode_lengths"].numpy()
    envs.prev_dones[:], envs.episode_count = state["prev_dones"].numpy(), state["episode_count"]
    envs.action_space.np_random.bit_generator.state = json.loads(state["action_space"])
    return exact


def last_checkpoint(run_dir) -> str:
    try:
        with open(os.path.join(run_dir, "checkpoint.json")) as f:
            meta = json.load(f)
        return f"the checkpoint {run_dir}/checkpoint.pt (env step {meta['global_step']}, update {meta['num_updates']})"
    except (OSError, ValueError, KeyError):
        return "no checkpoint yet"


def resolve_resume(args: Args):
    """--resume takes the saved run's config and checkpoint; any other flag that disagrees with it is refused."""
    if not args.resume:
        return args, None
    try:
        with open(os.path.join(args.resume, "config.json")) as f:
            saved = Args(**json.load(f))
    except (OSError, ValueError, TypeError) as e:
        fail(f"{args.resume} is not a run directory of emaq_online.py ({e}); pass runs/<run name>")
    defaults = Args()
    conflicts = [f"--{f.name.replace('_', '-')} {getattr(args, f.name)} (the run has {getattr(saved, f.name)})"
                 for f in dataclasses.fields(Args) if f.name not in ("resume", "cuda")
                 and getattr(args, f.name) not in (getattr(defaults, f.name), getattr(saved, f.name))]
    if conflicts:
        fail(f"cannot resume {args.resume} with " + ", ".join(conflicts) + ": resume without those flags, or start a new run")
    path = os.path.join(args.resume, "checkpoint.pt")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        missing = [k for k in ("loop", "envs", "buffer", "rng", "mu", "q_ensemble") if k not in ckpt]
        if missing:
            raise KeyError(f"missing {missing}")
    except FileNotFoundError:
        fail(f"{args.resume} has no checkpoint.pt to resume from: start a new run")
    except Exception as e:
        fail(f"{path} is truncated or not a checkpoint of emaq_online.py ({type(e).__name__}); nothing was overwritten: "
             f"resume from a copy of the run, or start a new run")
    if ckpt["loop"]["done"]:
        fail(f"the run in {args.resume} already finished; start a new run")
    return dataclasses.replace(saved, resume=args.resume, cuda=args.cuda), ckpt


# ---------------------------------------------------------------------------------------------------
def main(args: Args):
    args, ckpt = resolve_resume(args)
    check_args(args)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    envs = make_envs(args.env_id, args.num_envs, args.seed)
    envs.action_space.seed(args.seed)
    eval_envs = make_envs(args.env_id, args.eval_episodes, args.eval_seed)
    obs_dim, act_dim = envs.single_observation_space.shape[0], envs.single_action_space.shape[0]
    low, high = action_bounds(envs.single_action_space)
    buf = make_buffer(min(args.buffer_size, args.total_steps), obs_dim, act_dim, device)

    run_dir = args.resume or os.path.join(args.runs_dir, f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}")
    try:
        os.makedirs(run_dir, exist_ok=True)
        if not ckpt:
            atomic_save(asdict(args), os.path.join(run_dir, "config.json"))
    except OSError as e:
        fail(f"cannot write the run directory {run_dir}: {e.strerror}; pass a writable --runs-dir")
    writer = SummaryWriter(run_dir)
    if not ckpt:
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items()))
    log(f"{args.env_id}: obs {obs_dim}, actions {act_dim}, M={args.trajectory_batch_size}, N={args.num_samples}, "
        f"temperature {args.temperature}, device {device}, run {run_dir}" + (f", resuming at step {ckpt['loop']['global_step']}" if ckpt else ""))

    mu = BehaviorModel.from_preset(args.behavior_preset, obs_dim, low, high).to(device)
    mu_optimizer = torch.optim.Adam(mu.parameters(), lr=args.behavior_lr, fused=True)
    q_ensemble = QEnsemble(obs_dim, act_dim, args.num_qs, args.q_hidden, args.q_layers).to(device)
    q_target = copy.deepcopy(q_ensemble).requires_grad_(False)
    q_optimizer = torch.optim.Adam(q_ensemble.parameters(), lr=args.q_lr, fused=True)
    states_per_chunk = target_states_per_chunk(args, mu, device)
    models = {"mu": mu, "mu_optimizer": mu_optimizer, "q_ensemble": q_ensemble, "q_target": q_target, "q_optimizer": q_optimizer}

    # The loop is a sequence of work items: one environment step while collecting a cycle of M steps, then one
    # update per collected step. `loop` holds where it stands, so a checkpoint can be taken between any two items.
    loop = {"global_step": 0, "num_updates": 0, "collected": 0, "pending_updates": 0, "work": 0, "next_eval": args.eval_every,
            "history": [], "done": False}
    obs, _ = envs.reset(seed=args.seed)
    if ckpt:
        for key, module in models.items():
            module.load_state_dict(ckpt[key])
        for key, value in ckpt["buffer"].items():
            buf[key] = value.to(device) if torch.is_tensor(value) else value
        loop, obs = ckpt["loop"], ckpt["obs"].numpy()
        if not set_env_state(envs, ckpt["envs"]):
            log("note: this environment's running episodes cannot be restored exactly (not MuJoCo); they restart")
            obs, _ = envs.reset(seed=args.seed + loop["global_step"])
        set_rng_state(ckpt["rng"])

    first_nonfinite = torch.full((), -1, dtype=torch.long, device=device)  # tracked on the device, read when logging

    def stop_if_nonfinite():
        if (bad := int(first_nonfinite)) >= 0:
            fail(f"the loss or the Q values became NaN/Inf at update {bad}; the last good state is {last_checkpoint(run_dir)}: "
                 f"resume from it with a lower --q-lr, or check the rewards")

    def checkpoint():
        stop_if_nonfinite()  # never checkpoint a state that went non-finite
        state = {key: module.state_dict() for key, module in models.items()}
        state.update(loop=loop, obs=torch.from_numpy(obs), envs=env_state(envs), rng=rng_state(), args=asdict(args),
                     buffer={k: v for k, v in buf.items()})
        try:
            atomic_save(state, os.path.join(run_dir, "checkpoint.pt"))
            atomic_save({"global_step": loop["global_step"], "num_updates": loop["num_updates"]}, os.path.join(run_dir, "checkpoint.json"))
        except OSError as e:
            fail(f"could not write a checkpoint into {run_dir} ({e.strerror}); {last_checkpoint(run_dir)} is intact: free some space, "
                 f"then resume with: python emaq_online.py --resume {run_dir}")

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: STOP.update(signal=signum))
    start_time, start_step = time.time(), loop["global_step"]
    progress = tqdm(total=args.total_steps, initial=loop["global_step"], desc="env steps", unit="step", mininterval=1.0)
    while loop["global_step"] < args.total_steps or loop["pending_updates"] > 0:
        if loop["pending_updates"] > 0:  # --- M updates of mu and of the Q ensemble, after each cycle ---
            metrics = update(buf, mu, mu_optimizer, q_ensemble, q_target, q_optimizer, args, states_per_chunk)
            loop["num_updates"] += 1
            loop["pending_updates"] -= 1
            finite = torch.isfinite(metrics["qf_loss"]) & torch.isfinite(metrics["qf_values"]) & torch.isfinite(metrics["behavior_nll"])
            first_nonfinite = torch.where((first_nonfinite < 0) & ~finite, loop["num_updates"], first_nonfinite)
            if loop["num_updates"] % args.log_every == 0:
                stop_if_nonfinite()  # host syncs once per log interval
                values = {k: v.item() for k, v in metrics.items()}
                for key, value in values.items():
                    writer.add_scalar(f"losses/{key}", value, loop["global_step"])
                writer.add_scalar("charts/SPS", (loop["global_step"] - start_step) / (time.time() - start_time), loop["global_step"])
        else:  # --- collect one step of the cycle with the current policy, frozen while it collects ---
            if loop["global_step"] < args.learning_starts:
                actions = envs.action_space.sample()
            else:
                actions = explore(mu, q_ensemble, torch.as_tensor(obs, dtype=torch.float32, device=device), args).cpu().numpy()
            # the vector env's own flags say which sub-envs this step resets (restored exactly on resume)
            obs, ended, real, infos = step_and_store(envs, obs, actions, envs.env._autoreset_envs.copy(), buf)
            for i in np.nonzero(ended & real & infos.get("_episode", np.zeros_like(real)))[0]:
                writer.add_scalar("charts/episodic_return", infos["episode"]["r"][i], loop["global_step"])
            loop["global_step"] += int(real.sum())
            loop["collected"] += int(real.sum())
            progress.update(int(real.sum()))
            if loop["global_step"] >= loop["next_eval"]:
                returns = evaluate(lambda o: test_time_policy(mu, q_ensemble, o, args), eval_envs, args.eval_seed, device)
                loop["history"].append([loop["global_step"], float(returns.mean())])
                writer.add_scalar("eval/episodic_return", returns.mean(), loop["global_step"])
                writer.add_scalar("eval/episodic_return_std", returns.std(), loop["global_step"])
                progress.set_postfix(ret=f"{returns.mean():.0f}")
                loop["next_eval"] += args.eval_every
            if loop["collected"] >= args.trajectory_batch_size or loop["global_step"] >= args.total_steps:
                learning = loop["global_step"] >= args.learning_starts and buf["size"] >= args.batch_size
                loop["pending_updates"], loop["collected"] = (loop["collected"] if learning else 0), 0
        loop["work"] += 1
        if loop["work"] % args.checkpoint_every == 0:
            checkpoint()
        if STOP["signal"] is not None:
            checkpoint()
            close_progress_bars()
            log(f"stopped by signal {STOP['signal']} at env step {loop['global_step']}, update {loop['num_updates']}: checkpoint written. "
                f"Resume with: python emaq_online.py --resume {run_dir}")
            sys.exit(130)
    progress.close()

    if args.save_model:
        mu.save(os.path.join(run_dir, "mu.pt"))
        atomic_save({"q_ensemble": q_ensemble.state_dict(), "q_target": q_target.state_dict(), "config": asdict(args)},
                    os.path.join(run_dir, "model.pt"))
    if args.save_dataset:
        steps, episodes = save_minari_dataset(args.save_dataset, buf, args.env_id, args.num_envs)
        log(f"saved {steps} transitions in {episodes} episodes as Minari dataset {args.save_dataset}")
    loop["done"] = True
    checkpoint()
    envs.close()
    eval_envs.close()
    atomic_save({"env_id": args.env_id, "history": loop["history"], "num_updates": loop["num_updates"]}, os.path.join(run_dir, "summary.json"))
    writer.close()
    history = loop["history"]
    last = f"{history[-1][1]:.1f}" if history else "n/a"
    best = f"{max(h[1] for h in history):.1f}" if history else "n/a"
    print(f"{args.env_id} | {loop['global_step']} env steps, {loop['num_updates']} updates | eval return last {last} | best {best} | {run_dir}")
    return {"history": history, "num_updates": loop["num_updates"]}


if __name__ == "__main__":
    main(tyro.cli(Args))
