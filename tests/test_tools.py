"""The scripts of tools/ on a real finished run: re-evaluation (+ video), Delta(s, N), Q's diagnostics, the cost
estimate and MFU, random-dataset generation, and the one-line refusal of a folder that is not a finished run."""

import dataclasses
import glob
import json
import os
import re
import shutil
import sys
from types import SimpleNamespace

import imageio.v2 as imageio
import minari
import numpy as np
import pytest
import torch
from conftest import ROOT, run_script

import emaq_offline as eo
from behavior_model import BehaviorModel, VAEBehaviorModel
from tools import diagnose_q, estimate_cost, evaluate_run, make_random_dataset

DATASET = "emaq/Hopper-v5/random_2000-v0"  # random Hopper episodes end within tens of steps: short evaluations
FLAGS = "--preset table3 --behavior-updates 50 --total-updates 200 --eval-every 100 --eval-episodes 2 --log-every 50"
FLAGS = [*FLAGS.split(), *"--num-qs 2 --q-hidden 32 --q-layers 2 --batch-size 32 --num-samples 4".split()]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # the tests share 2 cores: two threads per process would only contend


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """In-process evaluations use the thread count of the run's process: the same kernels, the same floats."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished run of emaq_offline.py, made once for this file."""
    runs = str(tmp_path_factory.mktemp("runs"))
    result = run_script("emaq_offline.py", "--dataset-id", DATASET, "--runs-dir", runs, *FLAGS, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = glob.glob(os.path.join(runs, "*"))
    return path


def tensorboard_scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir)
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def assert_one_error_line(result, *words):
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and all(w in last for w in words), last


# ----- a folder that is not a finished run -------------------------------------------------------------------------
def unfinished_copy(run_dir, tmp_path):
    """The run with its checkpoint set back to the middle of EMaQ training."""
    copy = shutil.copytree(run_dir, tmp_path / "unfinished")
    ckpt = torch.load(copy / "checkpoint.pt", weights_only=True)
    torch.save(ckpt | {"phase": "emaq", "step": 100}, copy / "checkpoint.pt")
    return str(copy)


@pytest.mark.parametrize(
    "tool, folder, words",
    [
        ("evaluate_run", "empty", ["is not a run directory", "pass runs/<run name>"]),
        ("delta_curve", "unfinished", ["has not finished (emaq update 100)", "--resume"]),
        ("diagnose_q", "no_checkpoint", ["has no checkpoint.pt"]),
    ],
)
def test_the_run_tools_refuse_a_folder_that_is_not_a_finished_run(run_dir, tmp_path, tool, folder, words):
    path = str(tmp_path / folder)
    if folder == "unfinished":
        path = unfinished_copy(run_dir, tmp_path)
    elif folder == "no_checkpoint":
        shutil.copytree(run_dir, path, ignore=shutil.ignore_patterns("checkpoint.*"))
    else:
        os.makedirs(path)
    assert_one_error_line(run_script(f"tools/{tool}.py", path, env=ONE_THREAD), *words)


# ----- tools/make_random_dataset.py --------------------------------------------------------------------------------
def test_make_random_dataset_writes_the_id_the_offline_script_reads(capsys):
    result = run_script("tools/make_random_dataset.py", "Hopper-v5", "--steps", "300")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("emaq/Hopper-v5/random_300-v0: 300 steps")
    dataset = minari.load_dataset("emaq/Hopper-v5/random_300-v0")
    assert dataset.total_steps == 300 and dataset.storage.metadata["ref_max_score"] == 3234.3  # D4RL's expert
    assert dataset.storage.metadata["ref_min_score"] < 100  # the random policy's average return
    assert make_random_dataset.dataset_id_for("Walker2d-v5", 1_000_000) == "emaq/Walker2d-v5/random-v0"
    with pytest.raises(SystemExit) as exit_info:
        make_random_dataset.main(make_random_dataset.Args("NoSuchEnv-v5", steps=10))
    assert exit_info.value.code == 2 and capsys.readouterr().err.startswith("error: cannot generate")
    assert "emaq/NoSuchEnv-v5/random_10-v0" not in minari.list_local_datasets()


