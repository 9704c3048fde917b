"""``ibis-jax synth``: synthesize cold-start click trajectories from a dataset.

Examples::

    ibis-jax synth --source demo --tool classical --out data/demo
    ibis-jax synth --source folder --root BiomedParseData/amos22 --split train --out data/amos
    ibis-jax synth --source nifti --images imagesTr --labels labelsTr --target liver=1 \\
        --modality CT --window abdomen --empty-ratio 0.1 --out data/liver --workers 4
    ibis-jax synth --source dicom --dicom series/ --masks masks/ --window lung --out data/lung
    ibis-jax synth --source volumes --volumes scans.json --out data/ct3d   # 3D episodes, slice by slice

Writes ``OUT/trajectories-SSSSS-of-NNNNN.array_record`` (one record per trajectory, read with
``ibis_jax.data.records.TrajectoryDataSource``), ``OUT/stats.json`` and ``OUT/stats.md`` (the
paper's Table 6 columns per modality) and ``OUT/examples/*.png``. A rerun with the same arguments
skips finished shards.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ibis_jax.agent.oracle import VOLUME_CLICKERS
from ibis_jax.agent.volume import SLICE_RULES
from ibis_jax.data.queries import QUERY_STYLES

SOURCE_NAMES = ("folder", "nifti", "dicom", "demo", "volumes")


def register(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = __doc__.split("\n\n", 1)[1] if __doc__ else None
    parser.add_argument("--source", required=True, choices=SOURCE_NAMES)
    parser.add_argument("--out", required=True, help="output folder (created; reruns resume)")

    run = parser.add_argument_group("synthesis")
    run.add_argument("--tool", default="auto", help="'auto' (the classical tool's preset per target; default), "
                     "'classical', 'classical-tissue', a bridge HOST:PORT, or module:factory")
    run.add_argument("--rule", default="ritm", choices=("ritm", "ibis"), help="click rule (docs/design.md section 3)")
    run.add_argument("--stop-iou", type=float, default=0.9, help="stop clicking at this IoU (default 0.9; 0 = never)")
    run.add_argument("--max-steps", type=int, default=20, help="click budget per trajectory (default 20)")
    run.add_argument("--min-dice", type=float, default=0.0, help="drop trajectories with a lower final Dice")
    run.add_argument("--min-steps", type=int, default=1, help="drop trajectories with fewer clicks (default 1)")
    run.add_argument("--drop-unreached", action="store_true", help="drop trajectories that never reach --stop-iou")
    run.add_argument("--self-correction", type=float, default=0.0, metavar="P",
                     help="probability of a wrong click + correction per trajectory (default 0)")
    run.add_argument("--query-styles", default=",".join(QUERY_STYLES), help="first-turn styles to draw from")
    run.add_argument("--teacher", default=None, help="module:function(facts, draft) -> reasoning text")
    run.add_argument("--seed", type=int, default=0)

    io = parser.add_argument_group("run")
    io.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    io.add_argument("--shard-size", type=int, default=64, help="source items per shard (default 64)")
    io.add_argument("--on-error", default="raise", choices=("raise", "skip"),
                    help="bad input: stop with the file and problem (raise) or count and skip it")
    io.add_argument("--limit", type=int, default=None, help="use only the first N source items")
    io.add_argument("--examples", type=int, default=6, help="example trajectory pictures to write")
    io.add_argument("--overwrite", action="store_true", help="start over if OUT holds other settings")
    io.add_argument("--no-progress", action="store_true", help="no progress bar")

    add_source_arguments(parser)
    parser.set_defaults(run=run_command)


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--source`` options (folder / nifti / dicom / demo) that :func:`build_source` reads;
    shared by ``synth`` and ``eval`` (the caller adds ``--source`` and ``--seed`` itself)."""
    src = parser.add_argument_group("sources (folder / nifti / dicom / demo)")
    src.add_argument("--root", help="folder: dataset root holding SPLIT/ and SPLIT_mask/")
    src.add_argument("--split", default="train", help="folder: split sub-folder (default train)")
    src.add_argument("--images", help="folder: image folder; nifti: image volume file or folder")
    src.add_argument("--masks", help="folder/dicom: mask folder")
    src.add_argument("--labels", help="nifti: label volume file or folder")
    src.add_argument("--index", help="folder: CSV/JSON sidecar with image,mask,target[,modality,id,label]")
    src.add_argument("--dicom", help="dicom: a folder of DICOM files or one file")
    src.add_argument("--target", action="append", default=[],
                     help="folder: keep this target name; nifti/dicom: NAME=LABEL of a label map (repeatable)")
    src.add_argument("--default-target", default="target", help="name of single-target masks named like their image")
    src.add_argument("--modality", default=None, help="override the modality (CT, MRI, ...)")
    src.add_argument("--window", default=None,
                     help="intensity window: preset (abdomen, lung, bone, brain, liver, soft_tissue, ...), "
                          "'L,W', 'percentile[:LOW,HIGH]', 'minmax' or 'dicom'")
    src.add_argument("--axis", default="axial", help="nifti: axial/coronal/sagittal or 0/1/2")
    src.add_argument("--min-area", type=int, default=16, help="nifti: smallest target area (pixels) of a slice")
    src.add_argument("--slice-stride", type=int, default=1, help="nifti: keep every k-th target slice")
    src.add_argument("--empty-ratio", type=float, default=0.0,
                     help="nifti: target-free slices kept per target slice (default 0)")
    src.add_argument("--demo-parts", default="mri,nuclei,shapes", help="demo: parts to include")
    src.add_argument("--mri-slices", type=int, default=2, help="demo: MRI slices per target and plane")
    src.add_argument("--nuclei-tile", type=int, default=128, help="demo: nuclei tile side")
    src.add_argument("--nuclei-tiles", type=int, default=6, help="demo: number of nuclei tiles")
    src.add_argument("--num-shapes", type=int, default=8, help="demo: synthetic-shapes samples")
    vol = parser.add_argument_group("volumes (--source volumes: 3D episodes)")
    vol.add_argument("--volumes", default="ellipsoids:8",
                     help="ellipsoids[:N], mni[:FACTOR] (MNI152 white and grey matter), stardist (3D nuclei) or a "
                          "manifest .json (a list of {image, labels, target, label, modality, window, axis})")
    vol.add_argument("--slice-rule", default="changed", choices=SLICE_RULES, help="the slice on view after a click")
    vol.add_argument("--volume-clicker", default=None, choices=VOLUME_CLICKERS,
                     help="oracle: on the slice on view (slice), there while it has errors and else anywhere "
                          "(slice-then-3d; synth's default), or anywhere (3d; eval's default)")


