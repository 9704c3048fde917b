"""The five fine-grained rewards of IBISAgent (paper Eqs. 4-10, docs/design.md section 4) as a pluggable API.

A reward is any callable ``reward(episode, context) -> float32 [num_steps]``: one value per policy
turn of a finished :class:`~ibis_jax.agent.episode.Episode`, computed from that turn's text, its
action, the true previous mask M_{t-1}, the new mask M_t and the step index. The five paper terms
are instances:

- ``format``: 1 if the turn passes the strict format check, else 0;
- ``answer``: IoU tiers of the mask after the action (> 0.80: 3, > 0.70: 2, > 0.50: 1, else 0);
  for a closed-ended VQA episode, exact match of the final answer (1/0) on the terminating turn;
- ``click``: +1 if a positive click lands in FN(M_{t-1}) or a negative click in FP(M_{t-1}), -1
  otherwise, 0 for a terminate; an unparsed turn is no terminate, so it takes the "otherwise"
  (``unparsed_click``, -1; with 0 an unparseable turn scores exactly as a wrong click, and GRPO
  drifted into malformed terminates on the tiny model);
- ``pseg``: 1 if IoU(M_t) > IoU(M_{t-1}) strictly, else 0; ``-pseg_drop_penalty`` if it dropped
  (0 by default; the paper's figure draws a penalty);
- ``length``: 1 if the 1-based step index t <= T_opt, else -0.2 (t - T_opt).

A turn without a valid action -- one that did not parse, or one cut at the token limit
(``RewardContext.stop_reasons[t] == "max_tokens"``, even if a lenient parse found an action in
it) -- earns no answer or progress credit (docs/design.md section 4, as the released reward): S_ans 0,
S_pseg 0, S_click ``unparsed_click``; S_format and S_len as for any turn. Otherwise an episode
that ends in garbage at IoU 0.85 would keep S_ans 3.

The per-step total is the weighted mean of the components (the paper: equal weights, S = sum / 5).
A trajectory's score, which GRPO normalises within a group, aggregates the per-step totals:
``mean`` over its turns (default), ``sum``, or ``last``.

``mode="step"`` reproduces the released single-step formulation, which scores each turn of a
pre-simulated state on its own: the previous mask is the one the previous clicks make (the
released code rebuilds it from them; ``Step.prev_mask`` is exactly the tool's mask for those
clicks), so S_click is as in the multi-turn mode; the previous IoU and the step index are never
passed, so S_pseg compares against IoU 0 (any click with a non-empty overlap is progress; a
terminate, which makes no new mask, gets 0) and S_len takes step 1.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Literal, Protocol

import numpy as np

from ibis_jax.agent.episode import Episode, Step
from ibis_jax.agent.grammar import Terminate, is_well_formed
from ibis_jax.plugins import load_object

PAPER_REWARDS = ("format", "answer", "click", "pseg", "length")


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    iou_tiers: tuple[tuple[float, float], ...] = ((0.80, 3.0), (0.70, 2.0), (0.50, 1.0))
    t_opt: int = 5
    length_penalty: float = 0.2
    pseg_drop_penalty: float = 0.0
    unparsed_click: float = -1.0  # S_click of a turn that did not parse
    weights: Mapping[str, float] = dataclasses.field(default_factory=lambda: {k: 1.0 for k in PAPER_REWARDS})
    aggregate: Literal["mean", "sum", "last"] = "mean"
    mode: Literal["multi_turn", "step"] = "multi_turn"


@dataclasses.dataclass(frozen=True)
class RewardContext:
    """What a reward may read besides the episode."""

    config: RewardConfig = RewardConfig()
    vqa_answer: str | None = None  # set for closed-ended VQA episodes
    # The sampler's stop reason per turn ("eos" | "stop_string" | "max_tokens"); () = unknown.
    # A "max_tokens" turn is scored as one without an action (module docstring).
    stop_reasons: tuple[str, ...] = ()

    def has_action(self, step: Step) -> bool:
        """Whether ``step`` carries a valid action: it parsed and was not cut at the token limit."""
        truncated = step.index < len(self.stop_reasons) and self.stop_reasons[step.index] == "max_tokens"
        return step.action is not None and not truncated


class Reward(Protocol):
    def __call__(self, episode: Episode, context: RewardContext) -> np.ndarray: ...


def _require_gt(episode: Episode, name: str) -> np.ndarray:
    if episode.gt_mask is None:
        raise ValueError(f"reward {name!r} needs an episode with a ground-truth mask")
    return episode.gt_mask


def _prev_iou(step: Step, context: RewardContext) -> float:
    return 0.0 if context.config.mode == "step" else float(step.prev_iou)


def format_reward(episode: Episode, context: RewardContext) -> np.ndarray:
    return np.array([float(is_well_formed(s.text)) for s in episode.steps], dtype=np.float32)


def _normalise_answer(text: str | None) -> str:
    return " ".join((text or "").lower().strip().rstrip(".").split())


def answer_reward(episode: Episode, context: RewardContext) -> np.ndarray:
    if context.vqa_answer is not None:
        target = _normalise_answer(context.vqa_answer)
        return np.array([
            float(context.has_action(s) and isinstance(s.action, Terminate) and _normalise_answer(s.answer) == target)
            for s in episode.steps
        ], dtype=np.float32)
    _require_gt(episode, "answer")

    def tier(value: float) -> float:
        return next((score for threshold, score in context.config.iou_tiers if value > threshold), 0.0)

    return np.array([tier(s.iou) if context.has_action(s) else 0.0 for s in episode.steps], dtype=np.float32)


def click_reward(episode: Episode, context: RewardContext) -> np.ndarray:
    gt = _require_gt(episode, "click")
    values = []
    for s in episode.steps:
        if not context.has_action(s):
            values.append(context.config.unparsed_click)
            continue
        if not s.is_click:
            values.append(0.0)  # terminate
            continue
        where = episode.position(s.action)  # (row, col), or (slice, row, col) on a volume
        # M_{t-1}: the mask of the previous clicks, in both modes (the released step mode
        # rebuilds it from them).
        in_target, covered = bool(gt[where]), bool(s.prev_mask[where])
        # Positive must land on missed target (FN), negative on wrongly covered pixels (FP).
        right = (in_target and not covered) if s.action.positive else (covered and not in_target)
        values.append(1.0 if right else -1.0)
    return np.array(values, dtype=np.float32)


def pseg_reward(episode: Episode, context: RewardContext) -> np.ndarray:
    _require_gt(episode, "pseg")
    values = []
    for s in episode.steps:
        if not context.has_action(s) or isinstance(s.action, Terminate):
            values.append(0.0)  # no new mask: no progress (and, by the strict >, none in multi_turn)
            continue
        before = _prev_iou(s, context)
        values.append(1.0 if s.iou > before else (-context.config.pseg_drop_penalty if s.iou < before else 0.0))
    return np.array(values, dtype=np.float32)


def length_reward(episode: Episode, context: RewardContext) -> np.ndarray:
    cfg = context.config
    values = []
    for s in episode.steps:
        t = 1 if cfg.mode == "step" else s.index + 1
        values.append(1.0 if t <= cfg.t_opt else -cfg.length_penalty * (t - cfg.t_opt))
    return np.array(values, dtype=np.float32)


REWARDS: dict[str, Reward] = {
    "format": format_reward,
    "answer": answer_reward,
    "click": click_reward,
    "pseg": pseg_reward,
    "length": length_reward,
}


def load_reward(spec: str) -> tuple[str, Reward]:
    """A reward by name (``format``...) or from user code: ``path/to/my_rewards.py:shape_bonus``
    or ``package.module:shape_bonus``."""
    if spec in REWARDS:
        return spec, REWARDS[spec]
    if ":" not in spec:
        raise ValueError(f"reward {spec!r}: use one of {sorted(REWARDS)} or 'file.py:function'")
    fn = load_object(spec, what="reward")
    if not callable(fn):
        raise AttributeError(f"reward {spec!r}: {spec.rpartition(':')[0]} has no callable named {spec.rpartition(':')[2]!r}")
    return spec.rpartition(":")[2], fn


@dataclasses.dataclass
class EpisodeScore:
    """Per-step components ``[num_steps]`` by name, the per-step total and the trajectory score."""

    components: dict[str, np.ndarray]
    per_step: np.ndarray
    score: float


def score_episode(
    episode: Episode,
    rewards: Mapping[str, Reward] | Sequence[str] = PAPER_REWARDS,
    context: RewardContext = RewardContext(),
) -> EpisodeScore:
    """Runs every reward on a finished episode and aggregates them (see the module docstring)."""
    if not isinstance(rewards, Mapping):
        rewards = dict(load_reward(spec) for spec in rewards)
    if not episode.steps:
        raise ValueError("cannot score an episode with no steps")
    weights = context.config.weights
    components: dict[str, np.ndarray] = {}
    for name, fn in rewards.items():
        values = np.asarray(fn(episode, context), dtype=np.float32).reshape(-1)
        if values.shape[0] != len(episode.steps):
            raise ValueError(f"reward {name!r} returned {values.shape[0]} values for {len(episode.steps)} steps")
        components[name] = values
    total_weight = sum(weights.get(name, 1.0) for name in components)
    per_step = sum(weights.get(name, 1.0) * v for name, v in components.items()) / total_weight
    aggregate: Callable[[np.ndarray], float] = {"mean": np.mean, "sum": np.sum, "last": lambda v: v[-1]}[
        context.config.aggregate
    ]
    return EpisodeScore(components, per_step.astype(np.float32), float(aggregate(per_step)))
