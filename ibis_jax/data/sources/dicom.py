"""DICOM slices (pydicom) with per-slice mask PNGs.

Layout::

    DICOM_DIR/  IM0001.dcm  IM0002.dcm ...       (any names; files without masks are ignored)
    MASK_DIR/   IM0001_liver.png                  <stem>_<target>.png, '+' = space, or
                IM0002.png                        <stem>.png with ``default_target`` / a label map

Pixel values go through the modality LUT by hand, ``value = raw * RescaleSlope +
RescaleIntercept`` (HU for CT), then through a window: ``window=`` if given; otherwise the file's
own WindowCenter/WindowWidth for CT (falling back to the abdomen preset), percentiles for other
modalities. The modality is the file's ``Modality`` tag (``CT``, ``MR`` -> ``MRI``) unless
``modality=`` overrides it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ibis_jax.data.images import to_rgb_uint8
from ibis_jax.data.sources.base import Item, Sample, SourceError, sample_with_mask_file
from ibis_jax.data.sources.folder import IMAGE_SUFFIXES
from ibis_jax.data.windowing import CT_PRESETS, Window, WindowError, parse_window

MODALITY_NAMES = {"CT": "CT", "MR": "MRI", "CR": "X-Ray", "DX": "X-Ray", "US": "Ultrasound", "PT": "PET"}


def _first(value) -> float:
    """DICOM multi-valued numbers (WindowCenter "40\\400") -> the first as a float."""
    try:
        return float(value[0]) if not isinstance(value, (str, bytes, int, float)) else float(value)
    except (TypeError, ValueError, IndexError):
        return float("nan")


def read_dicom(path: str | Path) -> tuple[np.ndarray, "object"]:
    """Reads one DICOM file: returns rescaled values ``float64 [rows, cols]`` and the dataset."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    path = Path(path)
    if not path.is_file():
        raise SourceError(path, "missing_file", "file does not exist")
    try:
        ds = pydicom.dcmread(str(path))
        raw = ds.pixel_array
    except (InvalidDicomError, AttributeError, KeyError, ValueError, OSError, RuntimeError, EOFError) as e:
        raise SourceError(
            path, "unreadable_dicom",
            f"not a readable DICOM image ({type(e).__name__}: {e}); compressed transfer syntaxes need "
            "pylibjpeg or gdcm installed",
        ) from None
    if raw.ndim != 2:
        raise SourceError(path, "unreadable_dicom", f"expected one 2D frame, got pixel array shape {raw.shape}")
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    return raw.astype(np.float64) * slope + intercept, ds


def dicom_window(ds, values_modality: str, spec: str | None, path: str | Path) -> Window:
    """The window for one file: the spec, else the file's own (CT) or percentiles (others)."""
    window = parse_window(spec) if spec else (parse_window("dicom") if values_modality == "CT" else Window("percentile"))
    if window.kind != "dicom":
        return window
    center, width = _first(getattr(ds, "WindowCenter", None)), _first(getattr(ds, "WindowWidth", None))
    if np.isfinite(center) and np.isfinite(width) and width > 0:
        return Window.level_width(center, width, name=f"dicom:{center:g},{width:g}")
    if values_modality == "CT":
        level, width = CT_PRESETS["abdomen"]
        return Window.level_width(level, width, name="abdomen")
    return Window("percentile")


@dataclasses.dataclass(frozen=True)
class DicomSource:
    """DICOM files paired with mask PNGs by file stem. See the module docstring.

    Attributes:
      dicom: a folder of DICOM files (searched recursively) or one file.
      masks: the mask folder.
      targets: ``(name, label)`` pairs when masks are label maps; empty: binary masks.
      default_target: target name of a binary mask named exactly like its DICOM file.
    """

    dicom: str
    masks: str
    targets: tuple[tuple[str, int], ...] = ()
    modality: str | None = None
    window: str | None = None
    default_target: str = "target"
    name: str = "dicom"

    def items(self) -> list[Item]:
        root, mask_dir = Path(self.dicom), Path(self.masks)
        if not mask_dir.is_dir():
            raise SourceError(mask_dir, "missing_file", "mask folder does not exist; pass --masks")
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        masks = sorted(p for p in mask_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        items = []
        for dicom_path in files:
            stem = dicom_path.stem if dicom_path.suffix.lower() in (".dcm", ".dicom", ".ima") else dicom_path.name
            for mask_path in masks:
                if mask_path.stem == stem:
                    pairs = [(n, v) for n, v in self.targets] or [(self.default_target, None)]
                elif mask_path.stem.startswith(stem + "_"):
                    pairs = [(mask_path.stem[len(stem) + 1:].replace("+", " "), None)]
                else:
                    continue
                for target, label in pairs:
                    item_id = f"{stem}/{target.replace(' ', '+')}"
                    items.append(Item(item_id, (str(dicom_path), str(mask_path), target, label)))
        return items

    def load(self, item: Item) -> Iterator[Sample]:
        dicom_path, mask_path, target, label = item.spec
        values, ds = read_dicom(dicom_path)
        tag = str(getattr(ds, "Modality", "") or "").upper()
        modality = self.modality or MODALITY_NAMES.get(tag, tag or "unknown")
        window = dicom_window(ds, "CT" if modality.upper() == "CT" else modality, self.window, dicom_path)
        try:
            gray = window.apply(values, where=dicom_path)
        except WindowError as e:
            raise SourceError(dicom_path, "nan_values", str(e).split(": ", 1)[-1]) from None
        image = to_rgb_uint8(gray, where=dicom_path)
        rescale = [float(getattr(ds, "RescaleSlope", 1.0) or 1.0),
                   float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)]
        yield sample_with_mask_file(self.name, item, image, mask_path, label, target, modality, {
            "dicom": dicom_path, "mask": mask_path, "window": window.describe(), "rescale": rescale})
