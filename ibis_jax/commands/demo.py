"""``ibis-jax demo``: oracle episodes with the classical tool on the demo images.

The first thing a newcomer runs: it needs no weights. For each demo sample (MNI152 brain MRI,
stardist nuclei, synthetic shapes) the click simulator plays the policy and the weight-free
classical tool segments; the command prints NoC / mIoU@k per modality and writes episode pictures
and ``metrics.json``.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

from tqdm import tqdm

from ibis_jax.agent.oracle import oracle_iou_curve, run_oracle
from ibis_jax.data.clicks import CLICK_RULES
from ibis_jax.agent.trajectory import record_from_episode
from ibis_jax.data.sources.demo import DemoSource
from ibis_jax.fileio import atomic_write_json, write_png_atomic
from ibis_jax.report.pictures import trajectory_picture
from ibis_jax.metrics import interactive_summary
from ibis_jax.tools.auto import AutoTool


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output folder (pictures, metrics.json)")
    parser.add_argument("--parts", default="mri,nuclei,shapes", help="demo parts, comma-separated")
    parser.add_argument("--mri-slices", type=int, default=1, help="MRI slices per target and plane")
    parser.add_argument("--nuclei-tiles", type=int, default=4)
    parser.add_argument("--shapes", type=int, default=8, help="synthetic-shapes samples")
    parser.add_argument("--max-clicks", type=int, default=10)
    parser.add_argument("--rule", choices=CLICK_RULES, default="ritm")
    parser.add_argument("--pictures", type=int, default=6, help="episode pictures to write")
    parser.set_defaults(run=run_command)


def run_command(args: argparse.Namespace) -> int:
    """``--out`` local or ``gs://`` (built in a local staging folder, uploaded and committed at the end)."""
    from ibis_jax.commands.remote import run_with_storage

    return run_with_storage(args, run)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    (out / "pictures").mkdir(parents=True, exist_ok=True)
    source = DemoSource(parts=tuple(args.parts.split(",")), mri_slices=args.mri_slices,
                        nuclei_tiles=args.nuclei_tiles, num_shapes=args.shapes)
    # The demo's real targets are tissue classes (white/grey matter, all nuclei of a tile): no edge
    # encloses them, so `auto` gives them the colour-model preset; synthetic shapes are objects.
    tool = AutoTool()
    presets: dict[str, str] = {}
    curves: dict[str, list[list[float]]] = defaultdict(list)
    pictures: list[str] = []
    start = time.perf_counter()
    for item in tqdm(source.items(), desc="oracle episodes", unit="sample"):
        for sample in source.load(item):
            episode_id = f"demo:{sample.sample_id}"
            presets[sample.modality] = tool.assign(episode_id, sample.modality, sample.target)
            episode = run_oracle(tool, sample.image, sample.mask, rule=args.rule, max_clicks=args.max_clicks,
                                 query=f"Segment the {sample.target}.", episode_id=episode_id)
            curves[sample.modality].append(oracle_iou_curve(episode, args.max_clicks))
            if len(pictures) < args.pictures and len(curves[sample.modality]) == 1:
                record = record_from_episode(episode, record_id=sample.sample_id, target=sample.target,
                                             modality=sample.modality)
                path = out / "pictures" / (sample.sample_id.replace("/", "_") + ".png")
                write_png_atomic(path, trajectory_picture(record))
                pictures.append(str(path))
    ks = tuple(k for k in (1, 3, 5) if k <= args.max_clicks)
    rows = {m: {"samples": len(c), **interactive_summary(c, args.max_clicks, ks)} for m, c in curves.items()}
    rows["all"] = {"samples": sum(len(c) for c in curves.values()),
                   **interactive_summary([x for c in curves.values() for x in c], args.max_clicks, ks)}
    metrics = {"tool": presets,
               "rule": args.rule, "max_clicks": args.max_clicks, "per_modality": rows,
               "seconds": round(time.perf_counter() - start, 1), "pictures": pictures}
    atomic_write_json(out / "metrics.json", metrics, indent=2)
    columns = [k for k in rows["all"] if k != "samples"]
    print(f"\nOracle clicker ({args.rule}) + classical tool (tissue preset on MRI and microscopy), "
          f"{args.max_clicks} clicks:")
    print("| modality | samples | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 2) + "|")
    for name, row in rows.items():
        print(f"| {name} | {row['samples']} | " + " | ".join(f"{row[c]:.3f}" for c in columns) + " |")
    print(f"\nwrote {out / 'metrics.json'} and {len(pictures)} pictures under {out / 'pictures'} "
          f"({metrics['seconds']} s)")
    return 0
