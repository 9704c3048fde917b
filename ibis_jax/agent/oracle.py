"""The oracle: the click simulator as a :class:`~ibis_jax.agent.loop.Policy`.

One class plays the policy wherever the ground truth decides the next action: trajectory synthesis
(the cold-start data is ``run_agent(OraclePolicy(...), tool, episodes)``), the oracle upper bound
in evaluation, the demo and the tool benchmarks. Each turn it simulates the next click from the
ground truth and the current mask (``data.clicks.next_click``, docs/design.md section 3) and terminates when
the stop IoU (or Dice) is reached, the click budget is spent, nothing is left to click, or its
click would repeat the last one (the tool stopped responding).

Volumes (``agent/volume.py``) run through the same class: ``volume_clicker="3d"`` clicks the RITM
rule on the whole volume (any slice; an upper bound), ``"slice"`` only on the slice on view (what a
policy that sees one slice can do; it terminates when that slice has nothing left to fix),
``"slice-then-3d"`` on the slice on view while it has errors, else where the volume's error is
deepest (the synthesis default: a view that looks finished does not end a volume that is not). The episode turns a simulated click into its action
(``click_at``), so the oracle does not care which geometry it clicks in.

A synthesized trajectory also needs what only the synthesis knows about an episode: its target
and modality (for the reasoning), its seeded random streams, a teacher and whether it contains a
deliberate wrong click. The synthesis hands that over as an :class:`OracleScript` per episode
(:meth:`OraclePolicy.add_script`); an episode without a script gets the plain oracle (short fixed
reasoning, no self-correction), as evaluation wants.

Self-correction (paper): a scripted episode with ``wrong_at`` gets one deliberately wrong click (a
positive click on clear background or a negative click inside the covered target) at that turn,
with loss weight 0; the next turn's reasoning notices what it did and undoes it with a click in
the region it spoiled (2D only; a volume episode's script has no wrong click). Every turn carries its tag (``first``, ``oracle``, ``wrong``,
``correction``, ``final``, ``absent``) and, for a scripted episode, the user text it was drawn
with, so the record writer can store them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from ibis_jax.agent.episode import Episode, Step
from ibis_jax.agent.grammar import Terminate, format_turn
from ibis_jax.agent.loop import PolicyTurn, TurnRequest
from ibis_jax.agent.settings import HF_DEFAULTS
from ibis_jax.data.clicks import (
    ClickRule,
    SimulatedClick,
    correction_click,
    next_click,
    next_click_on_slice,
    wrong_click,
)
from ibis_jax.data.queries import make_refinement
from ibis_jax.data.reasoning import TeacherFn, compute_facts, location_words, template_answer, template_reasoning
from ibis_jax.metrics import dice

PLAIN_CLICK = "Oracle click on the largest error region."
PLAIN_DONE = ("The mask fits the target.", "The target is segmented.")
VOLUME_CLICKERS = ("3d", "slice", "slice-then-3d")


@dataclasses.dataclass
class OracleScript:
    """What synthesis knows about one episode.

    text_rng draws the refinement nudges, reasoning templates and the answer (in that order each
    turn); wrong_rng draws the wrong click; wrong_at: the turn of the deliberate wrong click
    (None: no self-correction).
    """

    target: str
    modality: str
    text_rng: np.random.Generator
    wrong_rng: np.random.Generator | None = None
    wrong_at: int | None = None
    teacher: TeacherFn | None = None


@dataclasses.dataclass
class _State:
    """Per episode: what the oracle did so far that the episode does not show."""

    oracle_clicks: int = 0  # clicks that were neither the wrong one nor its correction
    wrong_step: int | None = None
    pending: tuple[np.ndarray, str] | None = None  # (mask before the wrong click, its location)
    wrong_at: int | None = None


class OraclePolicy:
    """The click simulator as a policy (see the module docstring).

    Attributes other components read instead of asking for the class:
      reads_messages: False: the oracle reads the episode's ground truth, never the conversation,
        so the agent loop renders no observations for it.
      fixed_clicks: with ``stop_iou=None`` it clicks its whole budget (the early-stop-off curves
        NoC and mIoU@k are defined on).
    """

    reads_messages = False
    settings = HF_DEFAULTS

    def __init__(self, rule: ClickRule = "ritm", stop_iou: float | None = None, max_clicks: int = 20, *,
                 volume_clicker: str = "3d", stop_dice: float | None = None):
        if rule not in ("ritm", "ibis"):
            raise ValueError(f"click rule {rule!r}: choose ritm or ibis")
        if volume_clicker not in VOLUME_CLICKERS:
            raise ValueError(f"volume clicker {volume_clicker!r}: choose one of {VOLUME_CLICKERS}")
        self.rule, self.stop_iou, self.max_clicks = rule, stop_iou, max_clicks
        self.volume_clicker, self.stop_dice = volume_clicker, stop_dice
        self._scripts: dict[str, OracleScript] = {}
        self._states: dict[str, _State] = {}

    @property
    def fixed_clicks(self) -> bool:
        return self.stop_iou is None and self.stop_dice is None

    def with_budget(self, max_clicks: int, stop_iou: float | None = None) -> "OraclePolicy":
        """The same clicker with another budget and stop (e.g. the fixed-click curves)."""
        return OraclePolicy(self.rule, stop_iou, max_clicks, volume_clicker=self.volume_clicker)

    def add_script(self, episode_id: str, script: OracleScript) -> None:
        self._scripts[episode_id] = script

    def generate(self, requests: Sequence[TurnRequest]) -> list[PolicyTurn]:
        return [self._turn(r.episode) for r in requests]

    # -- one turn ------------------------------------------------------------------------------
    def _turn(self, episode: Episode) -> PolicyTurn:
        gt = episode.gt_mask
        if gt is None:
            raise ValueError("the oracle policy needs episodes with a ground-truth mask")
        script = self._scripts.get(episode.episode_id)
        if not episode.steps or episode.episode_id not in self._states:
            self._states[episode.episode_id] = _State(wrong_at=None if script is None else script.wrong_at)
        state = self._states[episode.episode_id]
        mask = episode.current_mask
        clicked = episode.clicked_map()
        reached = ((self.stop_iou is not None and episode.ious[-1] >= self.stop_iou)
                   or (self.stop_dice is not None and dice(mask, gt) >= self.stop_dice))
        if gt.ndim != 2:
            state.wrong_at = None  # self-correction is 2D only
        if not gt.any():
            return self._finish(episode, script, "absent", True)
        if state.pending is None and (reached or state.oracle_clicks >= self.max_clicks):
            return self._finish(episode, script, "final", reached or self.stop_iou is None)
        if (script is not None and state.wrong_at is not None and state.wrong_step is None
                and len(episode.steps) >= state.wrong_at and state.pending is None):
            sim = wrong_click(gt, mask, clicked, script.wrong_rng)
            if sim is not None:
                state.wrong_step = len(episode.steps)
                state.pending = (mask, location_words(sim.row, sim.col, episode.height, episode.width))
                return self._click(episode, script, sim, "wrong", 0.0)
            state.wrong_at = None  # no safe wrong click exists on this mask: skip self-correction
        kind = "first" if not episode.steps else "oracle"
        extra: dict[str, Any] = {}
        sim = None
        if state.pending is not None:
            before, location = state.pending
            state.pending = None
            sim, effect = correction_click(gt, before, mask, clicked)
            kind, extra = "correction", {"wrong_effect": effect, "wrong_location": location}
        if sim is None:
            sim = self._next_click(episode, clicked)
        if sim is None or _repeats(episode, sim):  # nothing left to click, or the tool stopped responding
            return self._finish(episode, script, "final", reached)
        if kind != "correction":
            state.oracle_clicks += 1
        return self._click(episode, script, sim, kind, 1.0, **extra)

    def _next_click(self, episode: Episode, clicked: np.ndarray) -> SimulatedClick | None:
        gt, mask = episode.gt_mask, episode.current_mask
        if gt.ndim == 2:
            return next_click(gt, mask, rule=self.rule, clicked=clicked)
        if self.volume_clicker in ("slice", "slice-then-3d"):
            sim = next_click_on_slice(gt, mask, episode.current_slice, spacing=episode.spacing, clicked=clicked)
            if sim is not None or self.volume_clicker == "slice":
                return sim
        return next_click(gt, mask, clicked=clicked, spacing=episode.spacing)

    def _click(self, episode: Episode, script: OracleScript | None, sim: SimulatedClick, kind: str,
               weight: float, **extra: Any) -> PolicyTurn:
        click = episode.click_at(sim)
        if script is None:
            return PolicyTurn(format_turn(PLAIN_CLICK, click), stop_reason="oracle", tag=kind, loss_weight=weight)
        facts = _facts(episode, script, "positive" if sim.positive else "negative", kind, sim, **extra)
        user = _user_text(episode, script)
        return PolicyTurn(format_turn(_reasoning(facts, script), click), stop_reason="oracle", tag=kind,
                          loss_weight=weight, user_text=user)

    def _finish(self, episode: Episode, script: OracleScript | None, kind: str, reached: bool) -> PolicyTurn:
        self._states.pop(episode.episode_id, None)
        if script is None:
            return PolicyTurn(format_turn(PLAIN_DONE[0], Terminate(), PLAIN_DONE[1]), stop_reason="oracle", tag=kind)
        facts = _facts(episode, script, "terminate", kind, None, reached=reached)
        user = _user_text(episode, script)
        reasoning = _reasoning(facts, script)
        return PolicyTurn(format_turn(reasoning, Terminate(), template_answer(facts, script.text_rng)),
                          stop_reason="oracle", tag=kind, user_text=user)


def _repeats(episode: Episode, sim: SimulatedClick) -> bool:
    last = episode.clicks[-1] if episode.clicks else None
    return last is not None and last.positive == sim.positive and episode.position(last) == sim.position


def _facts(episode: Episode, script: OracleScript, action: str, kind: str, sim: SimulatedClick | None, **extra):
    """The reasoning's facts; on a volume, those of the slice the turn looks at (or clicks)."""
    gt, mask = episode.gt_mask, episode.current_mask
    if gt.ndim == 3:
        k = episode.current_slice if sim is None or sim.slice is None else sim.slice
        gt, mask = gt[k], mask[k]
    return compute_facts(gt, mask, step_index=len(episode.steps), target=script.target, modality=script.modality,
                         action=action, kind=kind, click=None if sim is None else (sim.row, sim.col), **extra)


