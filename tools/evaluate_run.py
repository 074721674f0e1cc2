"""Evaluate a finished run of emaq_offline.py again: its test-time policy (Algorithm 1, with the run's N and test
lambda), or mu alone (--policy mu: one sample per step; mu-greedy: temperature 0), on fresh episodes, one line on
stdout, and with --capture-video the first episode as runs/<run>/videos/.

    python tools/evaluate_run.py runs/<run> --episodes 100 --capture-video
    python tools/evaluate_run.py runs/<mu run> --episodes 100 --policy mu   # a mu run of a sweep (--total-updates 0)

Nothing else is written: the run folder stays as training left it.
"""

import gc
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Literal

import gymnasium as gym
import numpy as np
import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import emaq_offline as eo  # noqa: E402
from behavior_model import BehaviorModel, VAEBehaviorModel  # noqa: E402


@dataclass
class Args:
    run_dir: tyro.conf.Positional[str]
    """a finished run of emaq_offline.py (runs/<run name>)"""
    episodes: int = 10
    """evaluation episodes, run as one vectorized environment"""
    policy: Literal["emaq", "mu", "mu-greedy"] = "emaq"
    """emaq: Algorithm 1 (the run's N); mu: one sample of mu per step; mu-greedy: temperature 0 (the BC baselines)"""
    seed: int = 0
    """seed of the episodes and of mu's samples (a run's --eval-seed and episode count give its last evaluation)"""
    capture_video: bool = False
    """record the first episode to runs/<run>/videos/eval_<update>.mp4"""
    cuda: bool = True
    """use the GPU when one is present"""


def load_run(run_dir: str, device="cpu"):
    """A finished run: (its Args, its final checkpoint, mu, the trained Q ensemble, the observation normalizer)."""
    config = eo.read_config(run_dir)
    try:
        ckpt = torch.load(os.path.join(run_dir, "checkpoint.pt"), map_location=device, weights_only=True)
        phase, step = ckpt["phase"], ckpt["step"]
    except FileNotFoundError:
        eo.fail(f"{run_dir} has no checkpoint.pt: the run stopped before its first checkpoint; start a new run")
    except Exception as e:
        eo.fail(f"{run_dir}/checkpoint.pt is truncated or not a checkpoint of emaq_offline.py ({type(e).__name__})")
    if phase != "done":
        eo.fail(
            f"{run_dir} has not finished ({phase} update {step}): finish it with emaq_offline.py --resume {run_dir}"
        )
    try:
        mu = (VAEBehaviorModel if config.behavior_model == "vae" else BehaviorModel).load(
            os.path.join(run_dir, "mu.pt"), map_location=device
        )
        q_ensemble = eo.QEnsemble(mu.obs_dim, mu.act_dim, config.num_qs, config.q_hidden, config.q_layers)
        q_ensemble.load_state_dict(ckpt["q_ensemble"])
    except (ValueError, RuntimeError) as e:
        eo.fail(f"{run_dir} does not hold the models its config.json describes ({str(e).splitlines()[0]})")
    obs_mean, obs_std = ckpt["obs_mean"], ckpt["obs_std"]
    normalize = lambda o: (o - obs_mean) / obs_std  # noqa: E731
    return config, ckpt, mu.eval().requires_grad_(False), q_ensemble.to(device).requires_grad_(False), normalize


# ----- video: the first episode, where the environment renders offscreen ---------------------------------------------
VIDEO = dict(render_mode="rgb_array", width=320, height=240)  # mp4 encoders want sizes in multiples of 16


def renderer_problem(dataset) -> str | None:
    """None if the evaluation environment renders here, else why not, in a few words. Without a display, MuJoCo
    renders with EGL (a GPU's driver, or Mesa's software renderer), unless MUJOCO_GL says otherwise."""
    if "MUJOCO_GL" not in os.environ and not os.environ.get("DISPLAY"):
        os.environ["MUJOCO_GL"] = "egl"

    def render_once():
        try:
            import imageio_ffmpeg  # noqa: F401  (the mp4 encoder)

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                env = dataset.recover_environment(True, **VIDEO)
                env.reset(seed=0)
                frame = env.render()
                env.close()
            return None if frame is not None and frame.shape[:2] == (240, 320) else "no 320x240 frame from render()"
        except Exception as e:
            return f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else 'no message'}"

    hook, sys.unraisablehook = sys.unraisablehook, lambda *_: None  # a renderer that failed complains when freed
    try:
        return render_once()
    finally:
        gc.collect()
        sys.unraisablehook = hook


class FirstEpisodeFrames(gym.Wrapper):
    """Records the episode that a seeded reset (evaluate's) starts: a frame after the reset and after every step, until
    it ends; the vector env's later autoresets (unseeded) are not recorded. Rendering reads the simulation only."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.frames, self.recording = [], False

    def reset(self, *, seed=None, options=None):
        result = self.env.reset(seed=seed, options=options)
        if seed is not None:
            self.frames, self.recording = [self.env.render()], True
        return result

    def step(self, action):
        result = self.env.step(action)
        if self.recording:
            self.frames.append(self.env.render())
            self.recording = not (result[2] or result[3])  # terminated or truncated: the episode is whole
        return result


def write_video(path: str, frames: list, fps: float):
    import imageio.v2 as imageio

    os.makedirs(os.path.dirname(path), exist_ok=True)
    imageio.mimwrite(f"{path}.tmp.mp4", frames, fps=fps, macro_block_size=16)
    os.replace(f"{path}.tmp.mp4", path)


def main(args: Args) -> np.ndarray:
    """Evaluate the run; returns the episodes' returns."""
    if args.episodes < 1:
        eo.fail(f"--episodes must be >= 1, got {args.episodes}")
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    config, ckpt, mu, q_ensemble, normalize = load_run(args.run_dir, device)
    dataset = eo.load_dataset(config.dataset_id, config.seed)
    video = args.capture_video and (problem := renderer_problem(dataset)) is None
    if args.capture_video and not video:
        eo.log(
            f"note: --capture-video: no video, the environment cannot render here ({problem}); MUJOCO_GL=egl needs "
            "libEGL (a GPU's driver or Mesa), MUJOCO_GL=osmesa needs libOSMesa; evaluating without video"
        )
    envs = eo.make_eval_envs(dataset, args.episodes, **(VIDEO if video else {}))
    if video:  # the first sub-environment (the one that renders) records its first episode
        envs.envs[0] = recorder = FirstEpisodeFrames(envs.envs[0])

    def policy(obs, generator):  # Algorithm 1, as the run evaluated it, or mu alone
        if args.policy != "emaq":
            return mu.sample(obs, 1, temperature=float(args.policy == "mu"), generator=generator)[:, 0]
        return eo.test_time_policy(mu, q_ensemble, obs, config.num_samples, config.test_ensemble_lambda, generator)

    returns = eo.evaluate(policy, envs, dataset.observation_space, normalize, args.seed, device)
    if video:
        path = os.path.join(args.run_dir, "videos", f"eval_{ckpt['step']}.mp4")
        write_video(path, recorder.frames, envs.envs[0].metadata.get("render_fps", 30))
        eo.log(f"video of the first episode: {path}")
    envs.close()
    result = eo.evaluation_summary(returns, eo.reference_scores(dataset))["text"]
    what = f"N={config.num_samples}" if args.policy == "emaq" else args.policy
    print(f"{args.run_dir} (update {ckpt['step']}, {what}): {result}")
    return returns


if __name__ == "__main__":
    main(tyro.cli(Args))
