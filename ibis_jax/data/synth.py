"""Cold-start trajectory synthesis: oracle episodes over a source, written as trajectory records.

For each sample (SPEC section 3): the click simulator plays the policy with a chosen tool and click
rule until the stop IoU, the click budget, or nothing left to click; then a ``Terminate`` turn with
an ``<answer>``. Each turn gets a user text (query, then refinement turns), template reasoning over
oracle facts (:mod:`ibis_jax.data.reasoning`, replaceable by a teacher), the canonical action text
and a loss weight. A trajectory of T clicks gives T + 1 SFT samples.

Self-correction (paper): with probability ``self_correction`` a trajectory gets one deliberately
wrong click (a positive click on background or a negative click inside the covered target) at an
early step; its turn has loss weight 0; the next turn's reasoning notices what the wrong click did
and undoes it with a click in the region the wrong click spoiled.

Determinism: every random choice (query style and wording, reasoning templates, the wrong click)
is drawn from generators seeded by ``(seed, sample id)``, so results do not depend on worker order.

Runs are sharded (:func:`run_synthesis`): the source's items are cut into fixed shards; a shard is
written to a temporary file and renamed with its stats sidecar when complete, so a rerun skips
finished shards and a crash never leaves a half record behind.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import statistics
import time
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from ibis_jax.agent.episode import Episode, EpisodeConfig
from ibis_jax.agent.grammar import Click
from ibis_jax.agent.prompts import user_turn
from ibis_jax.data.clicks import SimulatedClick, next_click
from ibis_jax.data.images import ImageError
from ibis_jax.data.queries import QUERY_STYLES, make_query, make_refinement, query_rng
from ibis_jax.data.reasoning import TeacherFn, compute_facts, location_words, template_answer, template_reasoning
from ibis_jax.data.records import (
    ShardWriter,
    TrajectoryDataSource,
    TrajectoryRecord,
    record_from_episode,
    shard_name,
    shard_problem,
    write_json_atomic,
)
from ibis_jax.data.sources.base import Item, Sample, Source, SourceError, stable_seed
from ibis_jax.data.windowing import WindowError
from ibis_jax.fileio import PARTIAL, atomic_write_text, read_json, write_png_atomic
from ibis_jax.report.pictures import trajectory_picture
from ibis_jax.tools import make_tool
from ibis_jax.tools.protocol import SegmentationTool, ToolError, tool_session

FILTER_REASONS = ("low_dice", "too_short", "not_reached")
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SynthConfig:
    """Settings of one synthesis run (all of them go into ``config.json``).

    Attributes:
      rule: click rule, ``ritm`` or ``ibis`` (SPEC section 3).
      stop_iou: stop clicking once the mask reaches this IoU (``None``: use the whole budget).
      max_clicks: click budget per trajectory (oracle clicks; a wrong click and its correction
        come on top).
      min_dice: drop trajectories whose final Dice is below this.
      min_clicks: drop trajectories with fewer clicks (absent-target ones excepted).
      drop_unreached: drop trajectories that never reached ``stop_iou``.
      self_correction: probability that a trajectory contains one wrong click and its correction.
      seed: seeds every random choice together with the sample id.
      query_styles: first-turn styles to draw from.
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


# -- clicks beyond the plain oracle ----------------------------------------------------------------

def _deepest(region: np.ndarray, clicked: np.ndarray) -> tuple[int, int] | None:
    """The pixel of ``region`` farthest from its boundary (image border counts), not yet clicked."""
    dist = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
    dist[clicked] = 0
    if dist.max() <= 0:
        return None
    row, col = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return int(row), int(col)


