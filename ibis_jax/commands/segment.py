"""``ibis-jax segment``: run the agent on one image; write the final mask and an HTML report.

Examples::

    ibis-jax segment --model ckpt/hf --image scan.png --query "Segment the liver." --out runs/liver
    ibis-jax segment --model oracle --image scan.png --gt liver.png --query "Segment the liver."
    ibis-jax segment --model ckpt/hf --image IM0001.dcm --query "Segment the lung." --window lung
    ibis-jax segment --model ckpt/hf --image ct.nii.gz --slice axial:42 --query "Segment the liver." \\
        --mask-init my_liver.nii.gz --gt labels.nii.gz --gt-label 1

Inputs: a PNG/JPEG/TIFF, a DICOM file (rescale slope/intercept, then the window: ``--window`` or the
file's own for CT), or one slice of a NIfTI volume (``--slice AXIS:INDEX`` on the RAS-reoriented
volume, as ``synth --source nifti`` slices it; default the middle axial slice; the whole volume
is windowed once). ``--gt`` and ``--mask-init`` are mask images, or NIfTI volumes sliced the same
way for NIfTI input (``--gt-label`` / ``--mask-label`` pick a label; default: non-zero).

Writes ``OUT/mask.png`` (0/255), or ``OUT/mask.nii.gz`` for NIfTI input (the mask in the input
volume's voxel grid and affine, zero outside the slice), ``OUT/report.html`` (self-contained),
``OUT/episode.gif`` and ``OUT/summary.json``.

3D: ``--volume FILE_OR_DICOM_FOLDER`` instead of ``--image`` runs a volume episode and writes a 3D
NIfTI mask in the input's grid (``ibis_jax.commands.segment_volume``), e.g.::

    ibis-jax segment --volume ct.nii.gz --model oracle --tool classical --gt labels.nii.gz --gt-label 1 \\
        --query "Segment the liver." --out runs/liver3d
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ibis_jax.agent.conversation import HISTORY_MODES
from ibis_jax.data.clicks import CLICK_RULES
from ibis_jax.data.images import DEFAULT_MAX_PIXELS

if TYPE_CHECKING:
    from ibis_jax.agent.episode import Episode
    from ibis_jax.agent.loop import EpisodeTrace, Policy
    from ibis_jax.tools.protocol import SegmentationTool

NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")


def register(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = __doc__.split("\n\n", 1)[1] if __doc__ else None
    parser.add_argument("--model", required=True, help="'oracle' (needs --gt) or a model checkpoint / HF dir")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", help="PNG/JPEG/TIFF, DICOM file, or NIfTI volume (one slice of it)")
    source.add_argument("--volume", help="3D: a NIfTI volume or a DICOM series folder (see segment_volume)")
    parser.add_argument("--query", required=True, help='what to segment, e.g. "Segment the liver."')
    parser.add_argument("--tool", default="auto", help="'auto' (the classical tool's preset per target; "
                        "default), 'classical', 'classical-tissue', a bridge HOST:PORT, or module:factory; with "
                        "--volume: auto, classical, classical-tissue, medsam2-3d:CHECKPOINT or a bridge HOST:PORT")
    parser.add_argument("--out", default="runs/segment", help="output folder (default runs/segment)")
    parser.add_argument("--mask-init", default=None, help="start from this mask (refinement)")
    parser.add_argument("--mask-label", type=int, default=None, help="label of --mask-init to use (default non-zero)")
    parser.add_argument("--gt", default=None, help="ground-truth mask: IoU per step (required by --model oracle)")
    parser.add_argument("--gt-label", type=int, default=None, help="label of --gt to use (default non-zero)")
    parser.add_argument("--slice", default=None, help="NIfTI: AXIS:INDEX, e.g. axial:42 or 2:42 (default middle axial)")
    parser.add_argument("--window", default=None, help="intensity window (preset, 'L,W', 'percentile', 'minmax', 'dicom')")
    parser.add_argument("--modality", default=None, help="modality name for the report (default from the file)")
    parser.add_argument("--history", default=None, choices=HISTORY_MODES,
                        help="turns the policy sees (docs/design.md section 1); default: what the model was trained with")
    parser.add_argument("--max-steps", type=int, default=20, help="actions at most (default 20)")
    parser.add_argument("--rule", default="ritm", choices=CLICK_RULES, help="oracle click rule")
    parser.add_argument("--stop-iou", type=float, default=0.9, help="oracle: terminate at this IoU (default 0.9)")
    parser.add_argument("--max-pixels", type=float, default=DEFAULT_MAX_PIXELS,
                        help=f"refuse inputs over this many pixels (default {DEFAULT_MAX_PIXELS / 1e6:g} million; "
                             "0: no limit); checked from the file header before decoding")
    volume = parser.add_argument_group("volumes (--volume)")
    volume.add_argument("--axis", default="axial", help="viewing axis: axial / coronal / sagittal (RAS)")
    volume.add_argument("--start-slice", type=int, default=None, help="first slice on view (default the middle)")
    volume.add_argument("--slice-rule", default="changed", choices=("changed", "uncertain", "stay", "error"),
                        help="which slice is shown after a click (default: where the mask changed most)")
    volume.add_argument("--clicker", default="3d", choices=("3d", "slice"),
                        help="oracle: click anywhere in 3D, or only on the slice on view")
    volume.add_argument("--nsd-tolerance", type=float, default=2.0, help="surface Dice tolerance in mm (default 2)")
    volume.add_argument("--out-format", default="nifti", choices=("nifti", "dicom-seg", "both"),
                        help="the 3D mask as OUT/mask.nii.gz (default), as a DICOM-SEG OUT/mask.dcm referencing a "
                             "DICOM series input (needs highdicom: pip install -e '.[dicom-seg]'), or both")
    parser.set_defaults(run=run_command)


# -- reading the input -----------------------------------------------------------------------------

@dataclasses.dataclass
class InputImage:
    """The image the agent sees, and what is needed to write the mask back in the input's frame.

    ``volume``: for NIfTI input, the loaded ``nibabel`` image; ``axis``/``index``: the slice on
    the RAS-reoriented volume.
    """

    image: np.ndarray  # RGB uint8 [H, W, 3]
    kind: str  # "image", "dicom" or "nifti"
    modality: str
    window: str
    volume: Any = None
    axis: int = 2
    index: int = 0


def _kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if path.suffix.lower() in DICOM_SUFFIXES:
        return "dicom"
    with open(path, "rb") as handle:  # DICOM files without a suffix: "DICM" after the preamble
        head = handle.read(132)
    return "dicom" if head[128:132] == b"DICM" else "image"


def _check_dicom_size(path: Path, max_pixels: int | None) -> None:
    """Rows x Columns from the DICOM header (pixel data not read) against ``max_pixels``."""
    if not max_pixels:
        return
    import pydicom

    from ibis_jax.data.images import check_pixels

    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
        rows, cols = int(ds.Rows), int(ds.Columns)
    except Exception:  # noqa: BLE001 - unreadable headers are read_dicom's to report
        return
    check_pixels(rows, cols, where=f"--image {path}", max_pixels=max_pixels)


def parse_slice(spec: str | None, shape: tuple[int, ...]) -> tuple[int, int]:
    """``AXIS:INDEX`` -> (RAS axis, index); ``None`` -> the middle axial slice."""
    from ibis_jax.data.sources.nifti import resolve_axis

    if spec is None:
        return 2, shape[2] // 2
    axis_text, sep, index_text = spec.partition(":")
    if not sep:
        raise ValueError(f"--slice {spec!r}: write AXIS:INDEX, e.g. axial:42")
    axis = resolve_axis(axis_text)
    try:
        index = int(index_text)
    except ValueError:
        raise ValueError(f"--slice {spec!r}: INDEX must be an integer") from None
    if not 0 <= index < shape[axis]:
        raise ValueError(f"--slice {spec!r}: index out of range, the volume has {shape[axis]} slices on axis {axis}")
    return axis, index


def _canonical(volume) -> np.ndarray:
    import nibabel as nib

    data = np.asanyarray(nib.as_closest_canonical(volume).dataobj)
    return data[..., 0] if data.ndim == 4 and data.shape[3] == 1 else data


def load_input(path: str | Path, *, slice_spec: str | None = None, window: str | None = None,
               modality: str | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> InputImage:
    """Reads one input image (see the module docstring) into the agent's RGB view.

    ``max_pixels``: larger inputs are refused with an ``ImageError``/``SourceError`` naming the
    file, its size and ``--max-pixels`` (PNG/JPEG/TIFF from the header, before decoding; DICOM from
    its Rows/Columns; NIfTI per slice); ``None`` or 0: no limit."""
    import nibabel as nib

    from ibis_jax.data.images import check_pixels, to_rgb_uint8
    from ibis_jax.data.sources.base import SourceError, image_to_rgb, read_image_file
    from ibis_jax.data.sources.dicom import MODALITY_NAMES, dicom_window, read_dicom
    from ibis_jax.data.sources.nifti import slice_volume
    from ibis_jax.data.windowing import Window, default_window, parse_window

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--image {path}: no such file")
    kind = _kind(path)
    if kind == "dicom":
        _check_dicom_size(path, max_pixels)
        values, ds = read_dicom(path)
        tag = str(getattr(ds, "Modality", "") or "").upper()
        modality = modality or MODALITY_NAMES.get(tag, tag or "unknown")
        chosen = dicom_window(ds, "CT" if modality.upper() == "CT" else modality, window, path)
        return InputImage(to_rgb_uint8(chosen.apply(values, where=str(path)), where=str(path)), kind, modality,
                          chosen.describe())
    if kind == "nifti":
        try:
            volume = nib.load(str(path))
            data = _canonical(volume)
        except Exception as e:  # nibabel raises many types for invalid files
            raise SourceError(path, "corrupt_image", f"cannot read NIfTI ({type(e).__name__}: {e})") from None
        if data.ndim != 3:
            raise ValueError(f"--image {path}: expected a 3D volume, got shape {data.shape}")
        axis, index = parse_slice(slice_spec, data.shape)
        plane = [n for a, n in enumerate(data.shape) if a != axis]
        check_pixels(plane[0], plane[1], where=f"--image {path} slice {index}", max_pixels=max_pixels)
        modality = modality or "unknown"
        chosen = parse_window(window) if window else default_window(modality)
        display = chosen.apply(data, where=str(path), nonzero=chosen.kind == "percentile")
        image = to_rgb_uint8(slice_volume(display, axis, index), where=f"{path} slice {index}")
        return InputImage(image, kind, modality, chosen.describe(), volume, axis, index)
    array = read_image_file(path, max_pixels=max_pixels)
    chosen = parse_window(window) if window else Window("minmax")
    return InputImage(image_to_rgb(array, path, chosen if array.dtype != np.uint8 else None), kind,
                      modality or "unknown", chosen.describe() if array.dtype != np.uint8 else "none")


def load_mask(path: str | Path, target: InputImage, label: int | None, *, what: str) -> np.ndarray:
    """A mask for ``target``: an image file, or a NIfTI volume sliced like a NIfTI input."""
    import nibabel as nib

    from ibis_jax.data.sources.base import mask_from_array, read_image_file
    from ibis_jax.data.sources.nifti import slice_volume

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--{what} {path}: no such file")
    if path.name.lower().endswith(NIFTI_SUFFIXES):
        if target.kind != "nifti":
            raise ValueError(f"--{what} {path}: a NIfTI mask needs a NIfTI --image (give a PNG mask instead)")
        data = _canonical(nib.load(str(path)))
        if data.shape != _canonical(target.volume).shape:
            raise ValueError(f"--{what} {path}: volume shape {data.shape} differs from the image volume's")
        plane = slice_volume(data, target.axis, target.index)
        array = (plane == label) if label is not None else (plane != 0)
        return mask_from_array(array, target.image.shape, path)
    return mask_from_array(read_image_file(path), target.image.shape, path, label)


def nifti_mask_image(mask: np.ndarray, target: InputImage) -> Any:
    """The 2D ``mask`` placed back into the input volume's own voxel grid (its orientation and
    affine), zero on every other slice; a ``nibabel.Nifti1Image`` of ``uint8``."""
    import nibabel as nib
    from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

    volume = target.volume
    shape = _canonical(volume).shape
    canonical = np.zeros(shape, dtype=np.uint8)
    where = [slice(None)] * 3
    where[target.axis] = target.index
    canonical[tuple(where)] = np.rot90(mask.astype(np.uint8), -1)  # undo slice_volume's rot90
    # RAS -> the file's own axis order and directions, so the input's affine applies unchanged.
    transform = ornt_transform(axcodes2ornt(("R", "A", "S")), io_orientation(volume.affine))
    data = apply_orientation(canonical, transform)
    out = nib.Nifti1Image(np.ascontiguousarray(data), volume.affine)
    out.set_data_dtype(np.uint8)
    return out


# -- running ---------------------------------------------------------------------------------------

def segment_image(policy: Policy, tool: SegmentationTool, loaded: InputImage, query: str, *,
                  gt: np.ndarray | None = None, mask_init: np.ndarray | None = None, max_steps: int = 20,
                  history: str | None = None) -> tuple[Episode, EpisodeTrace]:
    """Runs one episode on ``loaded.image`` (from ``mask_init`` when given); returns (episode, trace)."""
    from ibis_jax.agent.episode import Episode, EpisodeConfig
    from ibis_jax.agent.loop import run_agent

    from ibis_jax.tools.auto import assign_episode

    episode = Episode(loaded.image, query, gt, config=EpisodeConfig(max_actions=max_steps),
                      episode_id="segment", initial_mask=mask_init)
    assign_episode(tool, episode.episode_id, loaded.modality, query)  # `auto`: the preset the query's target needs
    [trace] = run_agent(policy, tool, [episode], history=history)
    return episode, trace


def write_outputs(out: Path, episode: Episode, trace: EpisodeTrace, loaded: InputImage, *, source_path: str,
                  model: str, tool_name: str) -> dict[str, Any]:
    """Writes the mask, ``report.html``, ``episode.gif`` and ``summary.json``; returns the summary."""
    from PIL import Image

    from ibis_jax.agent.prompts import user_turn
    from ibis_jax.agent.trajectory import record_from_episode
    from ibis_jax.data.rle import encode_rle
    from ibis_jax.fileio import atomic_file, atomic_write_bytes, atomic_write_json, atomic_write_text
    from ibis_jax.report.html import episode_html
    from ibis_jax.report.pictures import episode_gif

    out.mkdir(parents=True, exist_ok=True)
    mask = episode.current_mask
    if loaded.kind == "nifti":
        import nibabel as nib

        mask_path = out / "mask.nii.gz"
        with atomic_file(mask_path, ".nii.gz") as partial:  # every output: a temporary name, then a rename
            nib.save(nifti_mask_image(mask, loaded), str(partial))
    else:
        mask_path = out / "mask.png"
        with atomic_file(mask_path, ".png") as partial:
            Image.fromarray(mask.astype(np.uint8) * 255).save(partial)
    meta: dict[str, Any] = {"model": model, "tool": tool_name, "input": source_path, "window": loaded.window}
    if episode.initial_mask.any():
        meta["initial_mask"] = encode_rle(episode.initial_mask)
    record = record_from_episode(
        episode, record_id=Path(source_path).name, target="", modality=loaded.modality,
        user_turns=[user_turn(t, episode.query) for t in range(len(episode.steps))], meta=meta,
    )
    facts = {"model": model, "tool": tool_name, "input": source_path, "window": loaded.window,
             "time": f"generation {trace.generate_seconds:.2f} s, tool "
                     f"{sum(s.tool_seconds for s in episode.steps):.2f} s"}
    if loaded.kind == "nifti":
        facts["slice"] = f"axis {loaded.axis} (RAS), index {loaded.index}"
    atomic_write_text(out / "report.html", episode_html(record, title=f"ibis-jax segment: {episode.query}", facts=facts))
    atomic_write_bytes(out / "episode.gif", episode_gif(record))
    summary = {
        "input": source_path, "kind": loaded.kind, "query": episode.query, "model": model, "tool": tool_name,
        "end_reason": episode.end_reason, "clicks": len(episode.clicks), "turns": len(episode.steps),
        "answer": record.answer, "final_iou": record.final_iou, "final_dice": record.final_dice,
        "steps": [{"action": s.action, "reasoning": s.reasoning, "iou": s.iou} for s in record.steps],
        "mask": str(mask_path), "report": str(out / "report.html"), "gif": str(out / "episode.gif"),
        "mask_pixels": int(mask.sum()),
    }
    atomic_write_json(out / "summary.json", summary)
    return summary


def run_command(args: argparse.Namespace) -> int:
    """``--model`` and ``--out`` local or ``gs://`` (staged down / staged up and committed);
    ``--image``, ``--gt``, ``--mask-init`` and ``--volume`` are read from local files."""
    from ibis_jax.commands.remote import run_with_storage

    return run_with_storage(args, _run, models=("model",), local_inputs=("image", "gt", "mask_init", "volume"))


def _run(args: argparse.Namespace) -> int:
    from ibis_jax.data.images import ImageError
    from ibis_jax.data.sources import SourceError
    from ibis_jax.data.windowing import WindowError
    from ibis_jax.eval.policies import PolicyUnavailable, is_oracle, load_policy
    from tool_bridge.factory import make_tool

    if getattr(args, "volume", None):
        from ibis_jax.commands.segment_volume import run_volume_command

        return run_volume_command(args)
    try:
        if is_oracle(args.model) and not args.gt:
            raise ValueError("--model oracle clicks from the ground truth: pass --gt MASK")
        loaded = load_input(args.image, slice_spec=args.slice, window=args.window, modality=args.modality,
                            max_pixels=int(args.max_pixels))
        gt = load_mask(args.gt, loaded, args.gt_label, what="gt") if args.gt else None
        init = load_mask(args.mask_init, loaded, args.mask_label, what="mask-init") if args.mask_init else None
        policy = load_policy(args.model, rule=args.rule, stop_iou=args.stop_iou or None, max_clicks=args.max_steps)
        tool = make_tool(args.tool)
        episode, trace = segment_image(policy, tool, loaded, args.query, gt=gt, mask_init=init,
                                       max_steps=args.max_steps, history=args.history)
        summary = write_outputs(Path(args.out), episode, trace, loaded, source_path=str(args.image),
                                model="oracle" if is_oracle(args.model) else args.model, tool_name=args.tool)
    except (SourceError, PolicyUnavailable, ImageError, WindowError, ValueError, FileNotFoundError) as e:
        print(f"ibis-jax segment: error: {e}", file=sys.stderr)
        return 1
    for step in summary["steps"]:
        iou = "" if step["iou"] is None else f"  IoU {step['iou']:.4f}"
        print(f"{step['action'] or '(unparseable)'}{iou}")
    final = "" if summary["final_iou"] is None else f", IoU {summary['final_iou']:.4f} / Dice {summary['final_dice']:.4f}"
    print(f"{summary['clicks']} clicks, ended by {summary['end_reason']}{final}")
    print(f"mask: {summary['mask']}\nreport: {summary['report']}\ngif: {summary['gif']}")
    return 0
