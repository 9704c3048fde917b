"""One cold-start trajectory: the oracle episode for a sample, as a trajectory record.

For each sample (docs/design.md section 3) the click simulator plays the policy through the agent loop,
``run_agent(OraclePolicy(...), tool, [episode])``, with a chosen tool and click rule until the stop
IoU, the click budget, or nothing left to click; then a ``Terminate`` turn with an ``<answer>``.
Each turn gets a user text (query, then refinement turns), template reasoning over oracle facts
(:mod:`ibis_jax.data.reasoning`, replaceable by a teacher), the canonical action text and a loss
weight. A trajectory of T clicks gives T + 1 SFT samples. Self-correction (a deliberately wrong
click and its correction) is the oracle's (:mod:`ibis_jax.agent.oracle`).

A volume sample (``data.sources.volumes``) gives a volume episode: the oracle clicks on the slice on
view while it shows an error (what a policy that sees one slice can learn), else where the volume's
error is deepest (``volume_clicker="slice-then-3d"``), and the view moves by ``slice_rule``; its record holds the slice each turn saw, so SFT trains on it unchanged.

Determinism: every random choice (query style and wording, reasoning templates, the wrong click)
is drawn from generators seeded by ``(seed, sample id)``, so results do not depend on worker order.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ibis_jax.agent.loop import run_agent
from ibis_jax.agent.oracle import OracleScript, OraclePolicy
from ibis_jax.agent.trajectory import record_from_episode
from ibis_jax.agent.volume import episode_for_sample
from ibis_jax.data.queries import QUERY_STYLES, make_query, query_rng
from ibis_jax.data.reasoning import TeacherFn
from ibis_jax.data.records import TrajectoryRecord
from ibis_jax.data.sources.base import Sample, stable_seed
from ibis_jax.tools.auto import assign_episode
from ibis_jax.tools.protocol import SegmentationTool

FILTER_REASONS = ("low_dice", "too_short", "not_reached")


@dataclasses.dataclass(frozen=True)
class SynthConfig:
    """Settings of one synthesis run (all of them go into ``config.json``).

    Attributes:
      rule: click rule, ``ritm`` or ``ibis`` (docs/design.md section 3).
      stop_iou: stop clicking once the mask reaches this IoU (``None``: use the whole budget).
      max_clicks: click budget per trajectory (oracle clicks; a wrong click and its correction
        come on top).
      min_dice: drop trajectories whose final Dice is below this.
      min_clicks: drop trajectories with fewer clicks (absent-target ones excepted).
      drop_unreached: drop trajectories that never reached ``stop_iou``.
      self_correction: probability that a trajectory contains one wrong click and its correction.
      seed: seeds every random choice together with the sample id.
      query_styles: first-turn styles to draw from.
      volume_clicker, slice_rule: volume samples only (the oracle's ``volume_clicker``; the slice on
        view next, ``VolumeEpisodeConfig.slice_rule``).
    """

    rule: str = "ritm"
    stop_iou: float | None = 0.9
    max_clicks: int = 20
    min_dice: float = 0.0
    min_clicks: int = 1
    drop_unreached: bool = False
    self_correction: float = 0.0
    seed: int = 0
    query_styles: tuple[str, ...] = QUERY_STYLES
    volume_clicker: str = "slice-then-3d"
    slice_rule: str = "changed"

    def __post_init__(self):
        if self.rule not in ("ritm", "ibis"):
            raise ValueError(f"rule {self.rule!r}: choose ritm or ibis")
        if self.stop_iou is not None and not 0.0 < self.stop_iou <= 1.0:
            raise ValueError(f"stop_iou {self.stop_iou}: must be in (0, 1]")
        if self.max_clicks < 1:
            raise ValueError(f"max_clicks {self.max_clicks}: must be >= 1")
        if not 0.0 <= self.self_correction <= 1.0:
            raise ValueError(f"self_correction {self.self_correction}: a probability in [0, 1]")


@dataclasses.dataclass
class SynthOutcome:
    """The result for one sample: a record, or the reason it was filtered out."""

    record: TrajectoryRecord
    filtered: str | None
    summary: dict[str, Any]


def synthesize_trajectory(
    sample: Sample,
    tool: SegmentationTool,
    config: SynthConfig = SynthConfig(),
    *,
    teacher: TeacherFn | None = None,
    tool_name: str = "",
) -> SynthOutcome:
    """Runs the oracle episode for ``sample`` and returns its record (see the module docstring).

    Raises ``ToolError`` if the tool fails; the caller decides whether to skip the sample.
    """
    gt = np.asarray(sample.mask, dtype=bool)
    absent = not gt.any()
    text_rng = query_rng(config.seed, sample.sample_id)
    wrong_rng = np.random.default_rng(stable_seed(config.seed, "self-correction", sample.sample_id))
    query = make_query(sample.target, sample.modality, text_rng, absent=absent, styles=config.query_styles)
    wrong_at = None
    if not absent and config.self_correction > 0 and wrong_rng.random() < config.self_correction:
        wrong_at = int(wrong_rng.integers(1, 4))  # an early refinement turn, after the first mask

    # The oracle stops when its click would repeat, so the episode's own three-repeats rule must
    # not end a synthesized trajectory before its terminate turn.
    episode = episode_for_sample(sample, query.text, episode_id=f"synth:{sample.sample_id}",
                                 max_actions=config.max_clicks + 3, repeat_limit=config.max_clicks + 4,
                                 slice_rule=config.slice_rule)
    oracle = OraclePolicy(config.rule, config.stop_iou, config.max_clicks, volume_clicker=config.volume_clicker)
    oracle.add_script(episode.episode_id, OracleScript(sample.target, sample.modality, text_rng, wrong_rng,
                                                       wrong_at, teacher))
    assign_episode(tool, episode.episode_id, sample.modality, sample.target)
    [trace] = run_agent(oracle, tool, [episode])
    tags = [t.tag for t in trace.turns]
    wrong_step = tags.index("wrong") if "wrong" in tags else None

    record = record_from_episode(
        episode, record_id=sample.sample_id, target=sample.target, modality=sample.modality,
        user_turns=[t.user_text for t in trace.turns], tags=tags, query_style=query.style, source=sample.source,
        sample_id=sample.sample_id,
        meta={
            "tool": tool_name, "rule": config.rule, "stop_iou": config.stop_iou, "max_clicks": config.max_clicks,
            "seed": config.seed, "self_correction": wrong_step is not None, "wrong_step": wrong_step,
            "reached": bool(config.stop_iou is None or episode.ious[-1] >= config.stop_iou),
            "provenance": sample.provenance,
        },
    )
    filtered = None
    if not absent:
        if record.final_dice < config.min_dice:
            filtered = "low_dice"
        elif record.num_clicks < config.min_clicks:
            filtered = "too_short"
        elif config.drop_unreached and not record.meta["reached"]:
            filtered = "not_reached"
    summary = {
        "id": record.record_id, "modality": record.modality, "target": record.target,
        "clicks": record.num_clicks, "sft_samples": record.num_sft_samples,
        "iou": record.final_iou, "dice": record.final_dice, "reached": record.meta["reached"],
        "self_correction": wrong_step is not None, "absent": absent, "query_style": query.style,
    }
    return SynthOutcome(record, filtered, summary)
