"""Volumes for 3D episodes: NIfTI files, DICOM series, synthetic ellipsoids.

A :class:`Volume` is what a volume episode and a volume tool see: the windowed display values
``uint8 [D, H, W]`` in *view order* and the voxel spacing ``(sd, sh, sw)`` in mm, plus what is
needed to write a mask back into the input's own voxel grid (its affine, shape and orientation).

View order: the file is reoriented to RAS (``nib.as_closest_canonical``), the viewing ``axis``
(axial = 2) becomes axis 0, and every slice is rotated like ``data.sources.nifti.slice_volume``
(anterior / superior up, the patient's left on the image's left), so ``view[k]`` is exactly the
2D slice ``k`` the NIfTI source cuts. :func:`to_view` / :func:`from_view` convert.

Bad input raises :class:`VolumeInputError` (a ``SourceError`` that also names the offending
``field``): a 4D NIfTI, a label map whose shape or affine differs from the image, an empty target,
a DICOM series with mixed series, missing or duplicated slices, or uneven spacing.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from ibis_jax.data.sources.base import SourceError
from ibis_jax.data.windowing import Window, WindowError, default_window, parse_window
from ibis_jax.fileio import atomic_file

AXES = {"sagittal": 0, "coronal": 1, "axial": 2}


class VolumeInputError(SourceError):
    """Bad volume input: ``path`` (file), ``field`` (header field or property) and a fix in ``detail``."""

    def __init__(self, path: str | Path, reason: str, field: str, detail: str):
        super().__init__(path, reason, f"{field}: {detail}")
        self.field = field

    def __reduce__(self):
        return (VolumeInputError, (self.path, self.reason, self.field, self.detail.split(": ", 1)[-1]))


def to_view(ras: np.ndarray, axis: int) -> np.ndarray:
    """RAS array ``[X, Y, Z]`` -> view order ``[D, H, W]`` (slices along ``axis``, each rot90)."""
    return np.ascontiguousarray(np.rot90(np.moveaxis(ras, axis, 0), k=1, axes=(1, 2)))


def from_view(view: np.ndarray, axis: int) -> np.ndarray:
    """The inverse of :func:`to_view`."""
    return np.ascontiguousarray(np.moveaxis(np.rot90(view, k=-1, axes=(1, 2)), 0, axis))


def view_spacing(ras_spacing, axis: int) -> tuple[float, float, float]:
    """RAS voxel sizes -> view order: (slice axis, rows = the second other axis, cols = the first)."""
    a, b = (i for i in range(3) if i != axis)
    return (float(ras_spacing[axis]), float(ras_spacing[b]), float(ras_spacing[a]))


@dataclasses.dataclass
class Volume:
    """A windowed volume in view order. ``image`` is the nibabel image (file orientation) whose
    affine and shape a mask is written back with; ``axis`` is the RAS viewing axis."""

    display: np.ndarray  # uint8 [D, H, W]
    spacing: tuple[float, float, float]  # mm, view order
    axis: int
    image: Any  # nibabel.Nifti1Image in the input's own orientation
    path: str
    modality: str = "unknown"
    window: str = "none"
    # A DICOM series: its files in slice order (k of ``image``'s data), what a DICOM-SEG references.
    sources: tuple[str, ...] = ()

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.display.shape)

    def rgb_slice(self, index: int) -> np.ndarray:
        plane = self.display[index]
        return np.repeat(plane[:, :, None], 3, axis=2)

    def mask_image(self, mask: np.ndarray):
        """A view-order mask ``bool [D, H, W]`` as a ``uint8`` NIfTI in the input's voxel grid and affine."""
        import nibabel as nib
        from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

        if mask.shape != self.display.shape:
            raise ValueError(f"mask shape {mask.shape} differs from the volume's view shape {self.display.shape}")
        ras = from_view(mask.astype(np.uint8), self.axis)
        transform = ornt_transform(axcodes2ornt(("R", "A", "S")), io_orientation(self.image.affine))
        data = np.ascontiguousarray(apply_orientation(ras, transform))
        out = nib.Nifti1Image(data, self.image.affine)
        out.set_data_dtype(np.uint8)
        out.set_qform(self.image.affine, code=1)
        out.set_sform(self.image.affine, code=1)
        return out