# ----- tools/evaluate_run.py ---------------------------------------------------------------------------------------
def first_episode_length(run_dir, episodes, seed) -> int:
    """Steps of the first environment's episode in the evaluation evaluate_run makes, counted here step by step."""
    config, _, mu, q_ensemble, normalize = evaluate_run.load_run(run_dir)
    dataset = minari.load_dataset(config.dataset_id)
    envs, generator = eo.make_eval_envs(dataset, episodes), torch.Generator().manual_seed(seed)
    obs, steps, done = envs.reset(seed=seed)[0], 0, False
    while not done:
        obs = normalize(torch.as_tensor(eo.flatten_obs(dataset.observation_space, obs)))
        action = eo.test_time_policy(mu, q_ensemble, obs, config.num_samples, config.test_ensemble_lambda, generator)
        obs, _, terminated, truncated, _ = envs.step(action.numpy())
        steps, done = steps + 1, terminated[0] or truncated[0]
    return steps


def test_evaluate_run_gives_the_runs_last_evaluation_with_and_without_video(run_dir):
    ckpt, config = torch.load(f"{run_dir}/checkpoint.pt", weights_only=True), eo.read_config(run_dir)
    args = evaluate_run.Args(run_dir, episodes=config.eval_episodes, seed=config.eval_seed, cuda=False)
    returns = evaluate_run.main(args)
    assert returns.tolist() == ckpt["last_returns"]  # the evaluation is deterministic: exactly the run's
    with_video = evaluate_run.main(evaluate_run.Args(**{**vars(args), "capture_video": True}))
    np.testing.assert_array_equal(with_video, returns)  # rendering reads the simulation, never changes it
    assert os.listdir(os.path.join(run_dir, "videos")) == [f"eval_{ckpt['step']}.mp4"]
    reader = imageio.get_reader(os.path.join(run_dir, "videos", f"eval_{ckpt['step']}.mp4"))
    frames, meta = [frame for frame in reader], reader.get_meta_data()
    assert meta["size"] == (320, 240) and meta["fps"] == 125  # Hopper-v5's render_fps
    assert len(frames) == first_episode_length(run_dir, config.eval_episodes, config.eval_seed) + 1  # reset + steps
    assert frames[0].shape == (240, 320, 3) and len({f.tobytes() for f in frames}) > len(frames) // 2  # it moves


def test_evaluate_run_gives_the_runs_behavior_cloning_baselines(run_dir):
    """--policy mu and mu-greedy: mu alone, as the run evaluated it before EMaQ (its last evaluation's episodes)."""
    ckpt, config = torch.load(f"{run_dir}/checkpoint.pt", weights_only=True), eo.read_config(run_dir)
    for policy, key in (("mu", "returns"), ("mu-greedy", "greedy_returns")):
        args = evaluate_run.Args(run_dir, episodes=config.final_eval_episodes or config.eval_episodes, policy=policy)
        assert evaluate_run.main(args).tolist() == ckpt["mu_eval"][key], policy
    assert ckpt["mu_eval"]["returns"] != ckpt["mu_eval"]["greedy_returns"]


def test_evaluate_run_without_a_renderer_says_so_in_one_line_and_goes_on(run_dir, tmp_path):
    copy = shutil.copytree(run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("videos"))
    no_egl = {"MUJOCO_GL": "egl", "__EGL_VENDOR_LIBRARY_FILENAMES": "/no/such/egl_vendor.json", **ONE_THREAD}
    result = run_script("tools/evaluate_run.py", str(copy), "--episodes", "2", "--capture-video", env=no_egl)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    notes = [line for line in result.stderr.splitlines() if "--capture-video" in line]
    assert len(notes) == 1 and notes[0].startswith("note: ") and "MUJOCO_GL" in notes[0]
    assert "return" in result.stdout and "over 2 episodes" in result.stdout and not os.path.exists(copy / "videos")


