"""Run CleanRL's own SAC (`cleanrl/sac_continuous_action.py`, unmodified) as a peer of emaq_online.py on the Gymnasium
this project uses. CleanRL pins gymnasium 0.29, whose vector envs reset a finished episode in the same step and report
it as `final_observation` / `final_info` (a list of per-env dicts); Gymnasium 1.x resets on the next step by default.
This runner gives the script a SyncVectorEnv in Gymnasium 1.x's same-step mode and renames its keys to the 0.29 ones,
so the script stores exactly the transitions it would under 0.29. Nothing of CleanRL is copied here.

Evaluation, under emaq_online.py's protocol: every `--eval-every` environment steps, SAC's deterministic policy (the
tanh of its mean, scaled to the action bounds) runs `--eval-episodes` episodes in a vector env reset with
`--eval-seed` (sub-env i gets seed + i: the same episodes as emaq_online.py's evaluation), logged as
`eval/episodic_return` in the run's own TensorBoard file. After the last step, `--final-eval-episodes` more (seeds
`--eval-seed` + i again) go to the run folder's final_evaluation.json, as `online_study.py export` measures EMaQ's.
The runner reads the script's `actor` and `writer` from the frame that steps the environment; the evaluation draws
no random number, so SAC learns exactly as it does without it.

    git clone https://github.com/vwxyzjn/cleanrl /tmp/cleanrl
    git -C /tmp/cleanrl checkout fe8d8a03c41a7ef5b523e2e354bd01c363e786bb  # the commit our comparison ran
    python benchmarks/cleanrl_sac.py /tmp/cleanrl --out runs_sac -- --env-id Hopper-v5 --total-timesteps 100000 --seed 1

CleanRL's flags follow `--`; its TensorBoard run lands in OUT/runs/<env>__sac_continuous_action__<seed>__<time>.
"""

import argparse
import inspect
import json
import os
import runpy
import sys

import gymnasium as gym
import numpy as np
import torch

PLAIN_VECTOR_ENV = gym.vector.SyncVectorEnv  # the evaluation's envs: Gymnasium 1.x's default, as emaq_online.py's
EVALUATION = dict(every=5_000, episodes=10, seed=0)  # set from the command line


class SameStepVectorEnv(gym.vector.SyncVectorEnv):
    """Gymnasium 1.x's SyncVectorEnv in same-step autoreset mode, reporting ended episodes under 0.29's info keys."""

    def __init__(self, env_fns, **kwargs):
        super().__init__(env_fns, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP, **kwargs)
        self.steps_taken = 0

    def step(self, actions):
        obs, rewards, terminations, truncations, infos = super().step(actions)
        self.steps_taken += self.num_envs
        if self.steps_taken % EVALUATION["every"] < self.num_envs:  # every --eval-every steps, as emaq_online.py
            script = inspect.currentframe().f_back.f_globals  # the frame of CleanRL's training loop
            if "actor" in script and "writer" in script:
                returns = evaluate_deterministic(script["actor"], self.envs[0].spec.id, **EVALUATION)
                script["writer"].add_scalar("eval/episodic_return", returns.mean(), self.steps_taken)
        if "final_obs" in infos:
            ended, final = infos.pop("_final_obs"), infos.pop("final_info")
            infos["final_observation"] = infos.pop("final_obs")
            episode = final.get("episode", {})
            infos["final_info"] = [
                {"episode": {"r": episode["r"][i], "l": episode["l"][i]}} if ended[i] and "r" in episode else None
                for i in range(self.num_envs)
            ]
            infos.pop("_final_info", None)
        return obs, rewards, terminations, truncations, infos


@torch.no_grad()
def evaluate_deterministic(actor, env_id: str, episodes: int, seed: int, every: int = 0) -> np.ndarray:
    """The first episode's return in each of `episodes` sub-envs reset with `seed`, acting tanh(mean) (no sampling)."""
    envs = PLAIN_VECTOR_ENV([lambda: gym.make(env_id) for _ in range(episodes)])
    (obs, _), device = envs.reset(seed=seed), next(actor.parameters()).device
    returns, done = np.zeros(episodes), np.zeros(episodes, dtype=bool)
    while not done.all():
        mean, _ = actor(torch.as_tensor(obs, dtype=torch.float32, device=device))
        actions = torch.tanh(mean) * actor.action_scale + actor.action_bias
        obs, rewards, terminated, truncated, _ = envs.step(actions.cpu().numpy())
        returns += rewards * ~done
        done |= terminated | truncated
    envs.close()
    return returns


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cleanrl_dir", help="a checkout of CleanRL's repository")
    parser.add_argument("--out", default="runs_sac", help="working directory of the run (its runs/ goes there)")
    parser.add_argument("--eval-every", type=int, default=5_000, help="evaluate every this many environment steps")
    parser.add_argument("--eval-episodes", type=int, default=10, help="episodes per evaluation")
    parser.add_argument("--eval-seed", type=int, default=0, help="seed of the evaluation episodes (seed + i each)")
    parser.add_argument("--final-eval-episodes", type=int, default=50, help="episodes of the evaluation at the end")
    args, cleanrl_args = parser.parse_known_args()
    EVALUATION.update(every=args.eval_every, episodes=args.eval_episodes, seed=args.eval_seed)
    script = os.path.join(os.path.abspath(args.cleanrl_dir), "cleanrl", "sac_continuous_action.py")
    if not os.path.isfile(script):
        sys.exit(f"error: {script} not found: pass a checkout of CleanRL's repository")
    gym.vector.SyncVectorEnv = SameStepVectorEnv  # the script builds its envs through this name
    sys.path.insert(0, os.path.abspath(args.cleanrl_dir))  # for cleanrl_utils
    os.makedirs(args.out, exist_ok=True)
    os.chdir(args.out)
    sys.argv = [script, *[a for a in cleanrl_args if a != "--"]]
    script_globals = runpy.run_path(script, run_name="__main__")
    actor, env_id, run_dir = (
        script_globals["actor"],
        script_globals["args"].env_id,
        f"runs/{script_globals['run_name']}",
    )
    returns = evaluate_deterministic(actor, env_id, args.final_eval_episodes, args.eval_seed)
    with open(os.path.join(run_dir, "final_evaluation.json"), "w") as f:
        json.dump(dict(policy="deterministic", seed=args.eval_seed, returns=returns.tolist()), f)
    print(f"{env_id} | SAC final evaluation over {len(returns)} episodes: {returns.mean():.1f} | {run_dir}")


if __name__ == "__main__":
    main()