def resolve_axis(axis: int | str) -> int:
    from ibis_jax.data.sources.nifti import resolve_axis as resolve

    return resolve(axis)


def _canonical_data(image, path: Path, what: str) -> tuple[np.ndarray, tuple[float, ...]]:
    import nibabel as nib

    shape = image.shape
    if len(shape) == 4 and shape[3] == 1:
        image = image.slicer[..., 0]
    elif len(shape) != 3:
        raise VolumeInputError(path, "corrupt_image", "dim", (
            f"{what} has shape {tuple(shape)}, not a 3D volume; pick one volume of a 4D series first "
            "(e.g. nibabel.four_to_three or fslroi)"))
    canonical = nib.as_closest_canonical(image)
    data = np.asanyarray(canonical.dataobj)
    return data, tuple(float(z) for z in canonical.header.get_zooms()[:3])


def load_nifti_image(path: str | Path, what: str = "volume"):
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise VolumeInputError(path, "missing_file", "path", f"{what} file does not exist")
    try:
        return nib.load(str(path))
    except Exception as e:  # nibabel raises many types for invalid files
        raise VolumeInputError(path, "corrupt_image", "header", f"cannot read NIfTI ({type(e).__name__}: {e})") from None


def volume_from_image(image, path: str | Path, *, axis: int | str = "axial", window: str | Window | None = None,
                      modality: str = "unknown") -> Volume:
    """A :class:`Volume` from a nibabel image (windowed once over the whole volume)."""
    path = Path(path)
    axis = resolve_axis(axis)
    data, zooms = _canonical_data(image, path, "volume")
    if data.size and np.issubdtype(data.dtype, np.floating) and not np.all(np.isfinite(data)):
        raise VolumeInputError(path, "nan_values", "data", "volume has NaN/infinite voxels; fill them first")
    chosen: Window = window if isinstance(window, Window) else (parse_window(window) if window else default_window(modality))
    try:
        display = chosen.apply(data, where=str(path), nonzero=chosen.kind == "percentile")
    except WindowError as e:
        raise VolumeInputError(path, "nan_values", "window", str(e)) from None
    return Volume(to_view(display, axis), view_spacing(zooms, axis), axis, image, str(path), modality,
                  chosen.describe())


def load_nifti_volume(path: str | Path, *, axis: int | str = "axial", window: str | None = None,
                      modality: str = "unknown") -> Volume:
    return volume_from_image(load_nifti_image(path), path, axis=axis, window=window, modality=modality)


def load_label_volume(path: str | Path, volume: Volume, label: int | None = None, *, what: str = "gt") -> np.ndarray:
    """A label map aligned with ``volume`` -> view-order ``bool [D, H, W]`` (``== label``, or non-zero).

    The label file must have the image's shape and affine (to 1e-3 mm): resampling a label map
    silently would move the target.
    """
    path = Path(path)
    image = load_nifti_image(path, what)
    ref = volume.image
    if tuple(image.shape[:3]) != tuple(ref.shape[:3]) or (len(image.shape) > 3 and image.shape[3] != 1):
        raise VolumeInputError(path, "size_mismatch", "dim", (
            f"{what} shape {tuple(image.shape)} differs from the image's {tuple(ref.shape)} ({volume.path}); "
            "give the label map of this image, or resample it onto the image grid first"))
    if not np.allclose(image.affine, ref.affine, atol=1e-3):
        raise VolumeInputError(path, "size_mismatch", "affine", (
            f"{what} affine differs from the image's ({volume.path}):\n{np.round(image.affine, 4)}\nvs\n"
            f"{np.round(ref.affine, 4)}; resample the label map onto the image grid (same voxels, same affine)"))
    data, _ = _canonical_data(image, path, what)
    mask = (data == label) if label is not None else (data != 0)
    if not mask.any():
        present = np.unique(data)[:12].tolist()
        raise VolumeInputError(path, "missing_target", "label", (
            f"{what} has no voxel with label {label if label is not None else '!= 0'} (labels present: "
            f"{present}); pass the target's label value"))
    return to_view(mask, volume.axis)


