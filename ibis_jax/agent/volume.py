"""The volume episode: one 3D scan, one query, a 3D mask built from clicks on its slices.

The policy sees one slice at a time: the slice with the current 3D mask's cross-section blended
over it (``render_overlay``, as in 2D) and a line of text saying which slice of how many it is
(:meth:`VolumeEpisode.slice_text`). A click names its slice with a third normalised coordinate::

    Positive Point (0.4512, 0.4238, 0.5156)

``z = (k + 0.5) / D`` for slice ``k`` of ``D`` (read back as ``min(int(z * D), D - 1)``), like x
and y. A plain 2D click ``Positive Point (x, y)`` in a volume episode means the slice on view.
The tool turns all clicks so far (on any slices) into the whole 3D mask.

Which slice is observed next is chosen by a rule (``VolumeEpisodeConfig.slice_rule``), not by an
action, so the grammar gains no new verb:

- ``changed`` (default): the slice where the last click changed the 3D mask most (voxel count of
  the symmetric difference), i.e. where the propagation did the most and is likeliest to have
  leaked or stopped short; if nothing changed, the slice stays.
- ``uncertain``: the slice with the most voxels of tool probability in [0.25, 0.75] (needs a tool
  whose ``logits`` are a probability volume, as the classical tool's are).
- ``stay``: the slice never changes (the 2D baseline on one slice).
- ``error``: the slice with the most error voxels against the ground truth: an oracle-only upper
  bound, for measuring the other rules.

Termination as in 2D: ``Terminate``, an unparseable turn, the same action ``repeat_limit`` times in
a row, or ``max_actions`` actions.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Sequence

import numpy as np

from ibis_jax.agent.conversation import HistoryMode, Message, turn_messages
from ibis_jax.agent.episode import END_REASONS
from ibis_jax.agent.grammar import (
    Action,
    ActionParseError,
    Click,
    SliceClick,
    Terminate,
    format_action,
    format_turn,
    parse_turn,
)
from ibis_jax.agent.overlay import DEFAULT_ALPHA, DEFAULT_COLOR, render_overlay
from ibis_jax.agent.prompts import SYSTEM_PROMPT, user_turn
from ibis_jax.data.clicks import error_maps
from ibis_jax.data.clicks3d import next_click_3d, next_click_on_slice
from ibis_jax.metrics import dice, iou, surface_dice
from ibis_jax.tools.volume import VolumeSegmentationTool, VolumeSegmentResult, validate_volume

SLICE_RULES = ("changed", "uncertain", "stay", "error")

VOLUME_PROMPT_NOTE = """\
The image is one slice of a 3D scan; the text says which slice of how many. A click names its \
slice with a third coordinate z = (slice - 0.5) / number of slices, counting slices from 1, in \
[0, 1], e.g. Positive Point (0.4512, 0.4238, 0.5156). The mask is 3D: a click on one slice \
changes every slice."""

VOLUME_SYSTEM_PROMPT = SYSTEM_PROMPT + "\n\n" + VOLUME_PROMPT_NOTE


@dataclasses.dataclass(frozen=True)
class VolumeEpisodeConfig:
    max_actions: int = 20
    repeat_limit: int = 3
    slice_rule: str = "changed"
    overlay_color: tuple[int, int, int] = DEFAULT_COLOR
    overlay_alpha: float = DEFAULT_ALPHA

    def __post_init__(self):
        if self.slice_rule not in SLICE_RULES:
            raise ValueError(f"slice_rule {self.slice_rule!r}: choose one of {SLICE_RULES}")


@dataclasses.dataclass
class VolumeStep:
    """One policy turn; ``slice`` is the slice on view when the turn was written."""

    index: int
    action: Action | None
    text: str
    reasoning: str
    answer: str | None
    slice: int
    prev_mask: np.ndarray
    mask: np.ndarray
    prev_iou: float | None
    iou: float | None
    dice: float | None
    score: float | None = None
    loss_weight: float = 1.0
    parse_error: str | None = None
    tool_seconds: float = 0.0

    @property
    def is_click(self) -> bool:
        return isinstance(self.action, SliceClick)


class VolumeEpisode:
    """One volume, one query, a sequence of steps until termination (see the module docstring).

    ``volume``: windowed ``uint8 [D, H, W]`` in view order; ``spacing``: ``(sd, sh, sw)`` mm;
    ``gt_mask``: ``bool [D, H, W]`` when known; ``start_slice``: the first slice on view
    (default the middle one).
    """

    def __init__(self, volume: np.ndarray, spacing: Sequence[float], query: str, gt_mask: np.ndarray | None = None,
                 *, config: VolumeEpisodeConfig = VolumeEpisodeConfig(), episode_id: str | None = None,
                 initial_mask: np.ndarray | None = None, start_slice: int | None = None):
        self.volume, self.spacing = validate_volume(volume, spacing)
        self.query = query
        self.config = config
        self.episode_id = episode_id or uuid.uuid4().hex
        self.gt_mask = None if gt_mask is None else self._check(gt_mask, "gt_mask")
        self.initial_mask = np.zeros(self.shape, bool) if initial_mask is None else self._check(initial_mask, "initial_mask")
        self.current_slice = self.depth // 2 if start_slice is None else int(start_slice)
        if not 0 <= self.current_slice < self.depth:
            raise ValueError(f"start_slice {start_slice} out of range for {self.depth} slices")
        self.steps: list[VolumeStep] = []
        self.tool_logits: np.ndarray | None = None
        self.end_reason: str | None = None

    def _check(self, mask: np.ndarray, where: str) -> np.ndarray:
        mask = np.asarray(mask)
        if mask.shape != self.shape:
            raise ValueError(f"{where} shape {mask.shape} differs from the volume's {self.shape}")
        return mask.astype(bool)

    # -- state -------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.volume.shape)

    @property
    def depth(self) -> int:
        return self.volume.shape[0]

    @property
    def done(self) -> bool:
        return self.end_reason is not None

    @property
    def current_mask(self) -> np.ndarray:
        return self.steps[-1].mask if self.steps else self.initial_mask

    @property
    def clicks(self) -> list[SliceClick]:
        return [s.action for s in self.steps if isinstance(s.action, SliceClick)]

    def _metric(self, fn, mask):
        return None if self.gt_mask is None else fn(mask, self.gt_mask)

    @property
    def ious(self) -> list[float]:
        if self.gt_mask is None:
            raise ValueError("this episode has no ground-truth mask")
        return [iou(self.initial_mask, self.gt_mask)] + [s.iou for s in self.steps]

    @property
    def dices(self) -> list[float]:
        if self.gt_mask is None:
            raise ValueError("this episode has no ground-truth mask")
        return [dice(self.initial_mask, self.gt_mask)] + [s.dice for s in self.steps]

    @property
    def click_iou_curve(self) -> list[float]:
        return [s.iou for s in self.steps if s.is_click]

    @property
    def click_dice_curve(self) -> list[float]:
        return [s.dice for s in self.steps if s.is_click]

    def surface_dice(self, tolerance_mm: float = 2.0) -> float:
        if self.gt_mask is None:
            raise ValueError("this episode has no ground-truth mask")
        return surface_dice(self.current_mask, self.gt_mask, self.spacing, tolerance_mm)

    def slice_text(self, k: int | None = None) -> str:
        """``Slice 17 of 32 (z = 0.5156).``: slice ``k`` (default the one on view), 1-based, and its z."""
        k = self.current_slice if k is None else k
        return f"Slice {k + 1} of {self.depth} (z = {(k + 0.5) / self.depth:.4f})."

    def user_text(self, step_index: int | None = None, slice_index: int | None = None) -> str:
        """The user text before turn ``step_index`` (default the next) on slice ``slice_index``."""
        step_index = len(self.steps) if step_index is None else step_index
        return f"{user_turn(step_index, self.query)}\n{self.slice_text(slice_index)}"

    def observation(self) -> np.ndarray:
        """The slice on view (RGB) with the 3D mask's cross-section overlaid."""
        plane = self.volume[self.current_slice]
        rgb = np.repeat(plane[:, :, None], 3, axis=2)
        return render_overlay(rgb, self.current_mask[self.current_slice], self.config.overlay_color,
                              self.config.overlay_alpha)

    # -- transitions -------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self.done:
            raise RuntimeError(f"episode {self.episode_id} already ended ({self.end_reason})")

    def as_slice_click(self, action: Click | SliceClick) -> SliceClick:
        """A 2D click on a volume means the slice on view."""
        if isinstance(action, SliceClick):
            return action
        return SliceClick(action.x, action.y, round((self.current_slice + 0.5) / self.depth, 4), action.positive)

    def tool_request(self, click: SliceClick) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """All clicks so far plus ``click`` as voxel points ``float32 [N, 3]`` (x=col, y=row, z=slice)."""
        self._check_open()
        d, h, w = self.shape
        clicks = self.clicks + [click]
        points = np.array([[c.voxel(d, h, w)[i] for i in (2, 1, 0)] for c in clicks], dtype=np.float32)
        labels = np.array([1 if c.positive else 0 for c in clicks], dtype=np.int32)
        return points, labels, self.tool_logits

    def next_slice(self, prev: np.ndarray, mask: np.ndarray, logits: np.ndarray | None) -> int:
        """The slice on view after a click, by ``config.slice_rule`` (see the module docstring)."""
        rule = self.config.slice_rule
        if rule == "changed":
            counts = (prev ^ mask).sum(axis=(1, 2))
        elif rule == "uncertain":
            if logits is None or logits.shape != self.shape:
                return self.current_slice
            counts = ((logits >= 0.25) & (logits <= 0.75)).sum(axis=(1, 2))
        elif rule == "error":
            if self.gt_mask is None:
                raise ValueError("slice_rule 'error' needs the ground truth (an oracle-only upper bound)")
            fn, fp = error_maps(self.gt_mask, mask)
            counts = (fn | fp).sum(axis=(1, 2))
        else:
            return self.current_slice
        return self.current_slice if counts.max() == 0 else int(np.argmax(counts))

    def apply_click(self, click: SliceClick, result: VolumeSegmentResult, *, reasoning: str = "",
                    text: str | None = None, loss_weight: float = 1.0, tool_seconds: float = 0.0) -> VolumeStep:
        self._check_open()
        mask = self._check(result.mask, "tool mask")
        prev = self.current_mask
        step = VolumeStep(len(self.steps), click, text if text is not None else format_turn(reasoning, click),
                          reasoning, None, self.current_slice, prev, mask, self._metric(iou, prev),
                          self._metric(iou, mask), self._metric(dice, mask), float(result.score), loss_weight,
                          tool_seconds=tool_seconds)
        self.steps.append(step)
        self.tool_logits = result.logits
        self.current_slice = self.next_slice(prev, mask, result.logits)
        recent = [format_action(s.action) if s.action is not None else None for s in self.steps[-self.config.repeat_limit:]]
        if len(recent) == self.config.repeat_limit and len(set(recent)) == 1:
            self.end_reason = "repeated_action"
        elif len(self.steps) >= self.config.max_actions:
            self.end_reason = "max_actions"
        return step

    def _non_click_step(self, action, text, reasoning, answer, loss_weight, parse_error, reason) -> VolumeStep:
        self._check_open()
        mask = self.current_mask
        score = self.steps[-1].score if self.steps else None
        step = VolumeStep(len(self.steps), action, text, reasoning, answer, self.current_slice, mask, mask,
                          self._metric(iou, mask), self._metric(iou, mask), self._metric(dice, mask), score,
                          loss_weight, parse_error)
        self.steps.append(step)
        self.end_reason = reason
        return step

    def terminate(self, *, reasoning: str = "", answer: str | None = None, text: str | None = None,
                  loss_weight: float = 1.0) -> VolumeStep:
        text = text if text is not None else format_turn(reasoning, Terminate(), answer)
        return self._non_click_step(Terminate(), text, reasoning, answer, loss_weight, None, "terminate")

    def record_parse_failure(self, text: str, error: ActionParseError) -> VolumeStep:
        return self._non_click_step(None, text, "", None, 1.0, error.reason, "parse_error")

    def stop(self, reason: str = "stopped") -> None:
        if reason not in END_REASONS:
            raise ValueError(f"unknown end reason {reason!r}; choose one of {END_REASONS}")
        self._check_open()
        self.end_reason = reason

    def step(self, action: Action, tool: VolumeSegmentationTool, *, reasoning: str = "", text: str | None = None,
             answer: str | None = None, loss_weight: float = 1.0) -> VolumeStep:
        if isinstance(action, Terminate):
            return self.terminate(reasoning=reasoning, answer=answer, text=text, loss_weight=loss_weight)
        if not isinstance(action, (Click, SliceClick)):
            raise TypeError(f"expected Click, SliceClick or Terminate, got {type(action).__name__}")
        click = self.as_slice_click(action)
        points, labels, prev_logits = self.tool_request(click)
        start = time.perf_counter()
        result = tool.segment(self.episode_id, points, labels, prev_logits)
        return self.apply_click(click, result, reasoning=reasoning, text=text, loss_weight=loss_weight,
                                tool_seconds=time.perf_counter() - start)

    def step_text(self, text: str, tool: VolumeSegmentationTool) -> VolumeStep:
        try:
            turn = parse_turn(text)
        except ActionParseError as error:
            return self.record_parse_failure(text, error)
        return self.step(turn.action, tool, reasoning=turn.reasoning, text=text, answer=turn.answer)