def build_source(args: argparse.Namespace):
    """The source named by ``--source`` with its arguments."""
    from ibis_jax.data.sources import DemoSource, DicomSource, FolderSource, NiftiSource, parse_target_labels
    from ibis_jax.storage import check_local

    for name in ("root", "images", "masks", "labels", "index", "dicom"):
        check_local(getattr(args, name, None), f"--{name}")  # sources read local files: a URL is refused
    if args.source == "volumes" and args.volumes.endswith(".json"):
        check_local(args.volumes, "--volumes")

    if args.source == "volumes":
        from ibis_jax.data.sources.volumes import volume_source

        return volume_source(args.volumes)

    if args.source == "folder":
        if not (args.root or args.index or (args.images and args.masks)):
            raise ValueError("--source folder needs --root, or --index, or --images and --masks")
        return FolderSource(root=args.root, split=args.split, images=args.images, masks=args.masks,
                            index=args.index, modality=args.modality, targets=tuple(args.target),
                            default_target=args.default_target, window=args.window)
    if args.source == "nifti":
        if not (args.images and args.labels):
            raise ValueError("--source nifti needs --images and --labels (files or folders)")
        return NiftiSource(images=args.images, labels=args.labels, targets=parse_target_labels(args.target),
                           modality=args.modality or "", window=args.window, axis=args.axis,
                           min_area=args.min_area, slice_stride=args.slice_stride,
                           empty_ratio=args.empty_ratio, seed=args.seed)
    if args.source == "dicom":
        if not (args.dicom and args.masks):
            raise ValueError("--source dicom needs --dicom and --masks")
        return DicomSource(dicom=args.dicom, masks=args.masks, targets=parse_target_labels(args.target),
                           modality=args.modality, window=args.window, default_target=args.default_target)
    return DemoSource(parts=tuple(p.strip() for p in args.demo_parts.split(",") if p.strip()),
                      mri_slices=args.mri_slices, nuclei_tile=args.nuclei_tile, nuclei_tiles=args.nuclei_tiles,
                      num_shapes=args.num_shapes, seed=args.seed)


