"""Oracle clicks + the classical 3D tool on volumes: 3D Dice, IoU, NSD, NoC, time.

    PYTHONPATH=$PWD python bench/volume_eval.py --data ellipsoids --n 8 --clicks 5
    PYTHONPATH=$PWD python bench/volume_eval.py --data ellipsoids --n 8 --clicks 5 --clicker slice --slice-rule changed
    PYTHONPATH=$PWD python bench/volume_eval.py --data mni --factor 3 --clicks 10

``--data mni``: the MNI152 2009a T1 template and its white-matter probability map from the
nilearn wheel (docs/design.md section 8), mask = probability >= 0.5, both block-averaged by ``--factor``
(3: 1 mm -> 3 mm voxels, 65 x 77 x 63).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from ibis_jax.agent.loop import run_agent
from ibis_jax.agent.oracle import VOLUME_CLICKERS, OraclePolicy
from ibis_jax.agent.volume import SLICE_RULES, VolumeEpisode, VolumeEpisodeConfig
from ibis_jax.data.sources.volumes import EllipsoidVolumeSource, MNIVolumeSource
from ibis_jax.metrics import interactive_summary
from ibis_jax.tools.volume import TISSUE_3D, ClassicalVolumeTool, ClassicalVolumeToolConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=("ellipsoids", "mni"), default="ellipsoids")
    parser.add_argument("--n", type=int, default=8, help="ellipsoid volumes")
    parser.add_argument("--shape", type=int, default=32, help="ellipsoid volume side")
    parser.add_argument("--factor", type=int, default=3, help="MNI block-average factor")
    parser.add_argument("--clicks", type=int, default=5)
    parser.add_argument("--clicker", choices=VOLUME_CLICKERS, default="3d")
    parser.add_argument("--slice-rule", choices=SLICE_RULES, default="changed")
    parser.add_argument("--tolerance", type=float, default=2.0, help="NSD tolerance, mm")
    parser.add_argument("--tissue", action="store_true", help="the TISSUE_3D preset (intensity prior)")
    args = parser.parse_args()
    start = time.perf_counter()
    if args.data == "mni":
        source = MNIVolumeSource(("white matter",), factor=args.factor)
        query = "Segment the white matter."
    else:
        source = EllipsoidVolumeSource(args.n, args.shape)
        query = "Segment the ellipsoid."
    cases = [(s.volume, s.mask, s.spacing) for item in source.items() for s in source.load(item)]
    config = VolumeEpisodeConfig(max_actions=args.clicks + 1, slice_rule=args.slice_rule)
    episodes = [VolumeEpisode(v, sp, query, g, config=config) for v, g, sp in cases]
    run_agent(OraclePolicy(max_clicks=args.clicks, volume_clicker=args.clicker), ClassicalVolumeTool(TISSUE_3D if args.tissue else ClassicalVolumeToolConfig()), episodes)
    seconds = time.perf_counter() - start
    dices = [e.dices[-1] for e in episodes]
    nsd = [e.surface_dice(args.tolerance) for e in episodes]
    curves = [e.click_iou_curve for e in episodes]
    summary = interactive_summary(curves, max_clicks=args.clicks, ks=())
    clicks = [len(e.clicks) for e in episodes]
    print(f"tool={'TISSUE_3D' if args.tissue else 'default'} data={args.data} shape={episodes[0].shape} spacing={tuple(round(s, 2) for s in episodes[0].spacing)} "
          f"volumes={len(episodes)} clicker={args.clicker} slice_rule={args.slice_rule}")
    print(f"mean 3D Dice {np.mean(dices):.4f} (min {np.min(dices):.4f})  IoU {np.mean([e.ious[-1] for e in episodes]):.4f}  "
          f"NSD@{args.tolerance:g}mm {np.mean(nsd):.4f}  clicks {np.mean(clicks):.2f}  "
          f"NoC@85 {summary['NoC@85']:.2f}  NoC@90 {summary['NoC@90']:.2f} (IoU, max {args.clicks})")
    print("Dice after click k:", [round(float(np.mean([c[min(k, len(c) - 1)] for c in (e.click_dice_curve for e in episodes)])), 4)
                                  for k in range(max(clicks))])
    print(f"time {seconds:.1f} s ({seconds / max(1, sum(clicks)):.2f} s per click)")


if __name__ == "__main__":
    main()
