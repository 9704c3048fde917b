"""The segmentation episode: the state machine of docs/design.md section 1.

An :class:`Episode` holds the image, the query, every step's action, text, mask and tool output,
and the ground truth when one is known (for IoU and rewards). It knows nothing of which policy
writes the turns or which tool makes the masks: a click is turned into a tool request by
:meth:`Episode.tool_request`, a caller runs it on any ``SegmentationTool`` (in-process or over the
bridge, one at a time or batched), and :meth:`Episode.apply_click` records the answer.
:meth:`Episode.step` does both for the simple synchronous case.

Termination: a ``Terminate`` action; a turn that does not parse; the same action three times in a
row (``repeat_limit``); ``max_actions`` actions.

What the agent loop and the oracle ask of an episode, so that the same loop and the same oracle run
2D images and volumes (``agent/volume.py``): ``open_tool``, ``observation``, ``user_text``,
``system_note``, ``step_text``, and for the oracle ``click_at`` / ``position`` / ``clicked_map``
(a simulated click to an action and back, in the episode's geometry).
"""

from __future__ import annotations

import dataclasses
import time
import uuid

import numpy as np

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
from ibis_jax.agent.prompts import user_turn
from ibis_jax.data.clicks import SimulatedClick
from ibis_jax.data.images import check_mask
from ibis_jax.metrics import dice, iou
from ibis_jax.tools.protocol import SegmentationTool, SegmentResult, validate_image

END_REASONS = ("terminate", "parse_error", "repeated_action", "max_actions", "no_click", "stopped")


@dataclasses.dataclass(frozen=True)
class EpisodeConfig:
    max_actions: int = 20
    repeat_limit: int = 3


@dataclasses.dataclass
class Step:
    """One policy turn and its consequence.

    ``mask`` is the mask after the step (unchanged from ``prev_mask`` for a terminate or a parse
    failure); ``iou``/``prev_iou``/``dice`` are against the ground truth when the episode has one.
    ``slice``: on a volume, the slice on view when the turn was written (None in 2D).
    """

    index: int
    action: Action | None  # None when the turn did not parse
    text: str
    reasoning: str
    answer: str | None
    prev_mask: np.ndarray
    mask: np.ndarray
    prev_iou: float | None
    iou: float | None
    score: float | None = None
    loss_weight: float = 1.0
    parse_error: str | None = None
    tool_seconds: float = 0.0
    dice: float | None = None
    slice: int | None = None

    @property
    def is_click(self) -> bool:
        return isinstance(self.action, (Click, SliceClick))