# -- policies and the loop -----------------------------------------------------------------------

VOLUME_CLICKERS = ("3d", "slice")


class VolumeOraclePolicy:
    """The click simulator on volumes.

    ``clicker="3d"``: the RITM rule on the whole volume (clicks any slice; an upper bound).
    ``clicker="slice"``: the RITM rule on the slice on view only (what a policy that sees one slice
    can do); it terminates when the slice on view has nothing left to fix.
    Terminates at ``stop_dice`` (3D Dice) or ``stop_iou``, after ``max_clicks`` clicks, or with nothing to click.
    """

    def __init__(self, clicker: str = "3d", stop_dice: float | None = None, max_clicks: int = 20,
                 stop_iou: float | None = None):
        if clicker not in VOLUME_CLICKERS:
            raise ValueError(f"clicker {clicker!r}: choose one of {VOLUME_CLICKERS}")
        self.clicker, self.stop_dice, self.max_clicks, self.stop_iou = clicker, stop_dice, max_clicks, stop_iou

    def generate(self, requests) -> list:
        from ibis_jax.agent.loop import PolicyTurn

        return [PolicyTurn(self.turn(r.episode), stop_reason="oracle") for r in requests]

    def turn(self, episode: VolumeEpisode) -> str:
        if episode.gt_mask is None:
            raise ValueError("the oracle policy needs episodes with a ground-truth mask")
        clicks = episode.clicks
        done = ((self.stop_dice is not None and episode.dices[-1] >= self.stop_dice)
                or (self.stop_iou is not None and episode.ious[-1] >= self.stop_iou) or len(clicks) >= self.max_clicks)
        sim = None
        if not done:
            d, h, w = episode.shape
            clicked = np.zeros(episode.shape, dtype=bool)
            for c in clicks:
                clicked[c.voxel(d, h, w)] = True
            if self.clicker == "3d":
                sim = next_click_3d(episode.gt_mask, episode.current_mask, spacing=episode.spacing, clicked=clicked)
            else:
                sim = next_click_on_slice(episode.gt_mask, episode.current_mask, episode.current_slice,
                                          spacing=episode.spacing, clicked=clicked)
        if sim is None:
            return format_turn("The mask fits the target.", Terminate(), "The target is segmented.")
        d, h, w = episode.shape
        click = SliceClick.from_voxel(sim.slice, sim.row, sim.col, d, h, w, sim.positive)
        return format_turn("Oracle click on the largest error region.", click)


