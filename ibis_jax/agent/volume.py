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

:class:`VolumeEpisode` is an :class:`~ibis_jax.agent.episode.Episode` with a third axis: the same
agent loop (``run_agent``) and the same oracle (``OraclePolicy``, whose ``volume_clicker`` picks the
3D or the per-slice rule) run it; only the geometry hooks differ.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from ibis_jax.agent.episode import Episode, EpisodeConfig
from ibis_jax.agent.grammar import Action, Click, SliceClick
from ibis_jax.agent.overlay import DEFAULT_ALPHA, DEFAULT_COLOR, render_overlay
from ibis_jax.agent.prompts import SYSTEM_PROMPT, user_turn
from ibis_jax.data.clicks import SimulatedClick, error_maps
from ibis_jax.data.sources.volumes import VolumeSample
from ibis_jax.metrics import dice, surface_dice
from ibis_jax.tools.volume import VolumeSegmentationTool, validate_volume

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

    def __post_init__(self):
        if self.slice_rule not in SLICE_RULES:
            raise ValueError(f"slice_rule {self.slice_rule!r}: choose one of {SLICE_RULES}")


class VolumeEpisode(Episode):
    """One volume, one query, a sequence of steps until termination (see the module docstring).

    ``volume``: windowed ``uint8 [D, H, W]`` in view order; ``spacing``: ``(sd, sh, sw)`` mm;
    ``gt_mask``: ``bool [D, H, W]`` when known; ``start_slice``: the first slice on view
    (default the middle one). Each :class:`~ibis_jax.agent.episode.Step` records its ``slice``.
    """

    system_note = VOLUME_PROMPT_NOTE

    def __init__(self, volume: np.ndarray, spacing: Sequence[float], query: str, gt_mask: np.ndarray | None = None,
                 *, config: VolumeEpisodeConfig = VolumeEpisodeConfig(), episode_id: str | None = None,
                 initial_mask: np.ndarray | None = None, start_slice: int | None = None):
        self.volume, self.spacing = validate_volume(volume, spacing)
        self._start(query, gt_mask, config, episode_id, initial_mask)
        self.current_slice = self.depth // 2 if start_slice is None else int(start_slice)
        if not 0 <= self.current_slice < self.depth:
            raise ValueError(f"start_slice {start_slice} out of range for {self.depth} slices")

    # -- geometry ----------------------------------------------------------------------------
    def _check_mask(self, mask: np.ndarray, where: str) -> np.ndarray:
        mask = np.asarray(mask)
        if mask.shape != self.shape:
            raise ValueError(f"{where} shape {mask.shape} differs from the volume's {self.shape}")
        return mask.astype(bool)

    def _on_view(self) -> int:
        return self.current_slice

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.volume.shape)

    @property
    def depth(self) -> int:
        return self.shape[0]

    # -- metrics -----------------------------------------------------------------------------
    @property
    def dices(self) -> list[float]:
        if self.gt_mask is None:
            raise ValueError("this episode has no ground-truth mask")
        return [dice(self.initial_mask, self.gt_mask)] + [s.dice for s in self.steps]

    @property
    def click_dice_curve(self) -> list[float]:
        return [s.dice for s in self.steps if s.is_click]

    def surface_dice(self, tolerance_mm: float = 2.0) -> float:
        if self.gt_mask is None:
            raise ValueError("this episode has no ground-truth mask")
        return surface_dice(self.current_mask, self.gt_mask, self.spacing, tolerance_mm)

    # -- what the policy sees ----------------------------------------------------------------
    def slice_text(self, k: int | None = None) -> str:
        """``Slice 17 of 32 (z = 0.5156).``: slice ``k`` (default the one on view), 1-based, and its z."""
        k = self.current_slice if k is None else k
        return f"Slice {k + 1} of {self.depth} (z = {(k + 0.5) / self.depth:.4f})."

    def user_text(self, step_index: int | None = None, nudge: str = "") -> str:
        """The user text before turn ``step_index`` (default the next): the 2D text and the slice
        that was on view for that turn."""
        step_index = len(self.steps) if step_index is None else step_index
        k = self.steps[step_index].slice if step_index < len(self.steps) else self.current_slice
        return f"{user_turn(step_index, self.query, nudge)}\n{self.slice_text(k)}"

    def observation(self, color: tuple[int, int, int] = DEFAULT_COLOR, alpha: float = DEFAULT_ALPHA) -> np.ndarray:
        """The slice on view (RGB) with the 3D mask's cross-section overlaid."""
        plane = self.volume[self.current_slice]
        rgb = np.repeat(plane[:, :, None], 3, axis=2)
        return render_overlay(rgb, self.current_mask[self.current_slice], color, alpha)

    def open_tool(self, tool: VolumeSegmentationTool) -> None:
        tool.open(self.episode_id, self.volume, self.spacing)

    # -- actions -----------------------------------------------------------------------------
    def _as_action(self, action: Action) -> Action:
        """A 2D click on a volume means the slice on view."""
        if isinstance(action, Click):
            return SliceClick(action.x, action.y, round((self.current_slice + 0.5) / self.depth, 4), action.positive)
        return action

    def as_slice_click(self, action: Click | SliceClick) -> SliceClick:
        return self._as_action(action)

    def tool_request(self, click: SliceClick) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """All clicks so far plus ``click`` as voxel points ``float32 [N, 3]`` (x=col, y=row, z=slice)."""
        self._check_open()
        clicks = self.clicks + [click]
        points = np.array([self.position(c)[::-1] for c in clicks], dtype=np.float32)
        labels = np.array([1 if c.positive else 0 for c in clicks], dtype=np.int32)
        return points, labels, self.tool_logits

    def click_at(self, sim: SimulatedClick) -> SliceClick:
        k = self.current_slice if sim.slice is None else sim.slice
        return SliceClick.from_voxel(k, sim.row, sim.col, *self.shape, sim.positive)

    def position(self, click: SliceClick) -> tuple[int, int, int]:
        """The voxel ``(slice, row, col)`` a click lands on."""
        return click.voxel(*self.shape)

    # -- which slice is on view next ---------------------------------------------------------
    def _after_click(self, prev: np.ndarray, result) -> None:
        self.current_slice = self.next_slice(prev, self.current_mask, result.logits)

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


def episode_for_sample(sample, query: str, *, episode_id: str, max_actions: int = 20, repeat_limit: int = 3,
                       slice_rule: str = "changed") -> Episode:
    """The episode of a source's sample: a :class:`VolumeEpisode` for a ``VolumeSample``, else a 2D
    :class:`~ibis_jax.agent.episode.Episode` (evaluation, synthesis and rollouts build theirs here)."""
    if isinstance(sample, VolumeSample):
        return VolumeEpisode(sample.volume, sample.spacing, query, sample.mask, episode_id=episode_id,
                             config=VolumeEpisodeConfig(max_actions, repeat_limit, slice_rule))
    return Episode(sample.image, query, sample.mask, config=EpisodeConfig(max_actions, repeat_limit),
                   episode_id=episode_id)