def wrong_click(gt: np.ndarray, mask: np.ndarray, clicked: np.ndarray, rng: np.random.Generator) -> SimulatedClick | None:
    """A deliberately wrong click: positive on clear background or negative on covered target.

    Candidates keep a margin from the target boundary (3% of the image side) so the click is
    unambiguously wrong, not a boundary judgement call.
    """
    margin = max(2.0, 0.03 * max(gt.shape))
    options = []
    background = ndimage.distance_transform_edt(~gt) >= margin
    bg = background & ~mask & ~clicked
    if bg.any():
        options.append((bg, True))
    covered = ndimage.distance_transform_edt(np.pad(gt & mask, 1))[1:-1, 1:-1] >= margin
    tp = covered & ~clicked
    if tp.any():
        options.append((tp, False))
    if not options:
        return None
    region, positive = options[int(rng.integers(len(options)))]
    rows, cols = np.nonzero(region)
    pick = int(rng.integers(len(rows)))
    return SimulatedClick(int(rows[pick]), int(cols[pick]), positive)


def correction_click(
    gt: np.ndarray, before: np.ndarray, after: np.ndarray, clicked: np.ndarray
) -> tuple[SimulatedClick | None, str]:
    """The click undoing a wrong one: into the larger error the wrong click *created*.

    Returns ``(click, effect)`` with effect ``excess`` (new false positive -> negative click),
    ``missed`` (new false negative -> positive click) or ``none`` (the mask did not get worse;
    the caller falls back to the normal oracle click).
    """
    new_fp = (after & ~gt) & ~(before & ~gt)
    new_fn = (gt & ~after) & ~(gt & ~before)
    effect, region = ("excess", new_fp) if new_fp.sum() >= new_fn.sum() else ("missed", new_fn)
    if not region.any():
        return None, "none"
    pixel = _deepest(region, clicked)
    if pixel is None:
        return None, "none"
    return SimulatedClick(pixel[0], pixel[1], effect == "missed"), effect


