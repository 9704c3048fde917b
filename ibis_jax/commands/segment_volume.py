"""``ibis-jax segment --volume FILE``: the agent on a 3D scan; a NIfTI mask and an HTML report.

    ibis-jax segment --volume ct.nii.gz --model oracle --tool classical --gt labels.nii.gz --gt-label 1 \\
        --query "Segment the liver." --out runs/liver3d
    ibis-jax segment --volume dicom_series/ --model ckpt/hf --query "Segment the liver." --window liver

``--volume`` is a NIfTI file or a folder holding one DICOM series. ``--tool``: ``classical`` (3D
random walker), ``classical-tissue`` (with an intensity prior, for white matter and other tissue
classes), ``medsam2-3d:CHECKPOINT`` (sam2's video predictor in process) or a tool server
``HOST:PORT[,HOST:PORT...]`` (``ibis-jax tool serve``: its volume backend, the volume sent once; with
``--slice-rule uncertain`` the server also sends the tool's probability, quantised to 1/255). The policy looks at one slice of
the ``--axis`` (default axial) at a time, starting at ``--start-slice`` (default the middle one);
after each click the next slice on view is chosen by ``--slice-rule``. Writes ``OUT/mask.nii.gz``
(``uint8``, in the input's voxel grid: its shape, affine and orientation; for a DICOM series the
affine built from its headers), written to a temporary name and renamed so a failure leaves no
half-written mask, ``OUT/report.html`` (a slice montage of the final mask and each step's slice
and click) and ``OUT/summary.json`` (3D Dice / IoU / NSD when ``--gt`` is given). With
``--out-format dicom-seg`` (a DICOM series input, highdicom installed) the mask is ``OUT/mask.dcm``,
a binary DICOM-SEG whose frames reference the series' slices (``ibis_jax.data.dicom_seg``); ``both``
writes both files.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import sys
import time
from pathlib import Path

import numpy as np


def load_volume_input(path: str | Path, *, axis: str = "axial", window: str | None = None, modality: str | None = None):
    from ibis_jax.data.volumes import VolumeInputError, load_dicom_series, load_nifti_volume

    path = Path(path)
    if path.is_dir():
        return load_dicom_series(path, axis=axis, window=window, modality=modality)
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        raise VolumeInputError(path, "corrupt_image", "path",
                               "--volume takes a NIfTI file (.nii, .nii.gz) or a folder of one DICOM series")
    return load_nifti_volume(path, axis=axis, window=window, modality=modality or "unknown")


def make_volume_tool(spec: str, target: str = "", *, slice_rule: str = "changed"):
    """``--tool`` for a volume (``tool_bridge.factory.make_tool(spec, volumes=True)``, see its
    ``VOLUME_TOOLS``); ``auto`` takes the classical preset the query's target needs, as in 2D
    (white matter, nuclei: the tissue preset)."""
    from tool_bridge.factory import make_tool
    from ibis_jax.tools.auto import classical_preset

    return make_tool(classical_preset("", target) if spec == "auto" else spec, volumes=True, slice_rule=slice_rule)


def _png(rgb: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _enlarge(rgb: np.ndarray, size: int = 160) -> np.ndarray:
    import cv2

    scale = max(1, size // max(rgb.shape[:2]))
    return cv2.resize(rgb, (rgb.shape[1] * scale, rgb.shape[0] * scale), interpolation=cv2.INTER_NEAREST)


def report_html(episode, volume, title: str, facts: dict) -> str:
    """A self-contained page: each step's slice and click, then a montage of the final mask."""
    from ibis_jax.agent.grammar import Click, SliceClick, format_action
    from ibis_jax.agent.overlay import draw_clicks, render_overlay

    d, h, w = episode.shape
    rows = []
    for step in episode.steps:
        k = step.slice  # the observation before the step: the slice on view with the mask so far
        picture = observation = render_overlay(volume.rgb_slice(k), step.prev_mask[k])
        if isinstance(step.action, SliceClick) and step.action.voxel(d, h, w)[0] == k:
            picture = draw_clicks(observation, [Click(step.action.x, step.action.y, step.action.positive)], radius=1)
        metric = "" if step.dice is None else f" &middot; 3D Dice after {step.dice:.4f}"
        action = html.escape(format_action(step.action)) if step.action is not None else "(unparseable)"
        rows.append(f'<figure><img src="{_png(_enlarge(picture))}"><figcaption>step {step.index + 1}: slice '
                    f'{k + 1}/{d}<br><code>{action}</code>{metric}</figcaption></figure>')
    mask = episode.current_mask
    present = np.flatnonzero(mask.any(axis=(1, 2)) | (episode.gt_mask.any(axis=(1, 2)) if episode.gt_mask is not None else False))
    chosen = present[np.linspace(0, len(present) - 1, min(12, len(present))).round().astype(int)] if len(present) else []
    tiles = []
    for k in chosen:
        rgb = render_overlay(volume.rgb_slice(int(k)), mask[k])
        if episode.gt_mask is not None:  # ground-truth outline in red
            from ibis_jax.metrics import surface_voxels

            rgb[surface_voxels(episode.gt_mask[k])] = (255, 40, 40)
        tiles.append(f'<figure><img src="{_png(_enlarge(rgb, 120))}"><figcaption>slice {k + 1}</figcaption></figure>')
    fact_rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts.items())
    style = ("body{font-family:sans-serif;margin:1em}figure{display:inline-block;margin:4px;text-align:center}"
             "img{image-rendering:pixelated}th{text-align:left;padding-right:1em}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}"
            f"</style></head><body><h1>{html.escape(title)}</h1><table>{fact_rows}</table><h2>Steps</h2>"
            f"{''.join(rows)}<h2>Final mask (green; ground truth outline red)</h2>{''.join(tiles)}</body></html>")


