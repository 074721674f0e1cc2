"""The online comparison's two benchmark pieces: CleanRL's SAC on Gymnasium 1.x (benchmarks/cleanrl_sac.py) and the
table made from both algorithms' TensorBoard events (benchmarks/online_study.py)."""

import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

from benchmarks import online_study
from benchmarks.cleanrl_sac import SameStepVectorEnv


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


def test_the_table_averages_each_seeds_last_window_then_the_seeds(tmp_path, capsys):
    for algo, seed, offset in [("emaq", 1, 0.0), ("emaq", 2, 100.0), ("sac", 1, 10.0), ("sac", 2, 30.0)]:
        writer = SummaryWriter(str(tmp_path / algo / f"run{seed}"))
        for step, value in [(24_000, 1.0), (25_000, 3.0), (26_000, 50.0), (20_000, 7.0)]:  # window (20k, 25k]
            writer.add_scalar("charts/episodic_return", value + offset, step)
        if algo == "emaq":
            writer.add_scalar("eval/episodic_return", 200.0 + offset, 25_000)
            for step, nll in [(24_000, 5.0 + seed), (25_000, 3.0 + seed), (26_000, 99.0)]:  # the last one at 25k
                writer.add_scalar("losses/behavior_nll", nll, step)
        writer.close()
    args = online_study.Args(str(tmp_path / "emaq"), str(tmp_path / "sac"), str(tmp_path / "out"), steps=(25_000,))
    online_study.main(args)
    row = capsys.readouterr().out.strip().splitlines()[-1]
    # SAC: seeds 12 and 32 -> 22 ± 10; EMaQ: 2 and 102 -> 52 ± 50; its evaluation: 200, 300 -> 250 ± 50; NLL 4, 5
    assert row == "| 25,000 | 22 ± 10 | 52 ± 50 | 250 ± 50 | 4.5 ± 0.5 |"
    assert (tmp_path / "out" / "curves.png").stat().st_size > 0


def test_a_seed_that_stopped_before_the_step_is_left_out_and_the_row_says_so(tmp_path, capsys):
    for algo, seed, last_step in [("emaq", 1, 25_000), ("sac", 1, 25_000), ("sac", 2, 21_000)]:
        writer = SummaryWriter(str(tmp_path / algo / f"run{seed}"))
        for step in range(20_500, last_step + 1, 500):  # the second SAC seed stopped at 21k, inside the window
            writer.add_scalar("charts/episodic_return", 10.0 * seed, step)
        if algo == "emaq":
            writer.add_scalar("eval/episodic_return", 200.0, 25_000)
            writer.add_scalar("losses/behavior_nll", 5.0, 25_000)
        writer.close()
    args = online_study.Args(str(tmp_path / "emaq"), str(tmp_path / "sac"), str(tmp_path / "out"), steps=(25_000,))
    online_study.main(args)
    row = capsys.readouterr().out.strip().splitlines()[-1]
    assert row == "| 25,000 | 10 ± 0 (1 of 2 seeds) | 10 ± 0 | 200 ± 0 | 5.0 ± 0.0 |"
