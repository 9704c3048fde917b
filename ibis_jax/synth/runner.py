"""Sharded, resumable trajectory synthesis over a source (``ibis-jax synth``).

The source's items are cut into fixed shards; each shard is synthesized (one oracle trajectory per
sample, :func:`ibis_jax.synth.trajectory.synthesize_trajectory`) into a temporary file and renamed
with its stats sidecar when complete, so a rerun skips finished shards and a crash never leaves a
half record behind. ``config.json`` pins the settings; ``stats.json``/``stats.md`` hold the
Table-6 statistics (:mod:`ibis_jax.report.synth_stats`); ``examples/`` a few pictures.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ibis_jax.data.images import ImageError
from ibis_jax.data.reasoning import TeacherFn
from ibis_jax.data.records import (
    ShardWriter,
    TrajectoryDataSource,
    shard_name,
    shard_problem,
    to_jsonable,
    write_json_atomic,
)
from ibis_jax.data.sources.base import Item, Source, SourceError
from ibis_jax.data.windowing import WindowError
from ibis_jax.fileio import PARTIAL, atomic_write_text, read_json
from ibis_jax.plugins import load_object
from ibis_jax.report.examples import write_examples as write_example_pictures
from ibis_jax.report.synth_stats import aggregate_stats, format_table
from ibis_jax.synth.trajectory import SynthConfig, synthesize_trajectory
from ibis_jax.tools.protocol import SegmentationTool, ToolError
from tool_bridge.factory import make_tool

log = logging.getLogger(__name__)

def write_examples(out_dir: Path, num: int = 6) -> list[Path]:
    """Pictures of up to ``num`` trajectories (one per modality first) under ``out_dir/examples``."""
    source = TrajectoryDataSource(out_dir)
    if len(source) == 0 or num <= 0:
        return []
    records = [source[i] for i in range(min(len(source), 400))]
    return write_example_pictures(records, out_dir / "examples", num, html=False)


# -- shards ----------------------------------------------------------------------------------------

def is_volume_source(source) -> bool:
    return getattr(source, "kind", "") == "volume"


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


def load_shard_stats(out_dir: Path, count: int) -> list[dict[str, Any]]:
    return [read_json(shard_stats_path(out_dir, i, count), "shard stats") for i in range(count)
            if shard_done(out_dir, i, count)]


# -- a whole run -----------------------------------------------------------------------------------

class ConfigMismatch(RuntimeError):
    """The output folder holds a dataset made with other settings."""


_WORKER: dict[str, Any] = {}


def _worker_init(source, config, tool_name, on_error, teacher_path, out_dir, count, queue) -> None:
    _WORKER.update(source=source, config=config, tool=make_tool(tool_name, volumes=is_volume_source(source)), tool_name=tool_name,
                   on_error=on_error, teacher=load_object(teacher_path, what="teacher") if teacher_path else None,
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
        "source_args": source_args if source_args is not None else to_jsonable(dataclasses.asdict(source)),
        "synth": to_jsonable(dataclasses.asdict(config)), "tool": tool_name, "teacher": teacher,
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
            tool = make_tool(tool_name, volumes=is_volume_source(source)) if todo else None
            teacher_fn = load_object(teacher, what="teacher") if teacher else None
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
