"""What users watch (issue #17): videos of evaluation episodes, the cost estimate before a run, the CPU preset, and
the model FLOP utilization (MFU) of the Q update."""

import glob
import json
import os
import sys

import imageio.v2 as imageio
import minari
import numpy as np
import torch
from conftest import ROOT, TINY, run_script
from test_offline import tensorboard_tags

import emaq_offline as eo
import emaq_online as eon
from behavior_model import PRESETS as MU_PRESETS
from behavior_model import BehaviorModel, VAEBehaviorModel

DATASET = "emaq/Hopper-v5/random_2000-v0"  # random Hopper episodes end within tens of steps: short videos


def hopper_run(tmp_path, name, *flags, env=None):
    runs = str(tmp_path / name)
    result = run_script("emaq_offline.py", "--dataset-id", DATASET, "--runs-dir", runs, *TINY, *flags, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = glob.glob(os.path.join(runs, "*"))
    return result, run_dir, json.load(open(os.path.join(run_dir, "summary.json")))


# ----- videos ----------------------------------------------------------------------------------------------------
def test_evaluate_renders_the_first_episode_without_changing_any_return():
    eo.load_minari_dataset(DATASET, 0)  # generated on first use
    dataset = minari.load_dataset(DATASET)
    assert not eo.video_unavailable(lambda: dataset.recover_environment(True, **eo.VIDEO_RENDER))

    def policy(obs, generator):  # a fixed, state-dependent policy: the same actions whenever the states agree
        return torch.tanh(obs[:, :3] * 0.5)

    results = {}
    for video in (False, True):
        envs = eo.make_eval_envs(dataset, 3, video)
        frames = [] if video else None
        results[video] = (eo.evaluate(policy, envs, dataset.observation_space, lambda o: o, 0, "cpu", frames), frames)
        envs.close()
    np.testing.assert_array_equal(results[False][0], results[True][0])  # rendering reads, never changes
    # the first episode's length, counted on a plain environment with the same seed and policy
    env = dataset.recover_environment(eval_env=True)
    obs, _ = env.reset(seed=0)
    steps, done = 0, False
    while not done:
        obs, _, terminated, truncated, _ = env.step(
            policy(torch.as_tensor(obs[None], dtype=torch.float32), None)[0].numpy()
        )
        steps, done = steps + 1, terminated or truncated
    frames = results[True][1]
    assert len(frames) == steps + 1 and frames[0].shape == (240, 320, 3)  # the reset's frame, then one per step
    assert len({f.tobytes() for f in frames}) > steps // 2  # the body moves: frames differ


def test_capture_video_writes_playable_mp4s_and_tensorboard_and_leaves_the_run_unchanged(tmp_path):
    _, plain_dir, plain = hopper_run(tmp_path, "plain")
    _, run_dir, summary = hopper_run(tmp_path, "video", "--capture-video")
    assert summary["history"] == plain["history"] and summary["mu_return"] == plain["mu_return"]
    videos = sorted(os.listdir(os.path.join(run_dir, "videos")))
    assert videos == ["mu_sampled.mp4", "update_0000020.mp4", "update_0000040.mp4"]
    assert not os.path.exists(os.path.join(plain_dir, "videos"))
    for name in videos:
        reader = imageio.get_reader(os.path.join(run_dir, "videos", name))
        meta, frames = reader.get_meta_data(), [frame for frame in reader]
        assert meta["size"] == (320, 240) and meta["fps"] == 125  # Hopper-v5's render_fps
        assert len(frames) >= 2 and frames[0].shape == (240, 320, 3) and frames[-1].std() > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir, size_guidance={"images": 0})
    acc.Reload()
    images = acc.Images("eval/video")
    assert [image.step for image in images] == [0, 20, 40]  # mu sampled, then every evaluation; the latest is shown
    assert images[-1].encoded_image_string[:6] == b"GIF89a" and (images[-1].width, images[-1].height) == (160, 120)


def test_without_a_renderer_the_run_says_so_in_one_line_and_goes_on(tmp_path):
    no_egl = {"MUJOCO_GL": "egl", "__EGL_VENDOR_LIBRARY_FILENAMES": "/no/such/egl_vendor.json"}  # libglvnd: no driver
    result, run_dir, summary = hopper_run(tmp_path, "norender", "--capture-video", env=no_egl)
    notes = [line for line in result.stderr.splitlines() if "--capture-video" in line]
    assert len(notes) == 1 and "no videos" in notes[0] and "MUJOCO_GL" in notes[0] and "Traceback" not in result.stderr
    assert not os.path.exists(os.path.join(run_dir, "videos")) and len(summary["history"]) == 2


# ----- the cost estimate, the CPU preset, the MFU ----------------------------------------------------------------
def test_the_estimate_is_within_a_factor_of_2_of_the_measured_rate_and_mfu_is_logged(tmp_path):
    flags = ("--total-updates", "300", "--log-every", "50", "--eval-every", "300")
    result, run_dir, _ = hopper_run(tmp_path, "estimate", *flags)
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("estimate on cpu")]
    assert "mu 50 updates" in line and "EMaQ 300 updates" in line and "evaluations" in line
    tags = tensorboard_tags(run_dir)
    (estimated,), measured = tags["charts/estimated_SPS"], np.mean(tags["charts/SPS"])
    assert 0.5 < estimated / measured < 2, (estimated, measured)
    # MFU = updates/s x FLOPs per update / the measured peak, in percent, at every log beside SPS
    assert len(tags["charts/mfu"]) == len(tags["charts/SPS"]) and all(0 < v < 100 for v in tags["charts/mfu"])
    (mfu_line,) = [line for line in result.stderr.splitlines() if line.startswith("MFU:")]
    peak = float(mfu_line.split("peak ")[1].split(" TFLOP/s")[0]) * 1e12
    flops = float(mfu_line.split("MFU: ")[1].split(" GFLOP")[0]) * 1e9
    ratios = np.array(tags["charts/mfu"]) / (100 * np.array(tags["charts/SPS"]) * flops / peak)
    np.testing.assert_allclose(ratios, 1, rtol=0.02)  # the printed values are rounded


