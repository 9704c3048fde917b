"""Statistics of a synthesized dataset: the paper's Table 6 per modality, skip and filter counts."""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

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
