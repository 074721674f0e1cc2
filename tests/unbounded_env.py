"""A real MuJoCo environment with an unbounded action space, for the bad-input test (`tests.unbounded_env:...`)."""

import gymnasium as gym
import numpy as np


class UnboundedActions(gym.ActionWrapper):
    def __init__(self, env):
        super().__init__(env)
        self.action_space = gym.spaces.Box(-np.inf, np.inf, env.action_space.shape, np.float32)

    def action(self, action):
        return action


gym.register(
    "UnboundedInvertedPendulum-v0", entry_point=lambda **kw: UnboundedActions(gym.make("InvertedPendulum-v5", **kw))
)
