"""tools/export_replay.py: an online run's replay buffer becomes a Minari dataset that emaq_offline.py trains on."""

import dataclasses
import json
import os

import minari
import numpy as np
import pytest
import torch
from conftest import TINY, run_script
from test_offline import assert_clean_failure
from test_online import ONLINE_TINY, only_run

import emaq_online as eon
from tools import export_replay


def test_the_replay_buffer_round_trips_into_offline_training(tmp_path):
    """Two environments: each one's transitions become its episodes, in order, cut at every ending; the episode still
    running at the end of the run ends truncated. emaq_offline.py then trains on the dataset."""
    flags = ("--num-envs", "2", "--total-timesteps", "200", "--runs-dir", str(tmp_path / "online"))  # 51 updates
    online = run_script("emaq_online.py", *ONLINE_TINY, *flags)
    assert online.returncode == 0, online.stderr[-3000:]
    run_dir = only_run(tmp_path / "online")
    exported = run_script("tools/export_replay.py", run_dir, "--dataset-id", "online/pendulum-v0")
    assert exported.returncode == 0, exported.stderr[-3000:]
    dataset = minari.load_dataset("online/pendulum-v0")
    assert dataset.total_steps == 200 and dataset.env_spec.id == "InvertedPendulum-v5"
    assert f"online/pendulum-v0: 200 transitions in {dataset.total_episodes} episodes" in exported.stdout
    buf = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)["buffer"]
    episodes, rows = list(dataset.iterate_episodes()), []
    for env in range(2):  # the dataset lists environment 0's episodes, then environment 1's, each in time order
        rows += torch.nonzero(buf["env"][: buf["size"]] == env).flatten().tolist()
    start = 0
    for episode in episodes:
        steps = rows[start : start + len(episode.actions)]
        assert len(episode.observations) == len(episode.actions) + 1
        np.testing.assert_array_equal(episode.observations[:-1], buf["obs"][steps].numpy())
        np.testing.assert_array_equal(episode.observations[1:], buf["next_obs"][steps].numpy())
        np.testing.assert_array_equal(episode.actions, buf["actions"][steps].numpy())
        assert episode.terminations[-1] != episode.truncations[-1]  # every episode ends, one way
        assert not (episode.terminations[:-1].any() or episode.truncations[:-1].any())
        start += len(steps)
    assert start == 200 and any(e.terminations[-1] for e in episodes) and any(e.truncations[-1] for e in episodes)
    offline = run_script(
        "emaq_offline.py", "--dataset-id", "online/pendulum-v0", "--runs-dir", str(tmp_path / "offline"), *TINY
    )
    assert offline.returncode == 0, offline.stderr[-3000:]
    assert "online/pendulum-v0 | mu " in offline.stdout
    assert_clean_failure(
        run_script("tools/export_replay.py", run_dir, "--dataset-id", "online/pendulum-v0"), "already exists"
    )


def test_bad_input_gets_one_clear_line(tmp_path, capsys):
    run_dir = tmp_path / "run"  # a run of emaq_online.py without a checkpoint yet
    run_dir.mkdir()
    json.dump(dataclasses.asdict(eon.Args(env_id="InvertedPendulum-v5")), open(run_dir / "config.json", "w"))
    for run, dataset_id, words in [
        (tmp_path / "nothing", "online/a-v0", ["is not a run directory of emaq_online.py"]),
        (run_dir, "no version", ["'no version' is not a Minari id"]),
        (run_dir, "online/a-v0", ["has no checkpoint.pt yet"]),
    ]:
        with pytest.raises(SystemExit) as exit_:
            export_replay.main(export_replay.Args(str(run), dataset_id))
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert exit_.value.code == 2 and len(errors) == 1 and all(word in errors[0] for word in words), errors


# ----- tools/estimate_online_cost.py ---------------------------------------------------------------------------------
def test_the_online_cost_line_adds_its_timed_parts(monkeypatch):
    """The line's arithmetic, from fixed rates of the four timed parts; that it names --preset cpu beyond 3 hours."""
    from tools import estimate_online_cost

    rates = dict(random_step=1000.0, explore_step=100.0, update=50.0, eval_step=20.0)  # calls per second
    monkeypatch.setattr(estimate_online_cost, "timed_rate", lambda step, device: rates[step.__name__])
    args = eon.check_args(eon.cli("--preset cpu --env-id Hopper-v5".split()), torch.device("cpu"))
    line = estimate_online_cost.estimate(args, torch.device("cpu"))
    # 5,000 steps / 1000/s; 95,000 x (10 + 20 ms); 20 evaluations x 1000 steps / 20/s; 5 + 2850 + 1000 s = 1.1 h
    assert line == (
        "estimate on cpu (fp32): 5,000 random steps 5 s, 95,000 steps with an update each 47.5 min (33.3 steps/s: "
        "update 20.0 ms, exploration 10.0 ms), 20 evaluations up to 16.7 min: 1.1 h"
    )
    args = eon.check_args(eon.cli("--env-id Hopper-v5 --precision fp32".split()), torch.device("cpu"))
    line = estimate_online_cost.estimate(args, torch.device("cpu"))  # Appendix F's 1M steps: 8 h at these rates
    assert "990,000 steps with an update each" in line and line.endswith(
        "on a CPU try --preset cpu (not the paper's configuration: docs/online.md)"
    )


# ----- tools/evaluate_online_run.py -----------------------------------------------------------------------------------
def test_re_evaluation_at_the_runs_own_n_reproduces_its_last_evaluation(tmp_path, capsys):
    """No update after the last evaluation (learning starts after the run's end): the same models, the same seeded
    episodes, the same return; N = 1 (mu alone) is evaluated beside it."""
    from tools import evaluate_online_run

    flags = ("--learning-starts", "500", "--total-timesteps", "400", "--runs-dir", str(tmp_path))
    assert run_script("emaq_online.py", *ONLINE_TINY, *flags).returncode == 0
    run_dir = only_run(tmp_path)
    history = json.load(open(os.path.join(run_dir, "summary.json")))["history"]
    returns = evaluate_online_run.main(evaluate_online_run.Args(run_dir, ns=(8, 1), episodes=2, cuda=False))
    assert returns[8] == history[-1][1] and set(returns) == {1, 8}
    assert "step 400: N = 1: return" in capsys.readouterr().out