@dataclasses.dataclass
class VolumeTrace:
    observations: list[np.ndarray] = dataclasses.field(default_factory=list)
    slices: list[int] = dataclasses.field(default_factory=list)
    turns: list = dataclasses.field(default_factory=list)
    generate_seconds: float = 0.0


def run_volume_agent(policy, tool: VolumeSegmentationTool, episodes: Sequence[VolumeEpisode], *,
                     history: HistoryMode | None = None, system_prompt: str | None = None) -> list[VolumeTrace]:
    """``run_agent`` for volume episodes: each user turn carries the slice on view and its text.
    ``history`` None: the policy's ``settings.history``; the system text is the volume prompt."""
    from ibis_jax.agent.loop import TurnRequest
    from ibis_jax.agent.settings import HF_DEFAULTS

    traces = [VolumeTrace() for _ in episodes]
    history = history or getattr(policy, "settings", HF_DEFAULTS).history
    system_prompt = system_prompt if system_prompt is not None else VOLUME_SYSTEM_PROMPT
    opened: list[VolumeEpisode] = []
    try:
        for episode in episodes:
            tool.open(episode.episode_id, episode.volume, episode.spacing)
            opened.append(episode)
        while live := [i for i, e in enumerate(episodes) if not e.done]:
            requests = []
            for i in live:
                episode, trace = episodes[i], traces[i]
                trace.observations.append(episode.observation())
                trace.slices.append(episode.current_slice)
                texts = [episode.user_text(t, k) for t, k in enumerate(trace.slices)]
                assistant = [Message("assistant", t.text, token_ids=t.token_ids) for t in trace.turns]
                requests.append(TurnRequest(turn_messages(len(episode.steps), episode.query, trace.observations,
                                                          assistant, history=history, user_texts=texts,
                                                          system_prompt=system_prompt), episode))
            start = time.perf_counter()
            turns = policy.generate(requests)
            share = (time.perf_counter() - start) / len(live)
            if len(turns) != len(live):
                raise RuntimeError(f"policy returned {len(turns)} turns for {len(live)} requests")
            for i, turn in zip(live, turns):
                traces[i].turns.append(turn)
                traces[i].generate_seconds += share
                episodes[i].step_text(turn.text, tool)
                if episodes[i].done:
                    tool.close(episodes[i].episode_id)
    finally:
        for episode in opened:
            if not episode.done:
                tool.close(episode.episode_id)
    return traces