def save_nifti_atomic(image, path: str | Path) -> Path:
    """Writes a NIfTI under a temporary name in the same folder, then renames it into place, so a
    failure never leaves a half-written mask at ``path`` (:func:`ibis_jax.fileio.atomic_file`)."""
    import nibabel as nib

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else ".nii"
    with atomic_file(path, suffix=suffix) as tmp:  # nibabel picks the format by the extension
        nib.save(image, tmp)
    return path


# -- DICOM series ----------------------------------------------------------------------------------

def _floats(ds, name: str, count: int, path: Path) -> np.ndarray:
    value = getattr(ds, name, None)
    try:
        out = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        out = np.array([])
    if out.shape != (count,) or not np.all(np.isfinite(out)):
        raise VolumeInputError(path, "unreadable_dicom", name, (
            f"missing or malformed ({value!r}); a series needs {name} on every slice to be stacked"))
    return out


def load_dicom_series(folder: str | Path, *, axis: int | str = "axial", window: str | None = None,
                      modality: str | None = None, spacing_tolerance: float = 0.01) -> Volume:
    """A folder of single-frame DICOM files of one series -> a :class:`Volume`.

    Slices are ordered by their position along the slice normal (``ImageOrientationPatient`` x
    ``ImagePositionPatient``), not by file name or ``InstanceNumber``. Raises
    :class:`VolumeInputError` for several series in one folder, differing orientation, pixel
    spacing or size, duplicated positions, missing slices (a gap over 1.5 times the usual step) and
    uneven steps (more than ``spacing_tolerance`` relative). The affine maps (col, row, slice) to
    RAS millimetres (DICOM's LPS with x and y negated).
    """
    import nibabel as nib

    from ibis_jax.data.sources.dicom import MODALITY_NAMES, dicom_window, read_dicom

    folder = Path(folder)
    if not folder.is_dir():
        raise VolumeInputError(folder, "missing_file", "path", "DICOM series folder does not exist")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if len(files) < 2:
        raise VolumeInputError(folder, "missing_file", "files", f"{len(files)} file(s); a series needs 2 slices or more")
    slices = []
    for path in files:
        values, ds = read_dicom(path)
        slices.append((path, values, ds))
    first_path, _, first = slices[0]
    series = {str(getattr(ds, "SeriesInstanceUID", "")) for _, _, ds in slices}
    if len(series) > 1:
        raise VolumeInputError(folder, "corrupt_image", "SeriesInstanceUID", (
            f"{len(series)} series in one folder; put each series in its own folder"))
    orientation = _floats(first, "ImageOrientationPatient", 6, first_path)
    pixel = _floats(first, "PixelSpacing", 2, first_path)
    for path, values, ds in slices[1:]:
        if not np.allclose(_floats(ds, "ImageOrientationPatient", 6, path), orientation, atol=1e-4):
            raise VolumeInputError(path, "corrupt_image", "ImageOrientationPatient",
                                   f"differs from {first_path.name}'s; a series must share one orientation")
        if not np.allclose(_floats(ds, "PixelSpacing", 2, path), pixel, rtol=1e-4):
            raise VolumeInputError(path, "corrupt_image", "PixelSpacing",
                                   f"differs from {first_path.name}'s; a series must share one pixel spacing")
        if values.shape != slices[0][1].shape:
            raise VolumeInputError(path, "size_mismatch", "Rows/Columns",
                                   f"{values.shape} differs from {first_path.name}'s {slices[0][1].shape}")
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    positions = [_floats(ds, "ImagePositionPatient", 3, path) for path, _, ds in slices]
    depth = np.array([float(p @ normal) for p in positions])
    order = np.argsort(depth, kind="stable")
    depth, slices = depth[order], [slices[i] for i in order]
    positions = [positions[i] for i in order]
    steps = np.diff(depth)
    for i, step in enumerate(steps):
        if step < 1e-3:
            raise VolumeInputError(slices[i + 1][0], "corrupt_image", "ImagePositionPatient", (
                f"same slice position as {slices[i][0].name} ({depth[i]:.3f} mm along the normal): a "
                "duplicated slice; remove one of them"))
    usual = float(np.median(steps))
    for i, step in enumerate(steps):
        if step > 1.5 * usual:
            raise VolumeInputError(slices[i + 1][0], "corrupt_image", "ImagePositionPatient", (
                f"{step:.3f} mm after {slices[i][0].name} where the series steps {usual:.3f} mm: "
                f"about {round(step / usual) - 1} slice(s) missing; restore them or segment the parts separately"))
    if steps.max() - steps.min() > spacing_tolerance * usual:
        worst = int(np.argmax(np.abs(steps - usual)))
        raise VolumeInputError(slices[worst + 1][0], "corrupt_image", "ImagePositionPatient", (
            f"inconsistent slice spacing: steps from {steps.min():.3f} to {steps.max():.3f} mm (more than "
            f"{spacing_tolerance:.0%} apart); resample the series to even spacing first"))
    # data [col, row, slice]; voxel (i, j, k) -> position + i * dc * row_dir + j * dr * col_dir + k * step
    data = np.stack([values.T for _, values, _ in slices], axis=-1)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * pixel[1]
    lps[:3, 1] = col_dir * pixel[0]
    lps[:3, 2] = (positions[-1] - positions[0]) / (len(slices) - 1)
    lps[:3, 3] = positions[0]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    image = nib.Nifti1Image(data.astype(np.float32), affine)
    tag = str(getattr(first, "Modality", "") or "").upper()
    modality = modality or MODALITY_NAMES.get(tag, tag or "unknown")
    chosen = dicom_window(first, "CT" if modality.upper() == "CT" else modality, window, first_path)
    volume = volume_from_image(image, folder, axis=axis, window=chosen, modality=modality)
    volume.sources = tuple(str(path) for path, _, _ in slices)
    return volume