def _user_text(episode: Episode, script: OracleScript) -> str:
    t = len(episode.steps)
    nudge = make_refinement(script.target, script.modality, script.text_rng).text if t > 0 else ""
    return episode.user_text(t, nudge)


def _reasoning(facts, script: OracleScript) -> str:
    draft = template_reasoning(facts, script.text_rng)
    return script.teacher(facts, draft) if script.teacher is not None else draft


def oracle_iou_curve(episode: Episode, max_clicks: int = 20) -> list[float]:
    """The click IoU curve, padded with its last value to ``max_clicks`` (nothing was left to click)."""
    curve = episode.click_iou_curve
    return curve + [curve[-1] if curve else 0.0] * (max_clicks - len(curve))


def last_click_step(episode: Episode) -> Step | None:
    return next((s for s in reversed(episode.steps) if s.is_click), None)


def run_oracle(
    tool,
    image: np.ndarray,
    gt_mask: np.ndarray,
    *,
    rule: ClickRule = "ritm",
    max_clicks: int = 20,
    stop_iou: float | None = None,
    query: str = "",
    episode_id: str | None = None,
) -> Episode:
    """One oracle episode through the agent loop (the demo, benchmarks and tests): clicks until
    ``stop_iou`` (None: the whole budget), ``max_clicks`` or nothing left to click, then
    terminates. The ground truth must not be empty."""
    from ibis_jax.agent.episode import EpisodeConfig
    from ibis_jax.agent.loop import run_agent
    from ibis_jax.data.images import check_mask

    gt = check_mask(gt_mask, np.shape(image), where="gt_mask", allow_empty=False)
    episode = Episode(image, query, gt, config=EpisodeConfig(max_actions=max_clicks + 1), episode_id=episode_id)
    run_agent(OraclePolicy(rule, stop_iou, max_clicks), tool, [episode])
    return episode
