"""The online comparison's benchmark pieces: CleanRL's SAC on Gymnasium 1.x with its deterministic policy evaluated
under emaq_online.py's protocol (benchmarks/cleanrl_sac.py), the per-run CSVs made from both algorithms' runs, and the
tables and plots made from those CSVs alone (benchmarks/online_study.py)."""

import csv
import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from conftest import run_script
from test_online import ONLINE_TINY, only_run
from torch import nn
from torch.utils.tensorboard import SummaryWriter

import emaq_online as eon
from benchmarks import online_study
from benchmarks.cleanrl_sac import SameStepVectorEnv, evaluate_deterministic


def test_the_sac_runner_reports_ended_episodes_as_gymnasium_029_did():
    """Same step reset, `final_observation` for the ended sub-env, `final_info` a list with its episode statistics."""
    import gymnasium as gym

    def make(seed):
        return lambda: gym.wrappers.RecordEpisodeStatistics(gym.make("Hopper-v5"))

    envs = SameStepVectorEnv([make(0), make(1)])
    envs.action_space.seed(0)
    envs.reset(seed=0)
    returns, ended_seen = np.zeros(2), 0
    for _ in range(300):
        next_obs, rewards, terminated, truncated, infos = envs.step(envs.action_space.sample())
        returns += rewards
        ended = terminated | truncated
        if ended.any():
            assert [info is not None for info in infos["final_info"]] == ended.tolist()
            for i in np.nonzero(ended)[0]:
                assert infos["final_info"][i]["episode"]["r"] == pytest.approx(returns[i])
                assert not np.array_equal(infos["final_observation"][i], next_obs[i])  # next_obs: the reset one
                returns[i], ended_seen = 0.0, ended_seen + 1
        else:
            assert "final_info" not in infos and "final_observation" not in infos
    assert ended_seen >= 2
    envs.close()


class TanhMeanActor(nn.Module):
    """The interface of CleanRL's SAC actor that the evaluation reads: forward -> (mean, log_std), the action bounds."""

    def __init__(self, obs_dim, act_dim, low, high):
        super().__init__()
        self.fc_mean = nn.Linear(obs_dim, act_dim)
        self.register_buffer("action_scale", torch.as_tensor((high - low) / 2, dtype=torch.float32))
        self.register_buffer("action_bias", torch.as_tensor((high + low) / 2, dtype=torch.float32))

    def forward(self, x):
        mean = self.fc_mean(x)
        return mean, torch.zeros_like(mean)


def test_sacs_evaluation_is_its_deterministic_policy_on_emaqs_episodes_and_draws_no_random_number():
    """The same returns as emaq_online.evaluate with the policy tanh(mean) scaled (so: the same seeded episodes), and
    torch's generator untouched (SAC's training draws the same numbers with and without evaluations)."""
    torch.manual_seed(0)
    envs = eon.make_envs("Hopper-v5", 3)
    space = envs.single_action_space
    actor = TanhMeanActor(envs.single_observation_space.shape[0], space.shape[0], space.low, space.high)
    rng = torch.get_rng_state()
    returns = evaluate_deterministic(actor, "Hopper-v5", episodes=3, seed=7)
    assert torch.equal(torch.get_rng_state(), rng)

    def policy(obs, generator):
        return torch.tanh(actor(obs)[0]) * actor.action_scale + actor.action_bias

    with torch.no_grad():
        expected = eon.evaluate(policy, envs, envs.single_observation_space, lambda o: o, 7, torch.device("cpu"))
    np.testing.assert_array_equal(returns, expected)
    assert len(set(returns.round(6))) == 3  # three different episodes
    envs.close()


def write_events(run_dir, tags: dict):
    writer = SummaryWriter(str(run_dir))
    for tag, values in tags.items():
        for step, value in values.items():
            writer.add_scalar(tag, value, step)
    writer.close()