# -- synthetic shapes ------------------------------------------------------------------------------

def ellipsoid_volume(seed: int, shape: tuple[int, int, int] = (32, 32, 32),
                     spacing: tuple[float, float, float] = (1.0, 1.0, 1.0), *, noise: float = 18.0):
    """A synthetic test volume: one bright ellipsoid (the target, random centre, radii and
    rotation about the slice axis) and a dimmer distractor blob, on a noisy background.

    Returns ``(display uint8 [D, H, W], target bool [D, H, W], spacing)``, view order; radii are
    in mm, so with thick slices the target spans fewer slices.
    """
    rng = np.random.default_rng(seed)
    d, h, w = shape
    zz, yy, xx = np.meshgrid(*(np.arange(n) * s for n, s in zip(shape, spacing)), indexing="ij")
    extent = np.array([d * spacing[0], h * spacing[1], w * spacing[2]])
    radii = rng.uniform(0.15, 0.3, size=3) * extent
    centre = rng.uniform(0.35, 0.65, size=3) * extent
    angle = rng.uniform(0, np.pi)
    dy, dx = yy - centre[1], xx - centre[2]
    u, v = np.cos(angle) * dy + np.sin(angle) * dx, -np.sin(angle) * dy + np.cos(angle) * dx
    target = ((zz - centre[0]) / radii[0]) ** 2 + (u / radii[1]) ** 2 + (v / radii[2]) ** 2 <= 1.0
    values = np.full(shape, 60.0)
    other = rng.uniform(0.2, 0.8, size=3) * extent
    blob = ((zz - other[0]) ** 2 + (yy - other[1]) ** 2 + (xx - other[2]) ** 2) <= (0.12 * extent.min()) ** 2
    values[blob & ~target] = 140.0
    values[target] = 170.0
    values += rng.normal(0.0, noise, size=shape)
    return np.clip(np.rint(values), 0, 255).astype(np.uint8), target, tuple(float(s) for s in spacing)
