"""An example user reward for ``ibis-jax grpo --reward docs/examples/my_rewards.py:first_click_bonus``.

A reward is any ``fn(episode, context) -> float32 [num_steps]``: one value per policy turn of a
finished episode (``ibis_jax.rl.rewards``). This one pays the first click for landing on the
target (the measure the located-targets control tracks), and nothing afterwards.
"""

import numpy as np

from ibis_jax.agent.grammar import Click


def first_click_bonus(episode, context):
    values = np.zeros(len(episode.steps), np.float32)
    first = episode.steps[0] if episode.steps else None
    if first is not None and context.has_action(first) and isinstance(first.action, Click) and first.action.positive:
        col, row = first.action.pixel(episode.width, episode.height)
        values[0] = float(episode.gt_mask[row, col])
    return values
