"""Oracle-clicker quality and speed of a segmentation tool on the synthetic-shapes set.

Prints NoC@85/@90, NoF@90 and mIoU@{1,3,5,20} for 20 simulated clicks, and the time per click
step next to the anchor measured in the same run: one ``next_click`` (the simulator's own cost).

    python bench/oracle_clicks.py --num 50 --size 128 --rule ritm
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from ibis_jax.agent.oracle import oracle_iou_curve, run_oracle
from ibis_jax.data.clicks import CLICK_RULES, next_click
from ibis_jax.data.shapes import synthetic_shapes
from ibis_jax.metrics import interactive_summary
from ibis_jax.tools.classical import ClassicalTool


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=50)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-clicks", type=int, default=20)
    parser.add_argument("--rule", choices=CLICK_RULES, default="ritm")
    args = parser.parse_args()

    samples = synthetic_shapes(args.num, size=args.size, seed=args.seed)
    tool = ClassicalTool()
    curves, tool_seconds, clicks = [], 0.0, 0
    start = time.perf_counter()
    for sample in samples:
        episode = run_oracle(tool, sample.image, sample.mask, rule=args.rule, max_clicks=args.max_clicks)
        curves.append(oracle_iou_curve(episode, args.max_clicks))
        tool_seconds += sum(s.tool_seconds for s in episode.steps)
        clicks += len(episode.clicks)
    wall = time.perf_counter() - start

    anchor_start = time.perf_counter()
    for sample in samples:
        next_click(sample.mask, np.zeros_like(sample.mask), rule=args.rule)
    anchor = (time.perf_counter() - anchor_start) / len(samples)

    summary = interactive_summary(curves, args.max_clicks)
    print(f"classical tool, {args.num} synthetic shapes of {args.size}px, {args.rule} clicker, "
          f"{args.max_clicks} clicks")
    print(" | ".join(f"{k} {v:.3f}" for k, v in summary.items()))
    per_click = tool_seconds / max(clicks, 1)
    print(f"tool step {per_click * 1e3:.1f} ms | next_click {anchor * 1e3:.2f} ms | "
          f"ratio {per_click / anchor:.1f}x | wall {wall:.1f} s")


if __name__ == "__main__":
    main()
