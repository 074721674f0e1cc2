"""Evaluate a saved run of emaq_online.py again, from its last checkpoint: the test-time policy (Algorithm 1) with
other numbers of samples N than the run's, on fresh episodes. N = 1 is mu alone (one sample at temperature 1). Whether
a run's return is limited by how well N samples of mu can be maximized, or by Q, shows here.

    python tools/evaluate_online_run.py runs/<online run> --ns 1 4 20 100 --episodes 10 [--capture-video]

Nothing is written but, with --capture-video, the first episode of each N as runs/<run>/videos/eval_N<n>.mp4.
"""

import gc
import os
import sys
from dataclasses import dataclass

import gymnasium as gym
import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import emaq_online as eon  # noqa: E402
from behavior_model import BehaviorModel, VAEBehaviorModel  # noqa: E402
from tools.evaluate_run import FirstEpisodeFrames  # noqa: E402


@dataclass
class Args:
    run_dir: tyro.conf.Positional[str]
    """a run of emaq_online.py with a checkpoint (runs/<run name>)"""
    ns: tuple[int, ...] = (1, 4, 20, 100)
    """numbers of samples from mu to evaluate the test-time policy with (1: mu alone)"""
    episodes: int = 10
    """episodes per N, as one vectorized environment (the run's --eval-seed: the same episodes for every N)"""
    capture_video: bool = False
    """record the first episode of each N as runs/<run>/videos/eval_N<n>.mp4"""
    cuda: bool = True
    """use the GPU when one is present"""


# ----- video: the first episode of each N, where the environment renders offscreen (as tools/evaluate_run.py) ------
VIDEO_RENDER = dict(render_mode="rgb_array", width=320, height=240)  # mp4 encoders want sizes in multiples of 16


def renders_offscreen(env_id: str) -> bool:
    """Whether env_id renders here, else a note why. Without a display, MuJoCo uses EGL unless MUJOCO_GL is set."""
    if "MUJOCO_GL" not in os.environ and not os.environ.get("DISPLAY"):
        os.environ["MUJOCO_GL"] = "egl"
    hook = sys.unraisablehook
    sys.unraisablehook = lambda *_: None  # a half-built renderer complains when freed
    try:
        import imageio_ffmpeg  # noqa: F401  (the mp4 writer)

        with gym.make(env_id, **VIDEO_RENDER) as env:
            env.reset(seed=0)
            why = None if env.render() is not None else "render() returned no frame"
    except Exception as e:
        why = f"{type(e).__name__}: {(str(e).splitlines() or ['no message'])[0][:120]}"
    finally:
        gc.collect()
        sys.unraisablehook = hook
    if why:
        needs = "MUJOCO_GL=egl needs libEGL (a GPU's driver or Mesa), MUJOCO_GL=osmesa needs libOSMesa"
        eon.log(f"note: --capture-video: no videos, the environment cannot render here ({why}); {needs}")
    return not why


def write_video(path: str, frames: list, metadata: dict):
    """An mp4 at the environment's frame rate, written beside `path` and renamed into place."""
    import imageio.v2 as imageio

    os.makedirs(os.path.dirname(path), exist_ok=True)
    imageio.mimwrite(f"{path}.tmp.mp4", frames, fps=metadata.get("render_fps", 30), macro_block_size=16)
    os.replace(f"{path}.tmp.mp4", path)


def main(args: Args) -> dict[int, float]:
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    config = eon.read_config(args.run_dir)
    path = os.path.join(args.run_dir, "checkpoint.pt")
    if not os.path.exists(path):
        eon.fail(f"{args.run_dir} has no checkpoint.pt yet (one comes every --checkpoint-every steps)")
    ckpt = torch.load(path, map_location=device, weights_only=True)
    video = args.capture_video and renders_offscreen(config.env_id)
    envs = eon.make_envs(config.env_id, args.episodes, **(VIDEO_RENDER if video else {}))
    if video:  # the first sub-environment (the one that renders) records the first episode of each evaluation
        envs.unwrapped.envs[0] = recorder = FirstEpisodeFrames(envs.unwrapped.envs[0])
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
        if video:
            video_path = os.path.join(args.run_dir, "videos", f"eval_N{n}.mp4")
            write_video(video_path, recorder.frames, envs.metadata)
            eon.log(f"video of the first episode with N = {n}: {video_path}")
        returns[n] = float(result.mean())
        print(
            f"{config.env_id} step {step}: N = {n}: return {result.mean():.1f} ± {result.std():.1f} over {len(result)}"
        )
    envs.close()
    return returns


if __name__ == "__main__":
    main(tyro.cli(Args))
