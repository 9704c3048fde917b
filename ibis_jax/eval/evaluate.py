"""Evaluation: a policy with a tool over a source's samples, scored like the paper (docs/design.md section 6).

:func:`evaluate` runs the agent loop (:func:`ibis_jax.agent.loop.run_agent`, batched) on every
sample, then reports mean IoU / Dice overall, per modality and per target, average steps,
termination reasons, the parse-failure rate and time per case (generation and tool apart). It also
reports the interactive-segmentation metrics NoC@85/@90, NoF@90 and mIoU@k over click IoU curves:

- for the oracle (the click simulator) the curves come from *fixed-click* episodes with early stop
  off (docs/design.md section 3): ``curve_clicks`` clicks unless nothing is left to click, the curve padded
  with its last value, exactly as ``run_oracle`` + ``oracle_iou_curve`` produce them;
- for a model policy they are its own clicks (a curve that ended early keeps its last IoU).

Samples whose target is absent (empty ground truth) count in IoU / Dice (an empty answer scores
1.0) but not in the curves, which need something to click.

Volume sources (``data.sources.volumes``) run the same way as volume episodes (``agent/volume.py``)
with a volume tool: IoU, Dice and the curves are 3D, and the cases add the normalised surface Dice
at ``nsd_tolerance_mm`` (``mean_nsd``). Volume evaluations write no trajectory records or example
pictures (records hold one 2D image).

Outputs (``out_dir``): ``metrics.json``, ``metrics.md`` (tables laid out like the paper's),
``cases.jsonl`` (one line per episode), ``trajectories-00000-of-00001.array_record`` (one
``TrajectoryRecord`` per episode, the shape synthesis writes) and ``examples/`` (pictures and
HTML reports of a few episodes).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ibis_jax.agent.conversation import HistoryMode
from ibis_jax.agent.episode import END_REASONS, Episode
from ibis_jax.agent.grammar import is_well_formed
from ibis_jax.agent.loop import EpisodeTrace, Policy, run_agent
from ibis_jax.agent.oracle import oracle_iou_curve
from ibis_jax.agent.trajectory import record_from_episode
from ibis_jax.agent.volume import VolumeEpisode, episode_for_sample
from ibis_jax.data.queries import sample_query
from ibis_jax.data.records import ShardWriter, TrajectoryRecord, shard_name, to_jsonable, write_json_atomic
from ibis_jax.data.sources.base import Sample, Source, SourceError
from ibis_jax.data.sources.volumes import VolumeSample
from ibis_jax.metrics import dice, interactive_summary
from ibis_jax.tools.auto import assign_episode
from ibis_jax.tools.protocol import SegmentationTool


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """How an evaluation runs.

    Attributes:
      history: what the policy sees each turn (``none``: the current overlay; ``full``: every turn;
        None: what the policy was trained with, its ``settings.history``).
      max_steps: actions per episode (the episode's ``max_actions``; docs/design.md section 1: 20).
      batch_size: episodes per batched ``run_agent`` call (one policy call per round).
      max_rows: sampler rows of each ``run_agent`` call (continuous batching: a finished episode's
        row takes the call's next episode; set ``batch_size`` above it); None: one row per episode.
        Greedy episodes do not depend on it.
      limit: evaluate only the first N samples.
      query_style: first-turn query style (``direct``: "Segment the liver in this CT scan.").
      curve_clicks: clicks of the interactive curves (NoC budget); ks: the mIoU@k points.
      on_error: a bad source item stops the run (``raise``) or is counted and skipped (``skip``).
      num_examples: episodes drawn under ``examples/`` (one per modality first).
      policy_name, tool_name, source_name: labels written into the metrics and tables.
      nsd_tolerance_mm, slice_rule: volumes only (surface Dice tolerance; the slice on view next).
    """

    history: HistoryMode | None = None
    max_steps: int = 20
    batch_size: int = 8
    max_rows: int | None = None
    limit: int | None = None
    query_style: str = "direct"
    seed: int = 0
    curve_clicks: int = 20
    ks: tuple[int, ...] = (1, 3, 5)
    on_error: str = "raise"
    num_examples: int = 4
    policy_name: str = "policy"
    tool_name: str = "tool"
    source_name: str = ""
    nsd_tolerance_mm: float = 2.0
    slice_rule: str = "changed"


@dataclasses.dataclass
class CaseResult:
    """One evaluated episode. ``curve`` is the click IoU curve the interactive metrics read."""

    sample_id: str
    target: str
    modality: str
    query: str
    iou: float
    dice: float
    clicks: int
    turns: int
    end_reason: str
    parse_failure: bool
    well_formed_turns: int  # turns that pass the strict format check (the format reward's)
    generate_seconds: float
    tool_seconds: float
    empty_gt: bool
    curve: list[float] = dataclasses.field(default_factory=list)
    # Grounding: the first action is a positive click inside the target (None: empty target).
    first_click_hit: bool | None = None
    nsd: float | None = None  # volumes: normalised surface Dice at EvalConfig.nsd_tolerance_mm


# -- samples -------------------------------------------------------------------------------------

def iter_samples(source: Source, *, limit: int | None = None, on_error: str = "raise",
                 skipped: Counter | None = None) -> Iterator[Sample]:
    """The source's samples in order, at most ``limit``; bad items raise or are counted by reason."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    count = 0
    for item in source.items():
        try:
            for sample in source.load(item):
                if limit is not None and count >= limit:
                    return
                count += 1
                yield sample
        except SourceError as e:
            if on_error == "raise":
                raise
            if skipped is not None:
                skipped[e.reason] += 1
        if limit is not None and count >= limit:
            return


def _batches(samples: Iterator[Sample], size: int) -> Iterator[list[Sample]]:
    batch: list[Sample] = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# -- running -------------------------------------------------------------------------------------

def make_episode(sample: Sample | VolumeSample, query: str, config: EvalConfig, episode_id: str,
                 max_actions: int | None = None) -> Episode:
    return episode_for_sample(sample, query, episode_id=episode_id, slice_rule=config.slice_rule,
                              max_actions=config.max_steps if max_actions is None else max_actions)


def _case(sample: Sample, episode: Episode, trace: EpisodeTrace, curve: list[float], config: EvalConfig) -> CaseResult:
    final = episode.current_mask
    return CaseResult(
        sample_id=sample.sample_id, target=sample.target, modality=sample.modality, query=episode.query,
        iou=float(episode.ious[-1]), dice=float(dice(final, episode.gt_mask)), clicks=len(episode.clicks),
        turns=len(episode.steps), end_reason=episode.end_reason or "",
        parse_failure=any(s.parse_error is not None for s in episode.steps),
        well_formed_turns=sum(is_well_formed(s.text) for s in episode.steps),
        generate_seconds=float(trace.generate_seconds),
        tool_seconds=float(sum(s.tool_seconds for s in episode.steps)),
        empty_gt=not bool(episode.gt_mask.any()), curve=[float(v) for v in curve],
        first_click_hit=first_click_hit(episode),
        nsd=episode.surface_dice(config.nsd_tolerance_mm) if isinstance(episode, VolumeEpisode) else None,
    )


def first_click_hit(episode: Episode) -> bool | None:
    """Whether the episode opens with a positive click on the target (None when it has none)."""
    if not episode.gt_mask.any():
        return None
    first = episode.steps[0] if episode.steps else None
    if first is None or not first.is_click or not first.action.positive:
        return False
    return bool(episode.gt_mask[episode.position(first.action)])


def fixed_click_curves(policy: Policy, tool: SegmentationTool, samples: Sequence[Sample],
                       curve_clicks: int, config: EvalConfig = EvalConfig()) -> list[list[float]]:
    """IoU curves with early stop off: ``policy.with_budget(curve_clicks)`` clicks (fewer only when
    nothing is left to click), padded with the last value (``oracle_iou_curve``)."""
    clicker = policy.with_budget(curve_clicks)
    # room for the clicks and the terminate
    episodes = [make_episode(s, "", config, f"curve-{i}-{s.sample_id}", curve_clicks + 1) for i, s in enumerate(samples)]
    for sample, episode in zip(samples, episodes):
        assign_episode(tool, episode.episode_id, sample.modality, sample.target)
    run_agent(clicker, tool, episodes)
    return [oracle_iou_curve(e, curve_clicks) for e in episodes]


def _curve_kind(policy: Policy, config: EvalConfig) -> tuple[str, bool, bool]:
    """(description, whether fixed-click curves are run, whether the main episodes already are them)."""
    if hasattr(policy, "with_budget"):
        reuse = getattr(policy, "fixed_clicks", False) and getattr(policy, "max_clicks", None) == config.curve_clicks \
            and config.max_steps >= config.curve_clicks
        return "oracle fixed clicks, early stop off (docs/design.md section 3)", True, reuse
    return "policy clicks (a curve that ended early keeps its last IoU)", False, False


def evaluate(
    policy: Policy,
    tool: SegmentationTool,
    source: Source,
    *,
    config: EvalConfig = EvalConfig(),
    out_dir: str | Path | None = None,
    show_progress: bool = False,
) -> dict[str, Any]:
    """Evaluates ``policy`` with ``tool`` on ``source``; returns the metrics dict (see the module
    docstring) and, with ``out_dir``, writes it with the tables, cases, records and examples."""
    start = time.perf_counter()
    out = Path(out_dir) if out_dir is not None else None
    writer = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        writer = ShardWriter(out / shard_name(0, 1))
    curve_kind, fixed, reuse = _curve_kind(policy, config)
    skipped: Counter = Counter()
    cases: list[CaseResult] = []
    records: list[TrajectoryRecord] = []
    progress = None
    samples = iter_samples(source, limit=config.limit, on_error=config.on_error, skipped=skipped)
    try:
        for batch in _batches(samples, max(1, config.batch_size)):
            if show_progress and progress is None:  # after the first samples load: a bad source
                from tqdm import tqdm                # fails with its one-line error and no bar

                progress = tqdm(desc="eval episodes", unit="episode")
            episodes = [make_episode(s, sample_query(s, config.query_style, config.seed), config, f"eval-{len(cases) + i}")
                        for i, s in enumerate(batch)]
            for sample, episode in zip(batch, episodes):
                assign_episode(tool, episode.episode_id, sample.modality, sample.target)
            traces = run_agent(policy, tool, episodes, history=config.history, max_rows=config.max_rows)
            clickable = [s for s in batch if s.mask.any()]
            if fixed and not reuse and clickable:
                curves = iter(fixed_click_curves(policy, tool, clickable, config.curve_clicks, config))
            else:
                curves = iter([oracle_iou_curve(e, config.curve_clicks) if reuse else e.click_iou_curve
                               for s, e in zip(batch, episodes) if s.mask.any()])
            for sample, episode, trace in zip(batch, episodes, traces):
                curve = next(curves) if sample.mask.any() else []
                case = _case(sample, episode, trace, curve, config)
                cases.append(case)
                if isinstance(episode, VolumeEpisode):
                    continue  # a record holds one 2D image (module docstring)
                record = record_from_episode(
                    episode, record_id=sample.sample_id, target=sample.target, modality=sample.modality,
                    user_turns=[t.user_text or episode.user_text(i) for i, t in enumerate(trace.turns)],
                    tags=[t.tag or "policy" for t in trace.turns],
                    query_style=config.query_style, source=sample.source, sample_id=sample.sample_id,
                    meta={"policy": config.policy_name, "tool": config.tool_name, "history": config.history,
                          "generate_seconds": case.generate_seconds, "tool_seconds": case.tool_seconds,
                          "provenance": to_jsonable(sample.provenance)},
                )
                if writer is not None:
                    writer.write(record)
                if len(records) < 200:  # enough to pick examples from, bounded memory
                    records.append(record)
            if progress is not None:
                progress.update(len(batch))
        if writer is not None:
            writer.commit()
    finally:
        if progress is not None:
            progress.close()
        if writer is not None and writer.tmp.exists():
            writer.abort()
    if not cases:
        raise ValueError(f"source {config.source_name or type(source).__name__!r} yielded no samples to evaluate "
                         f"(skipped: {dict(skipped) or 'none'}); check the source arguments and --limit")
    metrics = summarize_cases(cases, config=config, curve_kind=curve_kind)
    metrics["skipped"] = dict(skipped)
    metrics["seconds"] = round(time.perf_counter() - start, 2)
    if out is not None:
        from ibis_jax.eval.report import format_markdown
        from ibis_jax.report.examples import write_examples

        metrics["records"] = str(out / shard_name(0, 1)) if records else None
        metrics["examples"] = [str(p) for p in write_examples(records, out / "examples", config.num_examples)]
        from ibis_jax.fileio import atomic_write_text

        atomic_write_text(out / "cases.jsonl", "".join(json.dumps(dataclasses.asdict(c)) + "\n" for c in cases))
        write_json_atomic(out / "metrics.json", metrics)
        atomic_write_text(out / "metrics.md", format_markdown(metrics))
    return metrics


# -- aggregation ---------------------------------------------------------------------------------

def _mean(values: Sequence[float]) -> float:
    return float(statistics.fmean(values)) if values else float("nan")


def segmentation_summary(cases: Sequence[CaseResult]) -> dict[str, Any]:
    """Mean IoU / Dice, steps, end reasons, parse failures and time per case of a group."""
    reasons = Counter(c.end_reason for c in cases)
    turns = sum(c.turns for c in cases)
    return {
        "samples": len(cases),
        "mean_iou": _mean([c.iou for c in cases]),
        "mean_dice": _mean([c.dice for c in cases]),
        "median_iou": float(np.median([c.iou for c in cases])) if cases else float("nan"),
        # Steps = click actions (tool calls); the terminate turn is counted in avg_turns.
        "avg_steps": _mean([c.clicks for c in cases]),
        "avg_turns": _mean([c.turns for c in cases]),
        "end_reasons": {r: reasons[r] for r in END_REASONS if reasons[r]},
        # Per episode: a turn that does not parse ends the episode, so at most one per case.
        "parse_failure_rate": _mean([float(c.parse_failure) for c in cases]),
        "parse_failures_per_turn": (sum(c.parse_failure for c in cases) / turns) if turns else 0.0,
        "well_formed_rate": (sum(c.well_formed_turns for c in cases) / turns) if turns else float("nan"),
        "first_click_hit_rate": _mean([float(c.first_click_hit) for c in cases if c.first_click_hit is not None]),
        "generate_seconds_per_case": _mean([c.generate_seconds for c in cases]),
        "tool_seconds_per_case": _mean([c.tool_seconds for c in cases]),
        **({"mean_nsd": _mean([c.nsd for c in cases])} if any(c.nsd is not None for c in cases) else {}),
    }


def summarize_cases(cases: Sequence[CaseResult], *, config: EvalConfig, curve_kind: str) -> dict[str, Any]:
    """The metrics dict of an evaluation (the content of ``metrics.json``)."""
    by_modality: dict[str, list[CaseResult]] = defaultdict(list)
    by_target: dict[str, list[CaseResult]] = defaultdict(list)
    for case in cases:
        by_modality[case.modality].append(case)
        by_target[f"{case.modality}/{case.target}"].append(case)
    ks = tuple(k for k in config.ks if k <= config.curve_clicks)

    def interactive(group: Sequence[CaseResult]) -> dict[str, float]:
        curves = [c.curve for c in group if not c.empty_gt]
        return {"samples": len(curves), **(interactive_summary(curves, config.curve_clicks, ks) if curves else {})}

    return {
        "policy": config.policy_name,
        "tool": config.tool_name,
        "source": config.source_name,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()},
        "samples": len(cases),
        "overall": segmentation_summary(cases),
        "per_modality": {m: segmentation_summary(g) for m, g in sorted(by_modality.items())},
        "per_target": {t: segmentation_summary(g) for t, g in sorted(by_target.items())},
        "interactive": {
            "curve": curve_kind,
            "max_clicks": config.curve_clicks,
            "overall": interactive(cases),
            "per_modality": {m: interactive(g) for m, g in sorted(by_modality.items())},
        },
    }
