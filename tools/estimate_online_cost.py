"""What a run of emaq_online.py will cost on this machine, before it starts: given the run's flags, it times the
random steps before --learning-starts, a step of the exploration policy (N samples of mu, the UCB score), one update
(mu and the Q ensemble, as the run makes them) and a step of the evaluation policy on models of the run's sizes, and
prints the expected wall time. The learning curve decides nothing here: the models are freshly initialized.

    python tools/estimate_online_cost.py --preset cpu --env-id Hopper-v5    # any flags of emaq_online.py
"""

import copy
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import emaq_online as eon  # noqa: E402
from behavior_model import BehaviorModel, VAEBehaviorModel  # noqa: E402
from tools.estimate_cost import human_duration, timed_rate  # noqa: E402


def estimate(args: eon.Args, device) -> str:
    """The cost line of the run `args` starts (env steps and updates, one update per step, and its evaluations)."""
    envs = eon.make_envs(args.env_id, args.num_envs)
    eval_envs = eon.make_envs(args.env_id, args.eval_episodes)
    obs_dim, act_dim = envs.single_observation_space.shape[0], envs.single_action_space.shape[0]
    low, high = eon.action_bounds(envs.single_action_space)
    if args.behavior_model == "vae":
        mu = VAEBehaviorModel(obs_dim, low, high).to(device)
    else:
        mu = BehaviorModel.from_preset(args.behavior_preset, obs_dim, low, high).to(device)
    q_ensemble = eon.QEnsemble(obs_dim, act_dim, args.num_qs, args.q_hidden, args.q_layers).to(device)
    q_target = copy.deepcopy(q_ensemble).requires_grad_(False)
    mu_optimizer = torch.optim.Adam(mu.parameters(), lr=args.behavior_lr, fused=True)
    q_optimizer = torch.optim.Adam(q_ensemble.parameters(), lr=args.q_lr, fused=True)
    buf = eon.make_buffer(max(4 * args.batch_size, 1_000), obs_dim, act_dim, device)
    obs, _ = envs.reset(seed=args.seed)
    ended = np.zeros(args.num_envs, dtype=bool)  # no sub-env has just ended

    def random_step():
        nonlocal obs, ended
        obs, ended, _, _ = eon.step_and_store(envs, obs, envs.action_space.sample(), ended, buf)

    while buf["size"] < len(buf["obs"]):
        random_step()
    random_rate = timed_rate(random_step, device) * args.num_envs

    def explore_step():
        nonlocal obs, ended
        actions = eon.explore(mu, q_ensemble, torch.as_tensor(obs, device=device).float(), args).cpu().numpy()
        obs, ended, _, _ = eon.step_and_store(envs, obs, actions, ended, buf)

    explore_rate = timed_rate(explore_step, device) * args.num_envs
    mu_read, q_target_read = mu, q_target
    if args.precision == "bf16":
        mu_read, q_target_read = eon.bf16_copy(mu, eon.MU_OUTPUT), eon.bf16_copy(q_target, eon.Q_OUTPUT)
    chunk = eon.target_states_per_chunk(args, mu, device)

    def update():  # as main's: a maximum-likelihood step of mu, then eq. 10
        with eon.autocast(args.precision, device):
            nll = mu.loss(*eon.buffer_sample(buf, args.batch_size)[:2])
        mu_optimizer.zero_grad(set_to_none=True)
        nll.backward()
        mu_optimizer.step()
        batch = eon.buffer_sample(buf, args.batch_size)
        eon.emaq_update(batch, mu_read, q_target_read, q_ensemble, q_target, q_optimizer, args, chunk)

    update_rate = timed_rate(update, device)
    eval_obs = torch.as_tensor(eval_envs.reset(seed=args.eval_seed)[0], device=device).float()

    def eval_step():  # Algorithm 1 for every evaluation episode, then one step of every environment
        actions = eon.test_time_policy(mu, q_ensemble, eval_obs, args.num_samples, args.test_ensemble_lambda)
        eval_envs.step(actions.cpu().numpy())

    eval_rate = timed_rate(eval_step, device)
    spec = envs.unwrapped.envs[0].spec
    random_steps = min(args.learning_starts, args.total_timesteps)
    learning_steps = args.total_timesteps - random_steps
    step_seconds = 1 / explore_rate + 1 / update_rate  # one update per collected step, in every mode of M
    evaluations = args.total_timesteps // args.eval_every
    eval_seconds = evaluations * spec.max_episode_steps / eval_rate if spec and spec.max_episode_steps else 0
    total = random_steps / random_rate + learning_steps * step_seconds + eval_seconds
    for closable in (envs, eval_envs):
        closable.close()
    fmt = human_duration
    line = (
        f"estimate on {device.type} ({args.precision}): {random_steps:,} random steps {fmt(random_steps / random_rate)}"
    )
    line += f", {learning_steps:,} steps with an update each {fmt(learning_steps * step_seconds)} "
    line += (
        f"({1 / step_seconds:.1f} steps/s: update {1e3 / update_rate:.1f} ms, exploration {1e3 / explore_rate:.1f} ms)"
    )
    line += f", {evaluations} evaluations up to {fmt(eval_seconds)}: {fmt(total)}"
    if device.type == "cpu" and total > 3 * 3600 and args.preset != "cpu":
        line += "; on a CPU try --preset cpu (not the paper's configuration: docs/online.md)"
    return line


def main(args: eon.Args) -> str:
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    args = eon.check_args(args, device)
    torch.manual_seed(args.seed)
    line = estimate(args, device)
    print(line)
    return line


if __name__ == "__main__":
    main(eon.cli())
