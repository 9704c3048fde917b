"""Volume sources: each lists units of work (``items``) and loads them into ``VolumeSample``s.

The 3D counterpart of the 2D sources (same ``items`` / ``load`` protocol, same ``SourceError``
with a reason), for evaluation and the volume benchmarks:

- :class:`EllipsoidVolumeSource`: synthetic ellipsoids with a distractor blob (``ellipsoid_volume``),
  every other one with 2 mm slices;
- :class:`MNIVolumeSource`: the MNI152 2009a T1 template from the nilearn wheel with its white and
  grey matter probability maps (target = probability >= 0.5), block-averaged by ``factor``;
- :class:`StardistVolumeSource`: the stardist wheel's 3D fluorescence nuclei sample
  (``img3d.tif`` 31 x 61 x 57 and its instance labels ``mask3d.tif``; target: all cell nuclei; the
  file records no voxel size, so the spacing is taken as 1 per voxel);
- :class:`ManifestVolumeSource`: a JSON list of your own scans, each a NIfTI file or a DICOM series
  folder with an aligned label NIfTI::

      [{"image": "ct/case1.nii.gz", "labels": "ct/case1_seg.nii.gz", "target": "liver",
        "label": 1, "modality": "CT", "window": "abdomen", "axis": "axial"}]

  (paths relative to the manifest; ``label`` null = any non-zero voxel; ``window``/``axis``
  optional).

:func:`volume_source` builds one from the command line's ``--volumes`` spec: ``ellipsoids[:N]``,
``mni[:FACTOR]``, ``stardist`` or a manifest path.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ibis_jax.data.sources.base import Item, SourceError
from ibis_jax.data.sources.demo import MNI_FILES, MRI_TARGETS, mni_path, package_dir
from ibis_jax.data.volumes import (
    ellipsoid_volume,
    load_dicom_series,
    load_label_volume,
    load_nifti_volume,
    to_view,
    view_spacing,
)
from ibis_jax.data.windowing import window_percentile


@dataclasses.dataclass(frozen=True)
class VolumeSample:
    """One volume with one target, ready for a volume episode.

    volume: windowed ``uint8 [D, H, W]`` in view order (``data.volumes``); spacing: ``(sd, sh, sw)``
    mm; mask: ``bool [D, H, W]``; the rest as in the 2D ``Sample``.
    """

    volume: np.ndarray
    spacing: tuple[float, float, float]
    mask: np.ndarray
    target: str
    modality: str
    sample_id: str
    source: str
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class EllipsoidVolumeSource:
    kind = "volume"  # the runner's cue for a volume tool
    name = "ellipsoids"
    num: int = 8
    side: int = 32
    seed: int = 0

    def __post_init__(self):
        if self.num < 1 or self.side < 8:
            raise ValueError(f"ellipsoids: need num >= 1 and side >= 8, got num={self.num}, side={self.side}")

    def items(self) -> list[Item]:
        return [Item(f"ellipsoid_{i:04d}", (self.seed + i,)) for i in range(self.num)]

    def load(self, item: Item) -> Iterator[VolumeSample]:
        (seed,) = item.spec
        spacing = (2.0, 1.0, 1.0) if seed % 2 else (1.0, 1.0, 1.0)
        volume, mask, spacing = ellipsoid_volume(seed, (self.side,) * 3, spacing)
        yield VolumeSample(volume, spacing, mask, "ellipsoid", "synthetic", item.item_id, self.name,
                           {"seed": seed, "side": self.side})


def _pool(data: np.ndarray, factor: int) -> np.ndarray:
    """Block average by ``factor`` along every axis (the trailing remainder is dropped)."""
    shape = [n // factor * factor for n in data.shape]
    data = data[: shape[0], : shape[1], : shape[2]].astype(np.float64)
    return data.reshape(shape[0] // factor, factor, shape[1] // factor, factor, shape[2] // factor, factor).mean(axis=(1, 3, 5))


@dataclasses.dataclass
class MNIVolumeSource:
    kind = "volume"  # the runner's cue for a volume tool
    name = "mni"
    targets: tuple[str, ...] = tuple(MRI_TARGETS)
    factor: int = 3
    axis: int = 2

    def __post_init__(self):
        self.targets = tuple(self.targets)
        if any(t not in MRI_TARGETS for t in self.targets) or self.factor < 1:
            raise ValueError(f"mni: targets from {sorted(MRI_TARGETS)} and factor >= 1, got {self.targets}, {self.factor}")

    def items(self) -> list[Item]:
        return [Item(f"mni_{MRI_TARGETS[t]}_x{self.factor}", (t,)) for t in self.targets]

    def load(self, item: Item) -> Iterator[VolumeSample]:
        import nibabel as nib

        (target,) = item.spec
        t1 = nib.as_closest_canonical(nib.load(str(mni_path("t1"))))
        prob = nib.as_closest_canonical(nib.load(str(mni_path(MRI_TARGETS[target]))))
        zooms = np.array(t1.header.get_zooms()[:3]) * self.factor
        display = window_percentile(_pool(np.asarray(t1.dataobj), self.factor), nonzero=True)
        mask = _pool(np.asarray(prob.dataobj), self.factor) >= 0.5
        yield VolumeSample(to_view(display, self.axis), view_spacing(zooms, self.axis), to_view(mask, self.axis),
                           target, "MRI", item.item_id, self.name,
                           {"package": "nilearn", "image": MNI_FILES["t1"], "mask": MNI_FILES[MRI_TARGETS[target]],
                            "factor": self.factor, "threshold": 0.5})


@dataclasses.dataclass
class StardistVolumeSource:
    kind = "volume"  # the runner's cue for a volume tool
    name = "stardist"
    FILES = ("img3d.tif", "mask3d.tif")

    def _paths(self) -> list[Path]:
        folder = package_dir("stardist", "install its wheel without dependencies: "
                             "pip install --no-deps stardist==0.9.2 csbdeep==0.8.2 (scripts/install.sh does)")
        paths = [folder / "data" / "images" / f for f in self.FILES]
        for path in paths:
            if not path.is_file():
                raise SourceError(path, "missing_file", "the stardist wheel should ship this file; reinstall stardist")
        return paths

    def items(self) -> list[Item]:
        self._paths()  # an optional package: checked before any work starts
        return [Item("stardist_nuclei3d", ())]

    def load(self, item: Item) -> Iterator[VolumeSample]:
        import tifffile

        paths = self._paths()
        image, labels = (tifffile.imread(str(p)) for p in paths)
        if image.shape != labels.shape or image.ndim != 3:
            raise SourceError(paths[1], "size_mismatch", f"image {image.shape} and labels {labels.shape} differ")
        display = window_percentile(image, 0.5, 99.8, where=str(paths[0]))
        yield VolumeSample(display, (1.0, 1.0, 1.0), labels > 0, "cell nuclei", "Microscopy", item.item_id, self.name,
                           {"package": "stardist", "image": "data/images/img3d.tif", "mask": "data/images/mask3d.tif",
                            "nuclei": int(len(np.unique(labels)) - 1), "window": "percentile:0.5,99.8",
                            "spacing": "not recorded in the file: 1 per voxel"})


@dataclasses.dataclass
class ManifestVolumeSource:
    kind = "volume"  # the runner's cue for a volume tool
    name = "manifest"
    FIELDS = ("image", "labels", "target", "label", "modality", "window", "axis")
    manifest: str

    def __post_init__(self):
        self.manifest = str(self.manifest)
        self.path = Path(self.manifest)
        if not self.path.is_file():
            raise SourceError(self.path, "missing_file", "volume manifest does not exist")
        try:
            entries = json.loads(self.path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SourceError(self.path, "corrupt_image", f"volume manifest is not JSON ({e})") from None
        if not isinstance(entries, list) or not entries:
            raise SourceError(self.path, "missing_target", "volume manifest must be a non-empty JSON list of objects")
        for i, entry in enumerate(entries):
            missing = [k for k in ("image", "labels", "target") if not isinstance(entry, dict) or k not in entry]
            extra = [k for k in entry if k not in self.FIELDS] if isinstance(entry, dict) else []
            if missing or extra:
                raise SourceError(self.path, "missing_target", (
                    f"entry {i}: " + (f"missing field(s) {missing}" if missing else f"unknown field(s) {extra}")
                    + f"; each entry has image, labels, target and optionally {list(self.FIELDS[3:])}"))
        self.entries = entries

    def items(self) -> list[Item]:
        return [Item(f"vol_{i:04d}_{Path(e['image']).name.split('.')[0]}_{e['target'].replace(' ', '_')}", (i,))
                for i, e in enumerate(self.entries)]

    def load(self, item: Item) -> Iterator[VolumeSample]:
        (i,) = item.spec
        entry = self.entries[i]
        image = (self.path.parent / entry["image"]).resolve()
        labels = (self.path.parent / entry["labels"]).resolve()
        modality = entry.get("modality") or "unknown"
        axis, window = entry.get("axis") or "axial", entry.get("window")
        if image.is_dir():
            volume = load_dicom_series(image, axis=axis, window=window, modality=entry.get("modality"))
        else:
            volume = load_nifti_volume(image, axis=axis, window=window, modality=modality)
        mask = load_label_volume(labels, volume, entry.get("label"), what="labels")
        yield VolumeSample(volume.display, volume.spacing, mask, entry["target"], volume.modality, item.item_id,
                           self.name, {"image": str(image), "labels": str(labels), "label": entry.get("label"),
                                       "window": volume.window, "axis": volume.axis})


def volume_source(spec: str):
    """``ellipsoids[:N]``, ``mni[:FACTOR]`` or a manifest JSON path (the ``--volumes`` argument)."""
    name, _, arg = spec.partition(":")
    try:
        if name == "ellipsoids":
            return EllipsoidVolumeSource(int(arg) if arg else 8)
        if name == "mni":
            return MNIVolumeSource(factor=int(arg) if arg else 3)
        if name == "stardist" and not arg:
            return StardistVolumeSource()
    except ValueError as e:
        raise ValueError(f"--volumes {spec!r}: {e} (ellipsoids[:N], mni[:FACTOR], stardist or a manifest .json)") from None
    if spec.endswith(".json"):
        return ManifestVolumeSource(spec)
    raise ValueError(f"--volumes {spec!r}: use ellipsoids[:N], mni[:FACTOR], stardist or a manifest .json "
                     "(a list of {image, labels, target, label, modality})")