# ----- tools/delta_curve.py ----------------------------------------------------------------------------------------
def test_delta_curve_writes_its_csv_png_and_tensorboard_tags(run_dir):
    flags = ("--ns", "1", "4", "16", "--support-samples", "256", "--states", "16", "--no-cuda")
    result = run_script("tools/delta_curve.py", run_dir, *flags, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Delta(s, N) mean over 18 states: N=1:" in result.stdout  # 16 dataset states + 2 initial states
    curve = np.loadtxt(os.path.join(run_dir, "delta_curve.csv"), delimiter=",", skiprows=1)
    assert curve[:, 0].tolist() == [1, 4, 16] and (curve[:, 1:] >= -1e-5).all()  # Delta >= 0 up to float error
    assert (curve[:, 2] <= curve[:, 1] + 1e-6).all() and (curve[:, 1] <= curve[:, 3] + 1e-6).all()  # p10 <= mean <= p90
    assert (np.diff(curve[:, 1]) < 0).all()  # more samples get closer to the best action in mu's support
    assert [step for step, _ in tensorboard_scalars(run_dir, "delta/mean")] == [1, 4, 16]
    assert os.path.getsize(os.path.join(run_dir, "delta_curve.png")) > 1000


# ----- tools/diagnose_q.py -----------------------------------------------------------------------------------------
def test_q_diagnostics_measure_ranking_signal_noise_and_bounds():
    torch.manual_seed(0)
    mu = BehaviorModel(3, [-1, -2], [1, 2], state_hidden=16, embed_dim=16, head_hidden=16, head_layers=1, num_bins=8)
    q = eo.QEnsemble(3, 2, 4, hidden=16, layers=2)
    obs, actions = torch.randn(64, 3), torch.tensor([[1.0, 0.0], [0.0, 0.0], [-0.99, -1.91], [0.5, 1.0]]).repeat(16, 1)
    q_data = eo.ensemble(q(obs, actions.unsqueeze(1)), 0.5).squeeze(-1)
    stats = diagnose_q.q_diagnostics(mu, q, obs, actions, 3 * q_data + 2, 6, 0.5, torch.Generator().manual_seed(1))
    assert stats["q_return_to_go_corr"] == pytest.approx(1.0, abs=1e-5)  # a Q that ranks like the return-to-go
    assert stats["q_minus_return_to_go"] == pytest.approx((q_data - 3 * q_data - 2).mean().item(), rel=1e-5)
    assert stats["data_at_bounds"] == pytest.approx(3 / 8)  # 1.0, -0.99 and -1.91 lie within 2.5% of a bound
    candidates = mu.sample(obs, 6, generator=torch.Generator().manual_seed(1))
    chosen = eo.test_time_policy(mu, q, obs, 6, 0.5, torch.Generator().manual_seed(1))

    def at_bounds(a):  # within 2.5% of the range from either bound
        return (torch.minimum(a - mu.low, mu.high - a) <= 0.025 * (mu.high - mu.low)).float().mean().item()

    assert stats["mu_at_bounds"] == pytest.approx(at_bounds(candidates))
    assert stats["chosen_at_bounds"] == pytest.approx(at_bounds(chosen))
    values = q(obs, candidates)
    assert stats["ensemble_std"] == pytest.approx(values.std(0).mean().item(), rel=1e-5)
    assert stats["candidate_spread"] == pytest.approx(eo.ensemble(values, 0.5).std(-1).mean().item(), rel=1e-5)
    with torch.no_grad():  # identical members: no disagreement, the spread over candidates remains
        for p in q.parameters():
            p.copy_(p[:1].expand_as(p))
    same = diagnose_q.q_diagnostics(mu, q, obs, actions, q_data, 6, 0.5, torch.Generator().manual_seed(1))
    assert same["ensemble_std"] == 0 and same["candidate_spread"] > 0


def test_returns_to_go_are_discounted_per_episode_and_exact_only_where_the_tail_is_known():
    episodes = [  # one terminated episode, one cut by the time limit
        SimpleNamespace(rewards=[1.0, 2.0, 4.0], terminations=[False, False, True]),
        SimpleNamespace(rewards=[1.0] * 8, terminations=[False] * 8),
    ]
    rtg, known = diagnose_q.returns_to_go(SimpleNamespace(iterate_episodes=lambda: iter(episodes)), gamma=0.5)
    np.testing.assert_allclose(rtg[:3], [1 + 0.5 * 2 + 0.25 * 4, 2 + 0.5 * 4, 4])
    np.testing.assert_allclose(rtg[3:], [2 - 0.5 ** (8 - t - 1) for t in range(8)])  # 1 + 1/2 + ... (8 - t terms)
    assert known.tolist() == [True] * 3 + [True] * 2 + [False] * 6  # 0.5^(steps left) < 0.01: 7 or more left


def test_diagnose_q_reports_a_run_and_its_n_1_evaluation_is_mu_alone(run_dir, tmp_path, capsys):
    ckpt, config = torch.load(f"{run_dir}/checkpoint.pt", weights_only=True), eo.read_config(run_dir)
    args = diagnose_q.Args((run_dir,), states=300, ns=(1, 4), episodes=config.eval_episodes, seed=config.eval_seed)
    (report,) = diagnose_q.main(dataclasses.replace(args, json=str(tmp_path / "all.json")))
    assert json.load(open(os.path.join(run_dir, "q_diagnostics.json")))["diagnostics"] == report["diagnostics"]
    assert [r["run_dir"] for r in json.load(open(tmp_path / "all.json"))] == [run_dir]
    assert report["states"] == 300 and set(report["diagnostics"]) == set(diagnose_q.MEANING)
    assert -1 <= report["diagnostics"]["q_return_to_go_corr"] <= 1 and report["diagnostics"]["ensemble_std"] > 0
    assert [row[0] for row in report["selection_gain"]] == [1, 2, 4, 5, 10, 25] and report["selection_gain"][0][1] == 0
    n_1, n_4 = report["evaluations"]
    assert (n_1["test_n"], n_4["test_n"]) == (1, 4)
    assert n_1["returns"] == ckpt["mu_eval"]["returns"]  # N = 1 is mu itself: the run's evaluation of mu, exactly
    printed = capsys.readouterr().out
    assert "q_return_to_go_corr" in printed and "held-out gain" in printed and "test N   4" in printed


# ----- tools/estimate_cost.py --------------------------------------------------------------------------------------
def test_update_flops_are_counted_as_the_benchmark_counts_them():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import bench_update

    mu = BehaviorModel.from_preset("mujoco", bench_update.OBS, [-1] * bench_update.ACT, [1] * bench_update.ACT)
    for n in (1, 10, 50):
        args = eo.Args(num_samples=n, batch_size=bench_update.B, num_qs=bench_update.K, q_hidden=bench_update.H)
        args.q_layers = bench_update.LAYERS
        flops = estimate_cost.update_flops(args, mu, bench_update.OBS, bench_update.ACT)
        assert flops == bench_update.update_flops(n)
    # mu's part, counted by hand for the VAE: decoder state part per state, latent + hidden + output per sample
    vae = VAEBehaviorModel(17, [-1] * 6, [1] * 6)
    assert estimate_cost.sample_flops(vae, 3, 4) == 2 * 3 * (17 * 1024 + 4 * (12 * 1024 + 2 * 1024**2 + 1024 * 6))


def test_the_estimate_names_what_it_times_and_its_mfu_is_rate_times_flops_over_peak(run_dir, tmp_path):
    """What the estimate line says and how the MFU is made of its parts. How close the estimate comes to a real run's
    rate is a speed question: benchmarks/ measure that, never a unit test on a shared machine."""
    flags = [*FLAGS, "--behavior-path", f"{run_dir}/mu.pt", "--behavior-updates", "0", "--total-updates", "300"]
    flags += ["--eval-every", "300", "--dataset-id", DATASET, "--runs-dir", str(tmp_path)]
    result = run_script("tools/estimate_cost.py", *flags, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    line, mfu_line = result.stdout.strip().splitlines()
    assert line.startswith("estimate on cpu (fp32): EMaQ 300 updates") and "--preset cpu" not in line
    assert "3 evaluations" in line  # mu sampled and greedy, then EMaQ's one
    numbers = r"MFU ([\d.]+)%: ([\d.]+) upd/s x ([\d.]+) GFLOP per Q update / peak ([\d.]+) TFLOP/s \(measured: .*\)"
    mfu, rate, gflop, peak = (float(x) for x in re.fullmatch(numbers, mfu_line).groups())
    assert mfu > 0 and mfu == pytest.approx(100 * rate * gflop / (peak * 1e3), rel=0.05)  # rounded values
    assert not glob.glob(os.path.join(tmp_path, "*"))  # the estimate trains nothing and writes no run


def test_a_paper_size_run_on_a_cpu_names_the_cpu_preset():
    """The defaults are the paper's full run (days on a CPU): the estimate says so and names --preset cpu."""
    result = run_script("tools/estimate_cost.py", "--dataset-id", DATASET, "--no-cuda", env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    line = result.stdout.splitlines()[0]
    assert "mu 300,000 updates" in line and "EMaQ 1,000,000 updates" in line and "on a CPU try --preset cpu" in line
