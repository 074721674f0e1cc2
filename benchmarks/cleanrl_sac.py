"""Run CleanRL's own SAC (`cleanrl/sac_continuous_action.py`, unmodified) as a peer of emaq_online.py on the Gymnasium
this project uses. CleanRL pins gymnasium 0.29, whose vector envs reset a finished episode in the same step and report
it as `final_observation` / `final_info` (a list of per-env dicts); Gymnasium 1.x resets on the next step by default.
This runner gives the script a SyncVectorEnv in Gymnasium 1.x's same-step mode and renames its keys to the 0.29 ones,
so the script stores exactly the transitions it would under 0.29. Nothing of CleanRL is copied here.

    git clone https://github.com/vwxyzjn/cleanrl /tmp/cleanrl
    git -C /tmp/cleanrl checkout fe8d8a03c41a7ef5b523e2e354bd01c363e786bb  # the commit our comparison ran
    python benchmarks/cleanrl_sac.py /tmp/cleanrl --out runs_sac -- --env-id Hopper-v5 --total-timesteps 100000 --seed 1

CleanRL's flags follow `--`; its TensorBoard run lands in OUT/runs/<env>__sac_continuous_action__<seed>__<time>.
"""

import argparse
import os
import runpy
import sys

import gymnasium as gym


class SameStepVectorEnv(gym.vector.SyncVectorEnv):
    """Gymnasium 1.x's SyncVectorEnv in same-step autoreset mode, reporting ended episodes under 0.29's info keys."""

    def __init__(self, env_fns, **kwargs):
        super().__init__(env_fns, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP, **kwargs)

    def step(self, actions):
        obs, rewards, terminations, truncations, infos = super().step(actions)
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cleanrl_dir", help="a checkout of CleanRL's repository")
    parser.add_argument("--out", default="runs_sac", help="working directory of the run (its runs/ goes there)")
    args, cleanrl_args = parser.parse_known_args()
    script = os.path.join(os.path.abspath(args.cleanrl_dir), "cleanrl", "sac_continuous_action.py")
    if not os.path.isfile(script):
        sys.exit(f"error: {script} not found: pass a checkout of CleanRL's repository")
    gym.vector.SyncVectorEnv = SameStepVectorEnv  # the script builds its envs through this name
    sys.path.insert(0, os.path.abspath(args.cleanrl_dir))  # for cleanrl_utils
    os.makedirs(args.out, exist_ok=True)
    os.chdir(args.out)
    sys.argv = [script, *[a for a in cleanrl_args if a != "--"]]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