class Episode:
    """One image, one query, a sequence of steps until termination."""

    system_note = ""  # appended to the system prompt (a volume episode explains its slices)

    def __init__(
        self,
        image: np.ndarray,
        query: str,
        gt_mask: np.ndarray | None = None,
        *,
        config: EpisodeConfig = EpisodeConfig(),
        episode_id: str | None = None,
        initial_mask: np.ndarray | None = None,
    ):
        self.image = validate_image(image)
        self._start(query, gt_mask, config, episode_id, initial_mask)

    def _start(self, query: str, gt_mask: np.ndarray | None, config, episode_id: str | None,
               initial_mask: np.ndarray | None) -> None:
        """The state every episode starts with, whatever its geometry (set before this: the
        pixels, so that ``shape`` and ``_check_mask`` work)."""
        self.query = query
        self.config = config
        self.episode_id = episode_id or uuid.uuid4().hex
        self.gt_mask = None if gt_mask is None else self._check_mask(gt_mask, "gt_mask")
        self.initial_mask = (np.zeros(self.shape, dtype=bool) if initial_mask is None
                             else self._check_mask(initial_mask, "initial_mask"))
        self.steps: list[Step] = []
        self.tool_logits: np.ndarray | None = None
        self.end_reason: str | None = None

    # -- state -----------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the episode's masks: ``(H, W)`` (a volume: ``(D, H, W)``)."""
        return self.image.shape[:2]

    @property
    def height(self) -> int:
        return self.shape[-2]

    @property
    def width(self) -> int:
        return self.shape[-1]

    @property
    def done(self) -> bool:
        return self.end_reason is not None

    @property
    def current_mask(self) -> np.ndarray:
        return self.steps[-1].mask if self.steps else self.initial_mask

    @property
    def prev_mask(self) -> np.ndarray:
        """The mask before the last step (M_{t-1} for the last step t)."""
        return self.steps[-1].prev_mask if self.steps else self.initial_mask

    @property
    def clicks(self) -> list[Click]:
        return [s.action for s in self.steps if s.is_click]

    @property
    def num_actions(self) -> int:
        return len(self.steps)

    @property
    def initial_iou(self) -> float | None:
        return None if self.gt_mask is None else iou(self.initial_mask, self.gt_mask)

    @property
    def ious(self) -> list[float]:
        """IoU of M_0, M_1, ... (one per step plus the initial mask); needs a ground truth."""
        if self.gt_mask is None:
            raise ValueError("this episode has no ground-truth mask, so it has no IoU")
        return [self.initial_iou] + [s.iou for s in self.steps]

    @property
    def click_iou_curve(self) -> list[float]:
        """IoU after click 1, 2, ... (the curve NoC and mIoU@k read)."""
        return [s.iou for s in self.steps if s.is_click]

    def observation(self, color: tuple[int, int, int] = DEFAULT_COLOR, alpha: float = DEFAULT_ALPHA) -> np.ndarray:
        """The policy's next observation: the current mask over the original image (the colour
        and alpha are the policy's ``AgentSettings``; the agent loop passes them)."""
        return render_overlay(self.image, self.current_mask, color, alpha)

    def user_text(self, step_index: int, nudge: str = "") -> str:
        """The user text in front of turn ``step_index`` (``nudge``: a synthesized refinement hint)."""
        return user_turn(step_index, self.query, nudge)

    def open_tool(self, tool: SegmentationTool) -> None:
        """Opens ``tool`` on this episode (the image is sent once; clicks refer to it by id)."""
        tool.open(self.episode_id, self.image)

    # -- the oracle's view: simulated clicks in this episode's geometry ------------------------
    def click_at(self, sim: SimulatedClick) -> Click:
        return Click.from_pixel(sim.row, sim.col, self.height, self.width, sim.positive)

    def position(self, click: Click) -> tuple[int, int]:
        """The pixel ``(row, col)`` a click lands on (the index :attr:`SimulatedClick.position` gives)."""
        col, row = click.pixel(self.width, self.height)
        return row, col

    def clicked_map(self) -> np.ndarray:
        """``bool [H, W]``: the pixels clicked so far."""
        clicked = np.zeros(self.current_mask.shape, dtype=bool)
        for c in self.clicks:
            clicked[self.position(c)] = True
        return clicked

    # -- transitions -------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self.done:
            raise RuntimeError(f"episode {self.episode_id} already ended ({self.end_reason})")

    def _iou(self, mask: np.ndarray) -> float | None:
        return None if self.gt_mask is None else iou(mask, self.gt_mask)

    def _dice(self, mask: np.ndarray) -> float | None:
        return None if self.gt_mask is None else dice(mask, self.gt_mask)

    # Hooks a volume episode overrides.
    def _check_mask(self, mask: np.ndarray, where: str) -> np.ndarray:
        return check_mask(mask, self.image.shape, where=where)

    def _on_view(self) -> int | None:
        """The slice on view (None in 2D)."""
        return None

    def _after_click(self, prev: np.ndarray, result) -> None:
        """Called after a click's step is recorded (a volume moves its view here)."""

    def _as_action(self, action: Action) -> Action | ActionParseError:
        """The action as this episode applies it, or why it cannot (a slice click in 2D)."""
        if isinstance(action, SliceClick):  # the volume form names a slice a 2D image lacks
            return ActionParseError("bad_action", "a slice click (x, y, z) in a 2D episode; write 'Positive Point (x, y)'")
        return action

    def tool_request(self, click: Click) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The tool call for ``click``: all clicks so far plus this one, in pixels, and the
        previous logits. Returns ``points float32 [N, 2]`` (x=col, y=row), ``labels int32 [N]``."""
        self._check_open()
        clicks = self.clicks + [click]
        points = np.array([c.pixel(self.width, self.height) for c in clicks], dtype=np.float32)
        labels = np.array([1 if c.positive else 0 for c in clicks], dtype=np.int32)
        return points, labels, self.tool_logits

    def apply_click(
        self,
        click: Click,
        result: SegmentResult,
        *,
        reasoning: str = "",
        text: str | None = None,
        loss_weight: float = 1.0,
        tool_seconds: float = 0.0,
    ) -> Step:
        """Records the tool's answer to ``click`` and applies the termination rules."""
        self._check_open()
        mask = self._check_mask(result.mask, "tool mask")
        prev = self.current_mask
        step = Step(
            index=len(self.steps),
            action=click,
            text=text if text is not None else format_turn(reasoning, click),
            reasoning=reasoning,
            answer=None,
            prev_mask=prev,
            mask=mask,
            prev_iou=self._iou(prev),
            iou=self._iou(mask),
            score=float(result.score),
            loss_weight=loss_weight,
            tool_seconds=tool_seconds,
            dice=self._dice(mask),
            slice=self._on_view(),
        )
        self.steps.append(step)
        self.tool_logits = result.logits
        self._after_click(prev, result)
        recent = [format_action(s.action) if s.action is not None else None for s in self.steps[-self.config.repeat_limit:]]
        if len(recent) == self.config.repeat_limit and len(set(recent)) == 1:
            self.end_reason = "repeated_action"
        elif len(self.steps) >= self.config.max_actions:
            self.end_reason = "max_actions"
        return step

    def _non_click_step(self, action: Action | None, text: str, reasoning: str, answer: str | None,
                        loss_weight: float, parse_error: str | None, reason: str) -> Step:
        self._check_open()
        mask = self.current_mask
        score = self.steps[-1].score if self.steps else None
        step = Step(len(self.steps), action, text, reasoning, answer, mask, mask, self._iou(mask),
                    self._iou(mask), score, loss_weight, parse_error, dice=self._dice(mask), slice=self._on_view())
        self.steps.append(step)
        self.end_reason = reason
        return step

    def terminate(self, *, reasoning: str = "", answer: str | None = None, text: str | None = None,
                  loss_weight: float = 1.0) -> Step:
        text = text if text is not None else format_turn(reasoning, Terminate(), answer)
        return self._non_click_step(Terminate(), text, reasoning, answer, loss_weight, None, "terminate")

    def record_parse_failure(self, text: str, error: ActionParseError) -> Step:
        """A turn that did not parse ends the episode; the mask stays as it was."""
        return self._non_click_step(None, text, "", None, 1.0, error.reason, "parse_error")

    def stop(self, reason: str = "stopped") -> None:
        """Ends the episode from outside (e.g. the oracle has nothing left to click)."""
        if reason not in END_REASONS:
            raise ValueError(f"unknown end reason {reason!r}; choose one of {END_REASONS}")
        self._check_open()
        self.end_reason = reason

    def step(self, action: Action, tool: SegmentationTool, *, reasoning: str = "", text: str | None = None,
             answer: str | None = None, loss_weight: float = 1.0) -> Step:
        """Applies one action synchronously: a click runs ``tool`` (opened on this episode's id)."""
        if isinstance(action, Terminate):
            return self.terminate(reasoning=reasoning, answer=answer, text=text, loss_weight=loss_weight)
        if not isinstance(action, (Click, SliceClick)):
            raise TypeError(f"expected Click or Terminate, got {type(action).__name__}")
        action = self._as_action(action)
        if isinstance(action, ActionParseError):
            raise ValueError(action.detail)
        points, labels, prev_logits = self.tool_request(action)
        start = time.perf_counter()
        result = tool.segment(self.episode_id, points, labels, prev_logits)
        return self.apply_click(action, result, reasoning=reasoning, text=text, loss_weight=loss_weight,
                                tool_seconds=time.perf_counter() - start)

    def step_text(self, text: str, tool: SegmentationTool, *, loss_weight: float = 1.0) -> Step:
        """Parses a policy turn leniently and applies it; an unparseable turn ends the episode."""
        try:
            turn = parse_turn(text)
        except ActionParseError as error:
            return self.record_parse_failure(text, error)
        if isinstance(turn.action, (Click, SliceClick)):
            action = self._as_action(turn.action)
            if isinstance(action, ActionParseError):
                return self.record_parse_failure(text, action)
        return self.step(turn.action, tool, reasoning=turn.reasoning, text=text, answer=turn.answer,
                         loss_weight=loss_weight)
