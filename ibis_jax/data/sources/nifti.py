"""NIfTI volumes with label maps (nibabel), cut into 2D slices.

Pairs: ``images`` and ``labels`` are either two files or two folders whose files pair by name
(nnU-Net's ``_0000`` channel suffix is ignored: ``imagesTr/liver_3_0000.nii.gz`` pairs with
``labelsTr/liver_3.nii.gz``). Targets come from ``targets`` (``("liver", 1)``) or, when not given,
from an MSD/nnU-Net ``dataset.json`` next to the label folder (``"labels": {"1": "liver"}``).

Each (volume, target) is one unit of work. Both volumes are reoriented to RAS
(``nib.as_closest_canonical``), windowed once over the whole volume (so every slice of a volume
shares one contrast), then sliced along ``axis`` and rotated so that anterior / superior is up
(neurological convention: the patient's left is on the image's left).

Slice selection: slices whose target covers at least ``min_area`` pixels are kept (every
``slice_stride``-th of them); slices where the target is absent are kept at ``empty_ratio`` per
kept target slice (randomly, seeded by the volume) for "is there a ...?" training; slices with a
few stray target pixels (``0 < area < min_area``) are dropped as ambiguous.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ibis_jax.data.images import to_rgb_uint8
from ibis_jax.data.sources.base import Item, Sample, SourceError, stable_seed
from ibis_jax.data.windowing import WindowError, default_window, parse_window

AXES = {"sagittal": 0, "coronal": 1, "axial": 2}
NIFTI_SUFFIXES = (".nii", ".nii.gz")


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _case_name(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    # nnU-Net: case_0000 is channel 0 of case; its label file is plain "case".
    if len(name) > 5 and name[-5] == "_" and name[-4:].isdigit():
        name = name[:-5]
    return name


def resolve_axis(axis: int | str) -> int:
    if isinstance(axis, str) and not axis.isdigit():
        if axis.lower() not in AXES:
            raise ValueError(f"axis {axis!r}: use 0, 1, 2 or one of {list(AXES)}")
        return AXES[axis.lower()]
    value = int(axis)
    if value not in (0, 1, 2):
        raise ValueError(f"axis {axis!r}: a volume has axes 0, 1, 2")
    return value


def load_volume(path: str | Path) -> np.ndarray:
    """Reads a NIfTI file reoriented to RAS as a float64 or integer array ``[X, Y, Z]``."""
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise SourceError(path, "missing_file", "file does not exist")
    try:
        img = nib.as_closest_canonical(nib.load(str(path)))
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # nibabel raises many types for truncated/invalid files
        raise SourceError(path, "corrupt_image", f"cannot read NIfTI ({type(e).__name__}: {e})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise SourceError(path, "corrupt_image", f"expected a 3D volume, got shape {data.shape}")
    return data


def slice_volume(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """The 2D slice ``index`` along ``axis`` of a RAS volume, rotated so anterior/superior is up."""
    return np.rot90(np.take(volume, index, axis=axis))


def select_slices(
    areas: np.ndarray, *, min_area: int, slice_stride: int, empty_ratio: float, seed: int,
    candidates_empty: np.ndarray | None = None,
) -> tuple[list[int], list[int]]:
    """Chooses (target slices, empty slices) from per-slice target areas ``int [num_slices]``.

    ``candidates_empty`` (``bool [num_slices]``) limits empty slices to ones showing anatomy.
    """
    full = np.flatnonzero(areas >= max(1, min_area))[:: max(1, slice_stride)].tolist()
    empty_pool = np.flatnonzero(areas == 0)
    if candidates_empty is not None:
        empty_pool = empty_pool[candidates_empty[empty_pool]]
    count = min(len(empty_pool), int(round(empty_ratio * len(full))))
    rng = np.random.default_rng(seed)
    empty = sorted(rng.choice(empty_pool, size=count, replace=False).tolist()) if count else []
    return full, empty


@dataclasses.dataclass(frozen=True)
class NiftiSource:
    """Slices of NIfTI volumes with a label map. See the module docstring.

    Attributes:
      images, labels: two NIfTI files, or two folders of them paired by case name.
      targets: ``(name, label value)`` pairs; empty: read ``dataset.json``.
      modality: e.g. ``CT`` or ``MRI``; empty: ``dataset.json`` or ``unknown``.
      window: window spec; default abdomen for CT, percentiles otherwise.
      axis: ``axial`` / ``coronal`` / ``sagittal`` or 0 / 1 / 2 (RAS axes).
    """

    images: str
    labels: str
    targets: tuple[tuple[str, int], ...] = ()
    modality: str = ""
    window: str | None = None
    axis: str = "axial"
    min_area: int = 16
    slice_stride: int = 1
    empty_ratio: float = 0.0
    seed: int = 0
    name: str = "nifti"

    def _dataset_json(self) -> dict:
        labels = Path(self.labels)
        for folder in (labels if labels.is_dir() else labels.parent, (labels if labels.is_dir() else labels.parent).parent):
            candidate = folder / "dataset.json"
            if candidate.is_file():
                try:
                    return json.loads(candidate.read_text())
                except ValueError as e:
                    raise SourceError(candidate, "corrupt_image", f"cannot parse dataset.json: {e}") from None
        return {}

    def _targets_and_modality(self) -> tuple[tuple[tuple[str, int], ...], str]:
        targets, modality = self.targets, self.modality
        if targets and modality:
            return targets, modality
        meta = self._dataset_json()
        if not targets:
            names = meta.get("labels", {})
            # MSD: {"0": "background", "1": "liver"}; nnU-Net v2: {"background": 0, "liver": 1}.
            pairs = [(v, int(k)) for k, v in names.items() if str(k).isdigit()] or [
                (k, int(v)) for k, v in names.items() if isinstance(v, int)
            ]
            targets = tuple((str(n), v) for n, v in pairs if v != 0 and str(n).lower() != "background")
            if not targets:
                raise ValueError(
                    f"no targets for {self.labels}: pass --target NAME=LABEL or put a dataset.json "
                    'with "labels" next to the label folder'
                )
        if not modality:
            found = meta.get("modality") or meta.get("channel_names") or {}
            modality = str(next(iter(found.values()), "unknown")) if isinstance(found, dict) else "unknown"
        return targets, modality

    def _pairs(self) -> list[tuple[str, Path, Path]]:
        images, labels = Path(self.images), Path(self.labels)
        if images.is_dir() != labels.is_dir():
            raise ValueError("--images and --labels must both be files or both be folders")
        if not images.is_dir():
            return [(_case_name(images), images, labels)]
        label_files = {_case_name(p): p for p in sorted(labels.iterdir()) if _is_nifti(p)}
        pairs = []
        for image in sorted(p for p in images.iterdir() if _is_nifti(p)):
            case = _case_name(image)
            pairs.append((case, image, label_files.get(case, labels / f"{case}.nii.gz")))
        return pairs

    def items(self) -> list[Item]:
        targets, modality = self._targets_and_modality()
        resolve_axis(self.axis)
        return [
            Item(f"{case}/{name.replace(' ', '+')}", (str(image), str(label), name, value, modality))
            for case, image, label in self._pairs()
            for name, value in targets
        ]

    def load(self, item: Item) -> Iterator[Sample]:
        image_path, label_path, target, label_value, modality = item.spec
        axis = resolve_axis(self.axis)
        volume = load_volume(image_path)
        labels = load_volume(label_path)
        if volume.shape != labels.shape:
            raise SourceError(
                label_path, "size_mismatch",
                f"label map shape {labels.shape} differs from image volume {volume.shape} ({image_path})",
            )
        if np.issubdtype(volume.dtype, np.floating):
            bad = int(np.count_nonzero(~np.isfinite(volume)))
            if bad:
                raise SourceError(
                    image_path, "nan_values",
                    f"volume has {bad} NaN/infinite voxels; fill them (e.g. with the background value) first",
                )
        target_map = labels == label_value
        if not target_map.any():
            present = np.unique(labels)[:12].tolist()
            raise SourceError(
                label_path, "missing_target",
                f"target {target!r} (label {label_value}) does not occur in the label map (labels present: {present})",
            )
        window = parse_window(self.window) if self.window else default_window(modality)
        try:
            display = window.apply(volume, where=image_path, nonzero=window.kind == "percentile")
        except WindowError as e:
            raise SourceError(image_path, "nan_values", str(e).split(": ", 1)[-1]) from None
        other_axes = tuple(a for a in range(3) if a != axis)
        areas = target_map.sum(axis=other_axes)
        anatomy = (display > 0).sum(axis=other_axes) > 0.05 * np.prod([volume.shape[a] for a in other_axes])
        full, empty = select_slices(
            areas, min_area=self.min_area, slice_stride=self.slice_stride, empty_ratio=self.empty_ratio,
            seed=stable_seed(self.seed, item.item_id), candidates_empty=anatomy,
        )
        axis_name = next((k for k, v in AXES.items() if v == axis), str(axis))
        for index in sorted(full + empty):
            image = to_rgb_uint8(slice_volume(display, axis, index), where=f"{image_path} slice {index}")
            mask = np.ascontiguousarray(slice_volume(target_map, axis, index))
            yield Sample(
                image=image,
                mask=mask,
                target=target,
                modality=modality,
                sample_id=f"{item.item_id}/{axis_name}{index:04d}",
                source=self.name,
                provenance={
                    "image": image_path, "labels": label_path, "label": int(label_value),
                    "axis": axis_name, "slice": int(index), "window": window.describe(),
                },
            )
