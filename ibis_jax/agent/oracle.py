"""The oracle episode: the click simulator plays the policy.

Trajectory synthesis (the cold-start data), the oracle upper bound in evaluation and the tool
benchmarks all run this loop: simulate the next click from the ground truth and the current mask,
send all clicks to the tool, record the step, until the target IoU, the click budget, or nothing
left to click.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ibis_jax.agent.episode import Episode, EpisodeConfig, Step
from ibis_jax.agent.grammar import Click
from ibis_jax.data.clicks import ClickRule, SimulatedClick, next_click
from ibis_jax.data.images import check_mask
from ibis_jax.tools.protocol import SegmentationTool, tool_session

# Called before each click with (episode, simulated click); returns (reasoning, loss weight).
ReasoningFn = Callable[[Episode, SimulatedClick], tuple[str, float]]


def run_oracle_episode(
    tool: SegmentationTool,
    image: np.ndarray,
    gt_mask: np.ndarray,
    *,
    rule: ClickRule = "ritm",
    max_clicks: int = 20,
    stop_iou: float | None = None,
    terminate: bool = False,
    answer: str | None = None,
    query: str = "",
    episode_id: str | None = None,
    config: EpisodeConfig | None = None,
    reasoning_fn: ReasoningFn | None = None,
) -> Episode:
    """Runs one oracle episode and returns it (closed on the tool).

    Clicks until ``stop_iou`` is reached (if given), ``max_clicks`` clicks were made, or the
    simulator has nothing left to click. With ``terminate=True`` the episode ends with a
    ``Terminate`` step carrying ``answer``, as a synthesized trajectory does; otherwise it ends with reason
    ``max_actions`` or ``no_click``. The ground truth must not be empty.
    """
    gt = check_mask(gt_mask, np.shape(image), where="gt_mask", allow_empty=False)
    config = config or EpisodeConfig(max_actions=max_clicks + 1)
    if config.max_actions <= max_clicks:
        config = EpisodeConfig(max_clicks + 1, config.repeat_limit, config.overlay_color, config.overlay_alpha)
    episode = Episode(image, query, gt, config=config, episode_id=episode_id)
    clicked = np.zeros(gt.shape, dtype=bool)
    with tool_session(tool, episode.episode_id, episode.image):
        while not episode.done:
            reached = stop_iou is not None and episode.ious[-1] >= stop_iou
            sim = None if (reached or len(episode.clicks) >= max_clicks) else next_click(
                gt, episode.current_mask, rule=rule, clicked=clicked
            )
            if sim is None:
                if terminate:
                    episode.terminate(answer=answer)
                else:
                    episode.stop("max_actions" if len(episode.clicks) >= max_clicks else "no_click")
                break
            clicked[sim.row, sim.col] = True
            click = Click.from_pixel(sim.row, sim.col, episode.height, episode.width, sim.positive)
            reasoning, weight = reasoning_fn(episode, sim) if reasoning_fn else ("", 1.0)
            episode.step(click, tool, reasoning=reasoning, loss_weight=weight)
    return episode


def oracle_iou_curve(episode: Episode, max_clicks: int = 20) -> list[float]:
    """The click IoU curve, padded with its last value to ``max_clicks`` (nothing was left to click)."""
    curve = episode.click_iou_curve
    return curve + [curve[-1] if curve else 0.0] * (max_clicks - len(curve))


def last_click_step(episode: Episode) -> Step | None:
    return next((s for s in reversed(episode.steps) if s.is_click), None)