def test_a_paper_size_run_on_a_cpu_names_the_cpu_preset(tmp_path):
    """The defaults are the paper's full run (days on a CPU): the estimate says so and names --preset cpu. The
    estimate alone is timed here, on the paper's sizes; it leaves the run's random stream where it was."""
    args = eo.Args(dataset_id=DATASET, runs_dir=str(tmp_path))
    args = eo.check_args(args, torch.device("cpu"))
    dataset = eo.load_minari_dataset(DATASET, 0)  # generated on first use
    data = eo.episodes_to_transitions(dataset, args.gamma)
    data = {key: torch.as_tensor(value) for key, value in data.items()}
    obs_dim, act_dim = data["obs"].shape[1], data["actions"].shape[1]
    low, high = eo.dataset_action_bounds(dataset, DATASET)
    mu = BehaviorModel.from_preset(args.preset, obs_dim, low, high)
    q = eo.QEnsemble(obs_dim, act_dim, args.num_qs, args.q_hidden, args.q_layers)
    envs = eo.make_eval_envs(dataset, args.eval_episodes)
    run = dict(phase="behavior", step=0)
    state = torch.get_rng_state()
    line, rate = eo.estimate_run_time(
        args, torch.device("cpu"), run, data, mu, q, q, envs, dataset.observation_space, lambda o: o
    )
    eo.peak_flops(torch.device("cpu"), args.precision)
    assert torch.equal(torch.get_rng_state(), state)  # the run's random stream is where it was
    assert "mu 300,000 updates" in line and "EMaQ 1,000,000 updates" in line and "--preset cpu" in line
    assert 1_000_000 / rate > 3 * 3600  # hours, as the line says


def test_the_cpu_preset_sets_its_values_and_flags_given_win():
    args = eo.check_args(eo.Args(preset="cpu"), torch.device("cpu"))
    assert (args.batch_size, args.num_qs, args.q_hidden, args.q_layers) == (256, 4, 256, 3)
    assert (args.num_samples, args.q_lr, args.ema) == (5, 3e-4, 0.98)
    assert (args.behavior_updates, args.total_updates) == (20_000, 30_000)
    assert MU_PRESETS["cpu"] == MU_PRESETS["table3"]  # Table 3's mu
    args = eo.check_args(eo.Args(preset="cpu", num_samples=10, ema=0.9, num_qs=2), torch.device("cpu"))
    assert (args.num_samples, args.ema, args.num_qs, args.q_lr) == (10, 0.9, 2, 3e-4)
    paper = eo.check_args(eo.Args(dataset_id="mujoco/halfcheetah/medium-v0"), torch.device("cpu"))
    assert (paper.num_samples, paper.q_lr, paper.ema, paper.num_qs, paper.q_hidden) == (10, 1e-4, 0.995, 8, 750)


def test_update_flops_are_counted_as_the_benchmark_counts_them():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import bench_update

    mu = BehaviorModel.from_preset("mujoco", bench_update.OBS, [-1] * bench_update.ACT, [1] * bench_update.ACT)
    for n in (1, 10, 50):
        args = eo.Args(num_samples=n, batch_size=bench_update.B, num_qs=bench_update.K, q_hidden=bench_update.H)
        args.q_layers = bench_update.LAYERS
        assert eo.update_flops(args, mu, bench_update.OBS, bench_update.ACT) == bench_update.update_flops(n)
        assert eon.update_flops(args, mu, bench_update.OBS, bench_update.ACT) == bench_update.update_flops(n)
    # mu's part, counted by hand for the VAE: decoder state part per state, latent + hidden + output per sample
    vae = VAEBehaviorModel(17, [-1] * 6, [1] * 6)
    assert vae.sample_flops(3, 4) == 2 * 3 * (17 * 1024 + 4 * (12 * 1024 + 2 * 1024**2 + 1024 * 6))


def test_the_online_script_records_videos_estimates_its_cost_and_logs_mfu(tmp_path):
    from test_online import ONLINE_TINY

    result = run_script("emaq_online.py", *ONLINE_TINY, "--runs-dir", str(tmp_path), "--capture-video")
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = glob.glob(os.path.join(str(tmp_path), "*"))
    assert sorted(os.listdir(os.path.join(run_dir, "videos"))) == ["step_00000200.mp4", "step_00000400.mp4"]
    for name in os.listdir(os.path.join(run_dir, "videos")):
        reader = imageio.get_reader(os.path.join(run_dir, "videos", name))
        assert reader.get_meta_data()["size"] == (320, 240) and reader.count_frames() >= 2
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("estimate on cpu")]
    assert "250 updates" in line and "2 evaluations" in line  # updates from max(--learning-starts, batch) on
    tags = tensorboard_tags(run_dir)
    assert len(tags["charts/mfu"]) == len(tags["charts/SPS"]) > 0 and all(0 < v < 100 for v in tags["charts/mfu"])
    assert len(tags["charts/estimated_SPS"]) == 1
