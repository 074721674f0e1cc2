"""The paper's presets (Tables 2 and 3) and the pinned gymnasium-robotics stack behind the Table 3 domains."""

import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import run_script

import emaq_offline as eo
import emaq_online as eon
from behavior_model import PRESETS as MU_PRESETS
from behavior_model import action_bounds

# The environments behind Minari's D4RL kitchen, antmaze and adroit datasets.
TABLE3_ENVS = [
    "FrankaKitchen-v1",
    "AntMaze_UMaze-v4",
    "AntMaze_Medium_Diverse_GR-v4",
    "AntMaze_Large_Diverse_GR-v4",
    "AdroitHandDoor-v1",
    "AdroitHandHammer-v1",
    "AdroitHandPen-v1",
    "AdroitHandRelocate-v1",
]


@pytest.mark.parametrize("env_id", TABLE3_ENVS)
def test_table3_environments_construct_and_flatten(env_id):
    import gymnasium_robotics  # noqa: F401

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        env = gym.make(env_id)
        obs, _ = env.reset(seed=0)
        obs, *_ = env.step(env.action_space.sample())
    space = env.observation_space  # a batch of two, as a vector env returns it
    batched = gym.vector.utils.concatenate(space, [obs, obs], gym.vector.utils.create_empty_array(space, 2))
    flat = eo.flatten_obs(env.observation_space, batched)
    assert flat.shape == (2, gym.spaces.flatdim(env.observation_space)) and np.isfinite(flat).all()
    low, high = action_bounds(env.action_space)
    assert len(low) == env.action_space.shape[0]


@pytest.mark.parametrize(
    "dataset_id, preset",
    [
        ("mujoco/halfcheetah/medium-v0", "mujoco"),
        ("emaq/Hopper-v5/random-v0", "mujoco"),
        ("D4RL/kitchen/complete-v2", "table3"),
        ("D4RL/antmaze/umaze-v1", "table3"),
        ("D4RL/door/cloned-v2", "table3"),
        ("D4RL/pen/human-v2", "table3"),
    ],
)
def test_auto_preset_follows_the_paper(dataset_id, preset):
    args = eo.check_args(eo.cli(["--dataset-id", dataset_id]), torch.device("cpu"))
    assert args.preset == preset
    expected = {"mujoco": (256, 8, 750, 3), "table3": (128, 16, 256, 4)}[preset]  # Table 2 / Table 3
    assert (args.batch_size, args.num_qs, args.q_hidden, args.q_layers) == expected
    assert args.q_lr == 1e-4 and args.behavior_lr == 5e-4 and args.ema == 0.995 and args.ensemble_lambda == 1.0
    assert eo.cli(["--dataset-id", dataset_id, "--num-qs", "3"]).num_qs == 3  # a flag beats the preset


# Every Table 3 dataset of Minari's D4RL collection that the README lists, and the ids a substring match got wrong.
TABLE3_IDS = (
    [f"D4RL/kitchen/{name}-v2" for name in ("complete", "partial", "mixed")]
    + [
        f"D4RL/antmaze/{name}-v1"
        for name in ("umaze", "umaze-diverse", "medium-play", "medium-diverse", "large-play", "large-diverse")
    ]
    + [
        f"D4RL/{task}/{kind}-v2"
        for task in ("pen", "door", "hammer", "relocate")
        for kind in ("human", "cloned", "expert")
    ]
    + ["emaq/AdroitHandPen-v1/random-v0", "emaq/AntMaze_UMaze-v4/random_2000-v0", "emaq/FrankaKitchen-v1/random-v0"]
)
MUJOCO_IDS = [
    "mujoco/invertedpendulum/medium-v0",
    "mujoco/inverteddoublependulum/expert-v0",
    "D4RL/pointmaze/open-v2",
    "D4RL/pointmaze/open-dense-v2",
    "mujoco/hopper/expert-v0",
    "emaq/InvertedPendulum-v5/random-v0",
    "practice/walker2d/medium-v0",
    "mujoco/pusher/expert-v0",
]


@pytest.mark.parametrize("dataset_id", TABLE3_IDS + MUJOCO_IDS)
def test_auto_preset_reads_the_environment_part_of_the_id(dataset_id):
    expected = "table3" if dataset_id in TABLE3_IDS else "mujoco"
    assert eo.preset_for(dataset_id) == expected
    assert eo.cli(["--dataset-id", dataset_id]).preset == expected


