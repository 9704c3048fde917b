"""Markdown tables of evaluation metrics, laid out like the paper's tables, and example pictures.

Paper convention (docs/design.md section 6): IoU and Dice in percent with two decimals, written
``IoU / Dice`` per column group, one row per method. :func:`comparison_markdown` puts several
runs (e.g. SFT vs GRPO vs oracle) in one table; :func:`format_markdown` is one run's full report.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any




def _pct(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def method_name(metrics: dict[str, Any]) -> str:
    return f"{metrics.get('policy', 'policy')} + {metrics.get('tool', 'tool')}"


def comparison_markdown(runs: Sequence[dict[str, Any]], names: Sequence[str] | None = None) -> str:
    """Segmentation table: one row per run, ``IoU / Dice`` (%) per modality and overall, steps."""
    modalities = sorted({m for r in runs for m in r["per_modality"]})
    header = ["Method"] + [f"{m} IoU / Dice" for m in modalities] + ["All IoU / Dice", "Avg. steps", "Samples"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for i, run in enumerate(runs):
        cells = [names[i] if names else method_name(run)]
        for m in modalities:
            row = run["per_modality"].get(m)
            cells.append(f"{_pct(row['mean_iou'])} / {_pct(row['mean_dice'])}" if row else "-")
        overall = run["overall"]
        cells += [f"{_pct(overall['mean_iou'])} / {_pct(overall['mean_dice'])}", _num(overall["avg_steps"]),
                  str(overall["samples"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def interactive_markdown(runs: Sequence[dict[str, Any]], names: Sequence[str] | None = None) -> str:
    """NoC@85, NoC@90, NoF@90, mIoU@k per run (the interactive-segmentation table)."""
    keys = [k for k in runs[0]["interactive"]["overall"] if k != "samples"] if runs else []
    header = ["Method", "Curve samples"] + keys
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for i, run in enumerate(runs):
        row = run["interactive"]["overall"]
        cells = [names[i] if names else method_name(run), str(row.get("samples", 0))]
        for k in keys:
            value = row.get(k)
            cells.append("-" if value is None else (f"{int(value)}" if k.startswith("NoF") else
                                                    _num(value, 2) if k.startswith("NoC") else _num(value, 3)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _group_table(groups: dict[str, dict[str, Any]], label: str) -> str:
    header = [label, "Samples", "IoU", "Dice", "Avg. steps", "Well-formed turns", "Parse failures", "End reasons",
              "Gen. s/case", "Tool s/case"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for name, g in groups.items():
        reasons = ", ".join(f"{k} {v}" for k, v in g["end_reasons"].items()) or "-"
        lines.append(
            f"| {name} | {g['samples']} | {_pct(g['mean_iou'])} | {_pct(g['mean_dice'])} | {_num(g['avg_steps'])} | "
            f"{_pct(g['well_formed_rate'])}% | {_pct(g['parse_failure_rate'])}% | {reasons} | {_num(g['generate_seconds_per_case'], 3)} | "
            f"{_num(g['tool_seconds_per_case'], 3)} |"
        )
    return "\n".join(lines)


def format_markdown(metrics: dict[str, Any]) -> str:
    """One evaluation as Markdown: the paper-style table, interactive metrics, breakdowns."""
    cfg = metrics.get("config", {})
    parts = [
        f"# Evaluation: {method_name(metrics)}",
        f"Source `{metrics.get('source', '')}`, {metrics['samples']} samples, history `{cfg.get('history')}`, "
        f"at most {cfg.get('max_steps')} actions. IoU and Dice in %; steps = clicks (tool calls).",
        "## Segmentation", comparison_markdown([metrics]),
        f"## Interactive ({metrics['interactive']['curve']}, {metrics['interactive']['max_clicks']} clicks)",
        interactive_markdown([metrics]),
        "## Per modality", _group_table({"All": metrics["overall"], **metrics["per_modality"]}, "Modality"),
        "## Per target", _group_table(metrics["per_target"], "Modality/target"),
    ]
    if metrics.get("skipped"):
        parts.append("Skipped source items: " + ", ".join(f"{k} {v}" for k, v in metrics["skipped"].items()))
    return "\n\n".join(parts) + "\n"