def test_export_writes_a_csv_per_run_with_the_final_evaluation(tmp_path):
    """SAC: synthetic events and its final_evaluation.json; EMaQ: a real tiny run, whose final evaluation is its
    test-time policy at the run's own N over the asked episodes (tools/evaluate_online_run.py gives the same)."""
    from tools import evaluate_online_run

    sac_run = tmp_path / "sac" / "InvertedPendulum-v5__sac_continuous_action__2__123"
    train, evals, q = {100: 5.0, 250: 7.0}, {200: 9.0, 400: 11.0}, {300: 1.5}
    write_events(sac_run, {"charts/episodic_return": train, "eval/episodic_return": evals, "losses/qf1_values": q})
    json.dump(dict(returns=[10.0, 20.0]), open(sac_run / "final_evaluation.json", "w"))
    assert run_script("emaq_online.py", *ONLINE_TINY, "--runs-dir", str(tmp_path / "emaq")).returncode == 0
    emaq_run = only_run(tmp_path / "emaq")
    args = online_study.Export(
        "InvertedPendulum-v5", str(tmp_path / "emaq"), str(tmp_path / "sac"), str(tmp_path / "out")
    )
    online_study.export(dataclasses.replace(args, final_eval_episodes=3))

    sac = list(csv.DictReader(open(tmp_path / "out" / "sac_seed2.csv")))
    assert tuple(sac[0]) == online_study.COLUMNS
    assert [(r["step"], r["training_return"], r["evaluation_return"], r["mean_q"]) for r in sac] == [
        ("100", "5.0", "", ""),
        ("200", "", "9.0", ""),
        ("250", "7.0", "", ""),
        ("300", "", "", "1.5"),
        ("400", "", "11.0", ""),
    ]
    assert [r["final_evaluation_return"] for r in sac] == ["", "", "", "", "15.0"]
    emaq = online_study.read_run(str(tmp_path / "out" / "emaq_seed1.csv"))
    history = json.load(open(os.path.join(emaq_run, "summary.json")))["history"]
    assert emaq["evaluation_return"] == pytest.approx({step: value for step, value in history})
    assert emaq["training_return"] and emaq["behavior_nll"] and emaq["mean_q"]
    again = evaluate_online_run.main(evaluate_online_run.Args(emaq_run, ns=(8,), episodes=3, cuda=False))
    assert emaq["final_evaluation_return"] == pytest.approx({400: again[8]})


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=online_study.COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def test_tables_are_built_from_the_csv_files_alone(tmp_path, capsys):
    """Per environment: evaluations at the step and training windows averaged per seed, then mean ± std over seeds;
    the IQM of the final evaluation per algorithm; the aggregate over environments on D4RL's normalized scale."""
    for env, offset in (("hopper", 0.0), ("halfcheetah", 1000.0)):
        folder = tmp_path / f"online_{env}"
        folder.mkdir()
        for algo, seed, shift in [("sac", 1, 0.0), ("sac", 2, 20.0), ("emaq", 1, 100.0), ("emaq", 2, 300.0)]:
            rows = [
                dict(step=20_000, training_return=7.0 + shift),  # outside the window (20k, 25k]
                dict(step=24_000, training_return=1.0 + shift, behavior_nll=5.0 + seed),
                dict(step=25_000, training_return=3.0 + shift, evaluation_return=200.0 + shift + offset),
                dict(step=25_000 + 1, training_return=99.0),  # after the step
            ]
            rows[-1]["final_evaluation_return"] = 1000.0 + shift + offset
            write_csv(folder / f"{algo}_seed{seed}.csv", rows)
    online_study.tables(online_study.Tables(str(tmp_path), steps=(25_000,), reps=200))
    hopper = (tmp_path / "online_hopper" / "results.md").read_text().splitlines()
    # evaluation: SAC 200, 220 -> 210 ± 10; EMaQ 300, 500 -> 400 ± 100; training: SAC 2, 22 -> 12 ± 10; EMaQ 102, 302
    assert "| 25,000 | 210 ± 10 | 400 ± 100 | 12 ± 10 | 202 ± 100 | 6.5 ± 0.5 |" in hopper
    assert any(
        line.startswith("| final evaluation, 50 episodes | 1010 [1000, 1020] | 1200 [1100, 1300] |") for line in hopper
    )
    assert (tmp_path / "online_hopper" / "curves.png").stat().st_size > 0
    summary = (tmp_path / "online_summary.md").read_text()
    assert "| HalfCheetah-v5 | 2010 [2000, 2020] | 2200 [2100, 2300] | 2, 2 |" in summary
    assert "| IQM [95% stratified bootstrap CI] |" in summary