# -- one trajectory --------------------------------------------------------------------------------

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

    # Repeats are handled below (the oracle stops when its click would repeat), so the episode's
    # own three-repeats rule must not end a synthesized trajectory before its terminate turn.
    episode_config = EpisodeConfig(max_actions=config.max_clicks + 3, repeat_limit=config.max_clicks + 4)
    episode = Episode(sample.image, query.text, gt, config=episode_config, episode_id=f"synth:{sample.sample_id}")
    height, width = gt.shape
    clicked = np.zeros(gt.shape, dtype=bool)
    user_turns: list[str] = []
    tags: list[str] = []
    oracle_clicks = 0
    pending: tuple[np.ndarray, str] | None = None  # (mask before the wrong click, its location)
    wrong_step: int | None = None

    def facts_for(action: str, kind: str, click: SimulatedClick | None = None, **extra):
        return compute_facts(
            gt, episode.current_mask, step_index=len(episode.steps), target=sample.target,
            modality=sample.modality, action=action, kind=kind,
            click=None if click is None else (click.row, click.col), **extra,
        )

    def reasoning_for(facts) -> str:
        draft = template_reasoning(facts, text_rng)
        return teacher(facts, draft) if teacher is not None else draft

    def next_user_text() -> str:
        t = len(episode.steps)
        nudge = make_refinement(sample.target, sample.modality, text_rng).text if t > 0 else ""
        return user_turn(t, query.text, nudge)

    def click(sim: SimulatedClick, kind: str, weight: float, **extra) -> None:
        facts = facts_for("positive" if sim.positive else "negative", kind, sim, **extra)
        user_turns.append(next_user_text())
        tags.append(kind)
        clicked[sim.row, sim.col] = True
        action = Click.from_pixel(sim.row, sim.col, height, width, sim.positive)
        episode.step(action, tool, reasoning=reasoning_for(facts), loss_weight=weight)

    def finish(kind: str, reached: bool) -> None:
        facts = facts_for("terminate", kind, reached=reached)
        user_turns.append(next_user_text())
        tags.append(kind)
        episode.terminate(reasoning=reasoning_for(facts), answer=template_answer(facts, text_rng))

    with tool_session(tool, episode.episode_id, episode.image):
        while True:
            mask = episode.current_mask
            reached = config.stop_iou is not None and episode.ious[-1] >= config.stop_iou
            if absent:
                finish("absent", True)
                break
            if pending is None and (reached or oracle_clicks >= config.max_clicks):
                finish("final", reached or config.stop_iou is None)
                break
            if wrong_at is not None and wrong_step is None and len(episode.steps) >= wrong_at and pending is None:
                sim = wrong_click(gt, mask, clicked, wrong_rng)
                if sim is not None:
                    wrong_step = len(episode.steps)
                    pending = (mask, location_words(sim.row, sim.col, height, width))
                    click(sim, "wrong", 0.0)
                    continue
                wrong_at = None  # no safe wrong click exists on this mask: skip self-correction
            kind = "first" if not episode.steps else "oracle"
            extra: dict[str, Any] = {}
            sim = None
            if pending is not None:
                before, location = pending
                pending = None
                sim, effect = correction_click(gt, before, mask, clicked)
                kind, extra = "correction", {"wrong_effect": effect, "wrong_location": location}
            if sim is None:
                sim = next_click(gt, mask, rule=config.rule, clicked=clicked)
            last = episode.clicks[-1] if episode.clicks else None
            repeat = (
                sim is not None and last is not None and last.positive == sim.positive
                and last.pixel(width, height) == (sim.col, sim.row)
            )
            if sim is None or repeat:  # nothing left to click, or the tool stopped responding
                finish("final", reached)
                break
            click(sim, kind, 1.0, **extra)
            if kind != "correction":
                oracle_clicks += 1

    record = record_from_episode(
        episode, record_id=sample.sample_id, target=sample.target, modality=sample.modality,
        user_turns=user_turns, tags=tags, query_style=query.style, source=sample.source,
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


# -- tools and teachers by name --------------------------------------------------------------------

def load_callable(path: str) -> Callable:
    """``"package.module:function"`` -> the function (for teachers and custom tools)."""
    module, sep, name = path.partition(":")
    if not sep:
        raise ValueError(f"{path!r}: write module.path:function")
    return getattr(importlib.import_module(module), name)


# -- shards ----------------------------------------------------------------------------------------

def shard_items(items: Sequence[Item], shard_size: int) -> list[list[Item]]:
    """Cuts the item list into consecutive shards of ``shard_size`` (the last may be shorter)."""
    if shard_size < 1:
        raise ValueError(f"shard_size {shard_size}: must be >= 1")
    return [list(items[i : i + shard_size]) for i in range(0, len(items), shard_size)] or [[]]


def shard_stats_path(out_dir: Path, index: int, count: int) -> Path:
    return out_dir / shard_name(index, count).replace(".array_record", ".stats.json")


def shard_done(out_dir: Path, index: int, count: int) -> bool:
    """A shard is finished when its manifest entry matches its records (``records.shard_problem``)
    and its stats sidecar was renamed into place."""
    return shard_redo_reason(out_dir, index, count) is None


def shard_redo_reason(out_dir: Path, index: int, count: int) -> str | None:
    """Why shard ``index`` must be (re-)synthesized, or ``None`` when it is done."""
    problem = shard_problem(out_dir / shard_name(index, count))
    if problem is None and not shard_stats_path(out_dir, index, count).is_file():
        problem = "no stats sidecar: its write did not finish"
    return problem


def process_shard(
    source: Source,
    items: Sequence[Item],
    index: int,
    count: int,
    out_dir: str | Path,
    config: SynthConfig,
    tool: SegmentationTool,
    *,
    tool_name: str = "",
    on_error: str = "raise",
    teacher: TeacherFn | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Synthesizes one shard and writes it atomically; returns (and writes) its stats.

    With ``on_error="raise"`` the first bad item raises (naming the file) and the shard's
    temporary file is removed; with ``"skip"`` bad items are counted by reason and skipped.
    """
    out_dir = Path(out_dir)
    stats: dict[str, Any] = {
        "shard": index, "items": len(items), "samples": 0, "trajectories": [],
        "skipped": Counter(), "skipped_items": [], "filtered": Counter(), "seconds": 0.0,
    }
    start = time.perf_counter()

    def skip(item: Item, reason: str, error: Exception) -> None:
        if on_error == "raise":
            raise error
        stats["skipped"][reason] += 1
        stats["skipped_items"].append({"item": item.item_id, "reason": reason, "error": str(error)})

    with ShardWriter(out_dir / shard_name(index, count)) as writer:
        for item in items:
            try:
                samples = list(source.load(item))  # a whole item loads or is skipped: no half volumes
            except SourceError as e:
                skip(item, e.reason, e)
                samples = []
            except (ImageError, WindowError) as e:
                skip(item, "bad_mask" if "mask" in str(e) else "corrupt_image", SourceError(item.item_id, "corrupt_image", str(e)))
                samples = []
            except Exception as e:  # a bug or an unforeseen format: name the item, keep the trace
                if on_error == "raise":
                    raise
                stats["skipped"]["unexpected"] += 1
                stats["skipped_items"].append({"item": item.item_id, "reason": "unexpected",
                                               "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc(limit=3)})
                samples = []
            for sample in samples:
                stats["samples"] += 1
                try:
                    outcome = synthesize_trajectory(sample, tool, config, teacher=teacher, tool_name=tool_name)
                except (ToolError, ImageError) as e:
                    skip(item, "tool_error", SourceError(sample.sample_id, "tool_error", f"tool failed: {e}"))
                    continue
                if outcome.filtered:
                    stats["filtered"][outcome.filtered] += 1
                    continue
                writer.write(outcome.record)
                stats["trajectories"].append(outcome.summary)
            if progress is not None:
                progress(1)
        stats["seconds"] = round(time.perf_counter() - start, 3)
        stats["skipped"] = dict(stats["skipped"])
        stats["filtered"] = dict(stats["filtered"])
        # Records first, then the sidecar: a shard counts as done only when both exist.
        writer.commit()
        write_json_atomic(shard_stats_path(out_dir, index, count), stats)
    return stats


# -- stats -----------------------------------------------------------------------------------------

TABLE_COLUMNS = ("Modality", "Samples", "Steps+1 samples", "Avg. length", "Mean IoU", "Median IoU",
                 "Mean Dice", "Median Dice")


def _row(trajectories: list[dict[str, Any]]) -> dict[str, Any]:
    ious = [t["iou"] for t in trajectories]
    dices = [t["dice"] for t in trajectories]
    return {
        "samples": len(trajectories),
        "sft_samples": sum(t["sft_samples"] for t in trajectories),
        "avg_length": float(np.mean([t["clicks"] for t in trajectories])) if trajectories else 0.0,
        "mean_iou": float(np.mean(ious)) if ious else float("nan"),
        "median_iou": float(statistics.median(ious)) if ious else float("nan"),
        "mean_dice": float(np.mean(dices)) if dices else float("nan"),
        "median_dice": float(statistics.median(dices)) if dices else float("nan"),
        "reached": sum(1 for t in trajectories if t["reached"]),
        "self_correction": sum(1 for t in trajectories if t["self_correction"]),
        "absent": sum(1 for t in trajectories if t.get("absent")),
    }


def aggregate_stats(shards: Sequence[dict[str, Any]], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Table-6 style statistics per modality and overall, plus skip/filter counts by reason.

    ``avg_length`` is the mean number of clicks T per trajectory; ``sft_samples`` sums T + 1.
    """
    trajectories = [t for s in shards for t in s["trajectories"]]
    by_modality: dict[str, list[dict[str, Any]]] = {}
    for t in trajectories:
        by_modality.setdefault(t["modality"], []).append(t)
    skipped, filtered = Counter(), Counter()
    for s in shards:
        skipped.update(s.get("skipped", {}))
        filtered.update(s.get("filtered", {}))
    return {
        "modalities": {m: _row(ts) for m, ts in sorted(by_modality.items())},
        "all": _row(trajectories),
        "items": sum(s["items"] for s in shards),
        "samples_loaded": sum(s["samples"] for s in shards),
        "skipped": dict(sorted(skipped.items())),
        "filtered": dict(sorted(filtered.items())),
        "skipped_items": [x for s in shards for x in s.get("skipped_items", [])][:200],
        "shards": len(shards),
        "shard_seconds": round(sum(s.get("seconds", 0.0) for s in shards), 2),
        **(extra or {}),
    }


def format_table(stats: dict[str, Any]) -> str:
    """The stats as a Markdown table with the paper's Table 6 columns."""
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    rows = list(stats["modalities"].items()) + [("All", stats["all"])]
    for name, r in rows:
        lines.append(
            f"| {name} | {r['samples']} | {r['sft_samples']} | {r['avg_length']:.2f} | {r['mean_iou']:.4f} | "
            f"{r['median_iou']:.4f} | {r['mean_dice']:.4f} | {r['median_dice']:.4f} |"
        )
    return "\n".join(lines)


# -- pictures --------------------------------------------------------------------------------------

def decode_mask(rle: dict[str, Any]) -> np.ndarray:
    from ibis_jax.data.rle import decode_rle

    return decode_rle(rle)


def write_examples(out_dir: Path, num: int = 6) -> list[Path]:
    """Pictures of up to ``num`` trajectories (one per modality first) under ``out_dir/examples``."""
    source = TrajectoryDataSource(out_dir)
    if len(source) == 0 or num <= 0:
        return []
    picked: list[int] = []
    seen: set[str] = set()
    records = [source[i] for i in range(min(len(source), 400))]
    for i, record in enumerate(records):  # one per modality, preferring self-corrected ones
        if record.modality not in seen and record.num_clicks >= 2:
            picked.append(i)
            seen.add(record.modality)
    sc = [i for i, r in enumerate(records) if r.meta.get("self_correction") and i not in picked]
    picked += sc[:1]
    picked += [i for i in range(len(records)) if i not in picked][: max(0, num - len(picked))]
    folder = out_dir / "examples"
    folder.mkdir(exist_ok=True)
    paths = []
    for i in picked[:num]:
        record = records[i]
        path = folder / (record.record_id.replace("/", "_") + ".png")
        write_png_atomic(path, trajectory_picture(record))
        paths.append(path)
    return paths


def load_shard_stats(out_dir: Path, count: int) -> list[dict[str, Any]]:
    return [read_json(shard_stats_path(out_dir, i, count), "shard stats") for i in range(count)
            if shard_done(out_dir, i, count)]


# -- a whole run -----------------------------------------------------------------------------------

class ConfigMismatch(RuntimeError):
    """The output folder holds a dataset made with other settings."""


_WORKER: dict[str, Any] = {}


def _worker_init(source, config, tool_name, on_error, teacher_path, out_dir, count, queue) -> None:
    _WORKER.update(source=source, config=config, tool=make_tool(tool_name), tool_name=tool_name,
                   on_error=on_error, teacher=load_callable(teacher_path) if teacher_path else None,
                   out_dir=out_dir, count=count, queue=queue)


def _worker_run(job: tuple[int, list[Item]]) -> dict[str, Any]:
    index, items = job
    w = _WORKER
    return process_shard(w["source"], items, index, w["count"], w["out_dir"], w["config"], w["tool"],
                         tool_name=w["tool_name"], on_error=w["on_error"], teacher=w["teacher"],
                         progress=lambda n: w["queue"].put(n))


def run_synthesis(
    source: Source,
    out_dir: str | Path,
    config: SynthConfig = SynthConfig(),
    *,
    tool_name: str = "classical",
    shard_size: int = 64,
    workers: int = 1,
    on_error: str = "raise",
    limit: int | None = None,
    teacher: str | None = None,
    num_examples: int = 6,
    overwrite: bool = False,
    show_progress: bool = True,
    source_args: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Synthesizes a dataset into ``out_dir``; returns the aggregated stats (also ``stats.json``).

    Resumable: ``config.json`` pins the settings; finished shards are skipped on a rerun with the
    same settings; a rerun with other settings raises :class:`ConfigMismatch` unless ``overwrite``.
    """
    from tqdm import tqdm

    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error {on_error!r}: choose raise or skip")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    items = source.items()
    if limit is not None:
        items = items[: max(0, limit)]
    shards = shard_items(items, shard_size)
    count = len(shards)
    settings = {
        "source": getattr(source, "name", type(source).__name__),
        "source_args": source_args if source_args is not None else _jsonable(dataclasses.asdict(source)),
        "synth": _jsonable(dataclasses.asdict(config)), "tool": tool_name, "teacher": teacher,
        "shard_size": shard_size, "items": len(items), "shards": count,
        "first_item": items[0].item_id if items else None, "last_item": items[-1].item_id if items else None,
    }
    config_path = out_dir / "config.json"
    if config_path.is_file():
        previous = read_json(config_path, "synthesis settings (delete it to start over)")
        if previous != settings:
            if not overwrite:
                changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
                raise ConfigMismatch(
                    f"{out_dir} holds a dataset made with other settings (differs in {changed}); "
                    "use another --out, or --overwrite to start over"
                )
            for path in [*out_dir.glob("trajectories-*"), *out_dir.glob("examples/*.png")]:
                path.unlink()
    write_json_atomic(config_path, settings)
    for stale in [*out_dir.glob("*.tmp"), *out_dir.glob(f".*{PARTIAL}*")]:  # left by a killed run
        stale.unlink()

    reasons = {i: shard_redo_reason(out_dir, i, count) for i in range(count)}
    todo = [(i, shard) for i, shard in enumerate(shards) if reasons[i] is not None]
    done_items = sum(len(shards[i]) for i in range(count) if reasons[i] is None)
    # Shards a previous run left behind but that are corrupt or incomplete: say which, then redo them.
    redone = [{"shard": shard_name(i, count), "reason": r} for i, r in reasons.items()
              if r is not None and r != "missing"]
    for entry in redone:
        log.warning("re-synthesizing %s: %s", entry["shard"], entry["reason"])
    start = time.perf_counter()
    bar = tqdm(total=len(items), initial=done_items, unit="item", desc="synth", disable=not show_progress)
    try:
        if workers <= 1 or len(todo) <= 1:
            tool = make_tool(tool_name) if todo else None
            teacher_fn = load_callable(teacher) if teacher else None
            for index, shard in todo:
                process_shard(source, shard, index, count, out_dir, config, tool, tool_name=tool_name,
                              on_error=on_error, teacher=teacher_fn, progress=bar.update)
        else:
            _run_pool(source, config, tool_name, on_error, teacher, out_dir, count, todo, workers, bar)
    finally:
        bar.close()
    shard_stats = load_shard_stats(out_dir, count)
    stats = aggregate_stats(shard_stats, {
        "config": settings, "wall_seconds_this_run": round(time.perf_counter() - start, 2),
        "shards_skipped_as_done": count - len(todo), "shards_resynthesized": redone,
    })
    write_json_atomic(out_dir / "stats.json", stats)
    atomic_write_text(out_dir / "stats.md", format_table(stats) + "\n")
    stats["examples"] = [str(p) for p in write_examples(out_dir, num_examples)]
    return stats


def _run_pool(source, config, tool_name, on_error, teacher, out_dir, count, todo, workers, bar) -> None:
    import multiprocessing as mp
    import queue as queue_module

    # spawn: workers start clean (no inherited locks from threads of the parent, no JAX state).
    ctx = mp.get_context("spawn")
    progress = ctx.Queue()
    with ctx.Pool(min(workers, len(todo)), initializer=_worker_init,
                  initargs=(source, config, tool_name, on_error, teacher, out_dir, count, progress)) as pool:
        result = pool.map_async(_worker_run, todo, chunksize=1)
        while not result.ready():
            try:
                bar.update(progress.get(timeout=0.2))
            except queue_module.Empty:
                pass
        result.get()  # re-raises a worker's error (on_error="raise")
        while True:
            try:
                bar.update(progress.get_nowait())
            except queue_module.Empty:
                break


def _jsonable(value: Any) -> Any:
    """Dataclass dicts -> JSON types (tuples become lists) so config.json compares equal on reload."""
    return json.loads(json.dumps(value, default=str))
