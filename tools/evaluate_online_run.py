"""Evaluate a saved run of emaq_online.py again, from its last checkpoint: the test-time policy (Algorithm 1) with
other numbers of samples N than the run's, on fresh episodes. N = 1 is mu alone (one sample at temperature 1). Whether
a run's return is limited by how well N samples of mu can be maximized, or by Q, shows here.

    python tools/evaluate_online_run.py runs/<online run> --ns 1 4 20 100 --episodes 10

Nothing is written: the run folder stays as training left it.
"""

import os
import sys
from dataclasses import dataclass

import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import emaq_online as eon  # noqa: E402
from behavior_model import BehaviorModel, VAEBehaviorModel  # noqa: E402


@dataclass
class Args:
    run_dir: tyro.conf.Positional[str]
    """a run of emaq_online.py with a checkpoint (runs/<run name>)"""
    ns: tuple[int, ...] = (1, 4, 20, 100)
    """numbers of samples from mu to evaluate the test-time policy with (1: mu alone)"""
    episodes: int = 10
    """episodes per N, as one vectorized environment (the run's --eval-seed: the same episodes for every N)"""
    cuda: bool = True
    """use the GPU when one is present"""


def main(args: Args) -> dict[int, float]:
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    config = eon.read_config(args.run_dir)
    path = os.path.join(args.run_dir, "checkpoint.pt")
    if not os.path.exists(path):
        eon.fail(f"{args.run_dir} has no checkpoint.pt yet (one comes every --checkpoint-every steps)")
    ckpt = torch.load(path, map_location=device, weights_only=True)
    envs = eon.make_envs(config.env_id, args.episodes)
    obs_dim, act_dim = envs.single_observation_space.shape[0], envs.single_action_space.shape[0]
    low, high = eon.action_bounds(envs.single_action_space)
    if config.behavior_model == "vae":
        mu = VAEBehaviorModel(obs_dim, low, high)
    else:
        mu = BehaviorModel.from_preset(config.behavior_preset, obs_dim, low, high)
    q_ensemble = eon.QEnsemble(obs_dim, act_dim, config.num_qs, config.q_hidden, config.q_layers)
    mu.load_state_dict(ckpt["mu"])
    q_ensemble.load_state_dict(ckpt["q_ensemble"])
    mu, q_ensemble = mu.to(device).eval(), q_ensemble.to(device).eval()
    step, returns = ckpt["counters"]["global_step"], {}
    for n in args.ns:

        def policy(obs, generator, n=n):
            return eon.test_time_policy(mu, q_ensemble, obs, n, config.test_ensemble_lambda, generator)

        result = eon.evaluate(policy, envs, envs.single_observation_space, lambda o: o, config.eval_seed, device)
        returns[n] = float(result.mean())
        print(
            f"{config.env_id} step {step}: N = {n}: return {result.mean():.1f} ± {result.std():.1f} over {len(result)}"
        )
    envs.close()
    return returns


if __name__ == "__main__":
    main(tyro.cli(Args))
