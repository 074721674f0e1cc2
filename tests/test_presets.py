"""The paper's presets (Tables 2 and 3) and the pinned gymnasium-robotics stack behind the Table 3 domains."""

import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch

import emaq_offline as eo
from behavior_model import action_bounds

# The environments behind Minari's D4RL kitchen, antmaze and adroit datasets.
TABLE3_ENVS = ["FrankaKitchen-v1", "AntMaze_UMaze-v4", "AntMaze_Medium_Diverse_GR-v4", "AntMaze_Large_Diverse_GR-v4",
               "AdroitHandDoor-v1", "AdroitHandHammer-v1", "AdroitHandPen-v1", "AdroitHandRelocate-v1"]


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


@pytest.mark.parametrize("dataset_id, preset", [
    ("mujoco/halfcheetah/medium-v0", "mujoco"), ("emaq/Hopper-v5/random-v0", "mujoco"), ("D4RL/kitchen/complete-v2", "table3"),
    ("D4RL/antmaze/umaze-v1", "table3"), ("D4RL/door/cloned-v2", "table3"), ("D4RL/pen/human-v2", "table3"),
])
def test_auto_preset_follows_the_paper(dataset_id, preset):
    args = eo.check_args(eo.Args(dataset_id=dataset_id), torch.device("cpu"))
    assert args.preset == preset
    expected = {"mujoco": (256, 8, 750, 3), "table3": (128, 16, 256, 4)}[preset]  # Table 2 / Table 3
    assert (args.batch_size, args.num_qs, args.q_hidden, args.q_layers) == expected
    assert args.q_lr == 1e-4 and args.behavior_lr == 5e-4 and args.ema == 0.995 and args.ensemble_lambda == 1.0
    assert eo.check_args(eo.Args(dataset_id=dataset_id, num_qs=3), torch.device("cpu")).num_qs == 3  # a flag beats the preset