def run_command(args: argparse.Namespace) -> int:
    """``--out`` local, or ``gs://``: synthesized in a local staging folder (holding what the bucket
    already has, so a rerun resumes) and uploaded, shard manifest entries after their shards and
    the commit marker last (``ibis_jax.storage``)."""
    from ibis_jax.commands.remote import run_with_storage

    return run_with_storage(args, _run)


def _run(args: argparse.Namespace) -> int:
    from ibis_jax.data.sources import SourceError
    from ibis_jax.report.synth_stats import format_table
    from ibis_jax.synth import ConfigMismatch, SynthConfig, run_synthesis

    start = time.perf_counter()
    settings_file = Path(args.out) / "config.json"
    first_run = not settings_file.exists()
    try:
        source = build_source(args)
        config = SynthConfig(
            rule=args.rule, stop_iou=args.stop_iou or None, max_clicks=args.max_steps, min_dice=args.min_dice,
            min_clicks=args.min_steps, drop_unreached=args.drop_unreached,
            self_correction=args.self_correction, seed=args.seed,
            query_styles=tuple(s.strip() for s in args.query_styles.split(",") if s.strip()),
            volume_clicker=args.volume_clicker or "slice-then-3d", slice_rule=args.slice_rule,
        )
        stats = run_synthesis(
            source, args.out, config, tool_name=args.tool, shard_size=args.shard_size, workers=args.workers,
            on_error=args.on_error, limit=args.limit, teacher=args.teacher, num_examples=args.examples,
            overwrite=args.overwrite, show_progress=not args.no_progress,
        )
    except BaseException as e:
        from ibis_jax.data.records import shard_paths

        if first_run and settings_file.exists() and not shard_paths(args.out):
            settings_file.unlink()  # a first run that failed pins nothing: the fixed rerun starts clean
        if isinstance(e, (SourceError, ConfigMismatch, ValueError, FileNotFoundError)):
            print(f"ibis-jax synth: error: {e}", file=sys.stderr)
            return 1
        raise
    print(format_table(stats))
    if stats["skipped"]:
        print("skipped items by reason: " + ", ".join(f"{k}={v}" for k, v in stats["skipped"].items()))
    if stats["filtered"]:
        print("filtered trajectories by reason: " + ", ".join(f"{k}={v}" for k, v in stats["filtered"].items()))
    done = stats.get("shards_skipped_as_done", 0)
    redone = stats.get("shards_resynthesized", [])
    for entry in redone:
        print(f"re-synthesized {entry['shard']}: {entry['reason']}")
    print(f"{stats['all']['samples']} trajectories, {stats['all']['sft_samples']} SFT samples in {args.remote_out} "
          f"({stats['shards']} shards, {done} already done, {len(redone)} corrupt or incomplete ones redone; "
          f"{time.perf_counter() - start:.1f} s)")
    for path in stats.get("examples", []):
        print(f"example: {path}")
    return 0