def test_the_cpu_preset_sets_its_values_and_flags_given_win():
    args = eo.cli(["--preset", "cpu"])
    assert (args.batch_size, args.num_qs, args.q_hidden, args.q_layers) == (256, 4, 256, 3)
    assert (args.num_samples, args.q_lr, args.ema) == (2, 3e-4, 0.98)
    assert (args.behavior_updates, args.total_updates, args.eval_every, args.final_eval_episodes) == (
        20_000,
        10_000,
        2_500,
        50,
    )
    assert MU_PRESETS["cpu"] == MU_PRESETS["table3"]  # Table 3's mu
    args = eo.cli("--preset cpu --num-samples 10 --ema 0.9 --num-qs 2".split())
    assert (args.num_samples, args.ema, args.num_qs, args.q_lr) == (10, 0.9, 2, 3e-4)
    paper = eo.cli(["--dataset-id", "mujoco/halfcheetah/medium-v0"])
    assert (paper.num_samples, paper.q_lr, paper.ema, paper.num_qs, paper.q_hidden) == (10, 1e-4, 0.995, 8, 750)
    assert paper == eo.Args(preset="mujoco", dataset_id="mujoco/halfcheetah/medium-v0")  # Args' defaults: Table 2


@pytest.mark.parametrize(
    "flags, shown",
    [
        ([], ["--total-updates INT  Q-ensemble updates (default: 1000000)", "(Algorithm 1) (default: 10)"]),
        (
            ["--preset", "cpu"],
            ["--total-updates INT  Q-ensemble updates (default: 10000)", "(Algorithm 1) (default: 2)"],
        ),
        (["--dataset-id", "D4RL/kitchen/complete-v2"], ["K: Q functions in the ensemble (default: 16)"]),
    ],
)
def test_help_shows_the_values_a_run_uses(flags, shown):
    """--help shows the preset's values (never None): what `python emaq_offline.py [flags]` would run with."""
    result = run_script("emaq_offline.py", *flags, "--help", env={"COLUMNS": "250"})
    assert result.returncode == 0
    for flag in (
        "--total-updates",
        "--behavior-updates",
        "--num-samples",
        "--num-qs",
        "--q-lr",
        "--ema ",
        "--batch-size",
    ):
        assert "(default: None)" not in "".join(
            line for line in result.stdout.splitlines() if line.lstrip("│ ").startswith(flag)
        )
    for text in shown:
        assert text in result.stdout, text


# ----- emaq_online.py --preset cpu ------------------------------------------------------------------------------------
def test_the_online_cpu_preset_sets_its_values_and_flags_given_win():
    args = eon.cli(["--preset", "cpu"])
    assert (args.num_qs, args.q_hidden, args.q_layers, args.num_samples, args.behavior_preset) == (
        2,
        256,
        2,
        20,
        "small",
    )
    assert (args.total_timesteps, args.learning_starts, args.eval_every) == (100_000, 5_000, 5_000)
    assert (args.q_lr, args.ema, args.temperature, args.ucb_beta, args.batch_size) == (3e-4, 0.98, 10.0, 1.0, 256)
    args = eon.cli("--preset cpu --num-samples 10 --ema 0.9".split())
    assert (args.num_samples, args.ema, args.num_qs) == (10, 0.9, 2)
    assert eon.cli([]) == eon.Args() == eon.cli(["--preset", "paper"])  # Args' defaults: Appendix F's
    assert (eon.Args().num_samples, eon.Args().num_qs, eon.Args().behavior_preset) == (200, 8, "mujoco")


def test_online_help_shows_the_cpu_presets_values():
    result = run_script("emaq_online.py", "--preset", "cpu", "--help", env={"COLUMNS": "250"})
    assert result.returncode == 0
    for text in (
        "K: Q functions in the ensemble (default: 2)",
        "(default: 100000)",
        "(default: small)",
        "(default: 20)",
    ):
        assert text in result.stdout, text


def test_an_online_cpu_preset_run_keeps_its_preset_on_resume(tmp_path):
    flags = "--preset cpu --env-id Hopper-v5 --total-timesteps 300 --learning-starts 200 --eval-every 300"
    result = run_script("emaq_online.py", *flags.split(), "--eval-episodes", "2", "--runs-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    (run_dir,) = tmp_path.iterdir()
    resumed = eon.cli(["--resume", str(run_dir), "--total-timesteps", "400"])
    assert (resumed.preset, resumed.num_qs, resumed.behavior_preset, resumed.total_timesteps) == (
        "cpu",
        2,
        "small",
        400,
    )