def test_a_seed_that_stopped_before_the_step_is_left_out_and_the_row_says_so(tmp_path):
    folder = tmp_path / "online_hopper"
    folder.mkdir()
    for algo, seed, last_step in [("emaq", 1, 25_000), ("sac", 1, 25_000), ("sac", 2, 21_000)]:
        rows = [dict(step=s, training_return=10.0 * seed) for s in range(20_500, last_step + 1, 500)]
        rows[-1] |= dict(evaluation_return=200.0, behavior_nll=5.0) if algo == "emaq" else {}
        write_csv(folder / f"{algo}_seed{seed}.csv", rows)
    online_study.tables(online_study.Tables(str(tmp_path), steps=(25_000,), reps=200))
    lines = (folder / "results.md").read_text().splitlines()
    assert "| 25,000 | n/a | 200 ± 0 | 10 ± 0 (1 of 2 seeds) | 10 ± 0 | 5.0 ± 0.0 |" in lines
    assert "No aggregate over environments" in (tmp_path / "online_summary.md").read_text()


def test_an_environment_with_one_algorithms_runs_only_still_gets_its_table_and_plot(tmp_path):
    folder = tmp_path / "online_halfcheetah"
    folder.mkdir()
    rows = [dict(step=5_000, training_return=1.0, evaluation_return=2.0), dict(step=5_000 + 1, training_return=3.0)]
    rows[-1]["final_evaluation_return"] = 4.0
    write_csv(folder / "sac_seed1.csv", rows)
    online_study.tables(online_study.Tables(str(tmp_path), steps=(5_000,), reps=100))
    lines = (folder / "results.md").read_text().splitlines()
    assert "| 5,000 | 2 ± 0 | n/a | 1 ± 0 | n/a | n/a |" in lines
    assert any(line.startswith("| final evaluation, 50 episodes | 4 [4, 4] | n/a |") for line in lines)
    assert (folder / "curves.png").stat().st_size > 0


def test_export_without_runs_or_with_only_unfinished_runs_ends_with_one_error_line(tmp_path):
    """Unfinished runs (SAC without final_evaluation.json, EMaQ without summary.json) are named and skipped; with
    nothing finished, one error line."""
    command = ("benchmarks/online_study.py", "export", "--env-id", "Hopper-v5", "--out", str(tmp_path / "out"))
    empty = run_script(*command, "--emaq-dir", str(tmp_path / "a"), "--sac-dir", str(tmp_path / "b"))
    write_events(tmp_path / "sac" / "Hopper-v5__sac_continuous_action__1__9", {"eval/episodic_return": {5000: 1.0}})
    write_events(tmp_path / "emaq" / "Hopper-v5__emaq_online__1__9", {"eval/episodic_return": {5000: 2.0}})
    unfinished = run_script(*command, "--emaq-dir", str(tmp_path / "emaq"), "--sac-dir", str(tmp_path / "sac"))
    for result, words in ((empty, "no TensorBoard runs"), (unfinished, "no finished Hopper-v5 run")):
        assert result.returncode != 0 and "Traceback" not in result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith("error:") and words in result.stderr
    for end_file, algo in (("final_evaluation.json", "sac"), ("summary.json", "emaq")):
        assert f"__1__9 has not finished (no {end_file}): skipped" in unfinished.stdout, algo
    assert not os.listdir(tmp_path / "out")  # no CSV of an unfinished run
