"""Example pictures of a few trajectories (synthesis and evaluation alike): a PNG strip each and,
optionally, the self-contained HTML report."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ibis_jax.data.records import TrajectoryRecord
from ibis_jax.fileio import atomic_write_text, write_png_atomic


def pick_examples(records: Sequence[TrajectoryRecord], num: int) -> list[int]:
    """Up to ``num`` indices: one per modality first (preferring trajectories of two clicks or
    more), then one self-corrected trajectory, then the rest in order."""
    picked: list[int] = []
    seen: set[str] = set()
    for min_clicks in (2, 0):
        for i, record in enumerate(records):
            if record.modality not in seen and record.num_clicks >= min_clicks:
                picked.append(i)
                seen.add(record.modality)
    picked += [i for i, r in enumerate(records) if r.meta.get("self_correction") and i not in picked][:1]
    picked += [i for i in range(len(records)) if i not in picked]
    return picked[: max(0, num)]


def write_examples(records: Sequence[TrajectoryRecord], folder: Path, num: int, *, html: bool = True) -> list[Path]:
    """Writes the :func:`pick_examples` of ``records`` under ``folder``; returns the paths."""
    from ibis_jax.report.html import episode_html
    from ibis_jax.report.pictures import trajectory_picture

    picked = pick_examples(records, num)
    if not picked:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in picked:
        record = records[i]
        stem = folder / record.record_id.replace("/", "_")
        png = stem.with_suffix(".png")
        write_png_atomic(png, trajectory_picture(record))
        paths.append(png)
        if html:
            page = stem.with_suffix(".html")
            atomic_write_text(page, episode_html(record, title=f"{record.record_id}: {record.query}"))
            paths.append(page)
    return paths