def run_volume_command(args: argparse.Namespace) -> int:
    from ibis_jax.agent.loop import run_agent
    from ibis_jax.agent.oracle import OraclePolicy
    from ibis_jax.agent.volume import VolumeEpisode, VolumeEpisodeConfig
    from ibis_jax.data.sources import SourceError
    from ibis_jax.data.volumes import load_label_volume, save_nifti_atomic
    from ibis_jax.data.windowing import WindowError
    from ibis_jax.eval.policies import PolicyUnavailable, is_oracle, load_policy
    from ibis_jax.tools.protocol import ToolError

    out = Path(args.out)
    tool = None
    try:
        if is_oracle(args.model) and not args.gt:
            raise ValueError("--model oracle clicks from the ground truth: pass --gt LABELS.nii.gz")
        out_format = getattr(args, "out_format", "nifti")
        if out_format != "nifti":
            from ibis_jax.data.dicom_seg import check_dicom_seg_input

            check_dicom_seg_input(args.volume)  # before any work: a series folder, highdicom installed
        tool = make_volume_tool(args.tool, args.query, slice_rule=args.slice_rule)
        volume = load_volume_input(args.volume, axis=args.axis, window=args.window, modality=args.modality)
        gt = load_label_volume(args.gt, volume, args.gt_label, what="gt") if args.gt else None
        if out_format != "nifti":
            from ibis_jax.data.dicom_seg import source_headers

            source_headers(volume)  # the headers a DICOM-SEG needs, checked before the agent runs
        init = load_label_volume(args.mask_init, volume, args.mask_label, what="mask-init") if args.mask_init else None
        if is_oracle(args.model):
            policy = OraclePolicy(stop_iou=args.stop_iou or None, max_clicks=args.max_steps, volume_clicker=args.clicker)
        else:
            policy = load_policy(args.model, rule=args.rule, stop_iou=args.stop_iou or None, max_clicks=args.max_steps)
        episode = VolumeEpisode(volume.display, volume.spacing, args.query, gt, episode_id="segment-volume",
                                config=VolumeEpisodeConfig(max_actions=args.max_steps, slice_rule=args.slice_rule),
                                initial_mask=init, start_slice=args.start_slice)
        start = time.perf_counter()
        run_agent(policy, tool, [episode], history=args.history)
        seconds = time.perf_counter() - start
        out.mkdir(parents=True, exist_ok=True)
        seg_path = None
        if out_format != "nifti":
            from ibis_jax.data.dicom_seg import write_dicom_seg

            seg_path = write_dicom_seg(volume, episode.current_mask, out / "mask.dcm", label=args.query,
                                       description=f"ibis-jax segment, {len(episode.clicks)} clicks")
        mask_path = seg_path
        if out_format != "dicom-seg":
            mask_path = save_nifti_atomic(volume.mask_image(episode.current_mask), out / "mask.nii.gz")
    except (SourceError, PolicyUnavailable, WindowError, ValueError, FileNotFoundError, ToolError) as e:
        print(f"ibis-jax segment: error: {e}", file=sys.stderr)
        return 1
    finally:
        if tool is not None and hasattr(tool, "shutdown"):  # a bridge tool's channel and thread
            tool.shutdown()
    metrics = {}
    if gt is not None:
        metrics = {"dice": episode.dices[-1], "iou": episode.ious[-1],
                   f"nsd@{args.nsd_tolerance:g}mm": episode.surface_dice(args.nsd_tolerance)}
    summary = {
        "input": str(args.volume), "kind": "volume", "query": args.query, "model": args.model, "tool": args.tool,
        "shape_view": list(episode.shape), "spacing_mm": list(episode.spacing), "axis": volume.axis,
        "window": volume.window, "slice_rule": args.slice_rule, "end_reason": episode.end_reason,
        "clicks": len(episode.clicks), "turns": len(episode.steps), "seconds": round(seconds, 2), **metrics,
        "steps": [{"slice": s.slice, "action": None if s.action is None else s.text.split("<action>")[-1].split("</action>")[0].strip(),
                   "dice": s.dice, "iou": s.iou} for s in episode.steps],
        "mask": str(mask_path), **({"dicom_seg": str(seg_path)} if seg_path is not None else {}),
        "mask_voxels": int(episode.current_mask.sum()), "report": str(out / "report.html"),
    }
    facts = {"input": args.volume, "model": args.model, "tool": args.tool, "view shape (slices, rows, cols)": episode.shape,
             "spacing (mm)": episode.spacing, "window": volume.window, "slice rule": args.slice_rule,
             "end": episode.end_reason, "time": f"{seconds:.2f} s", **{k: f"{v:.4f}" for k, v in metrics.items()}}
    (out / "report.html").write_text(report_html(episode, volume, f"ibis-jax segment: {args.query}", facts))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    for step in summary["steps"]:
        dice = "" if step["dice"] is None else f"  3D Dice {step['dice']:.4f}"
        print(f"slice {step['slice'] + 1}: {step['action'] or '(unparseable)'}{dice}")
    final = "".join(f", {k} {v:.4f}" for k, v in metrics.items())
    print(f"{summary['clicks']} clicks, ended by {episode.end_reason}{final}")
    print(f"mask: {mask_path}\nreport: {out / 'report.html'}")
    return 0
