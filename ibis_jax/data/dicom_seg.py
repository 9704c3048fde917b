"""A 3D mask as a DICOM Segmentation (DICOM-SEG) of the series it was drawn on, with highdicom.

``segment --volume SERIES_DIR --out-format dicom-seg`` writes one binary segment whose frames
reference the source slices (one frame per slice, ``SourceImageSequence`` per frame), in the
series' frame of reference, so PACS viewers and 3D Slicer overlay it on the scan. Only a DICOM
series input has source instances to reference: a NIfTI input gets a NIfTI mask.

highdicom is an optional extra (``pip install -e ".[dicom-seg]"``; ``all`` includes it). The file
is written under a temporary name and renamed, so a failure leaves no half-written SEG.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ibis_jax.data.volumes import Volume, VolumeInputError
from ibis_jax.fileio import atomic_file

INSTALL_HINT = 'pip install "highdicom==0.28.2" (or pip install -e ".[dicom-seg]")'


def require_highdicom() -> None:
    import importlib.util

    if importlib.util.find_spec("highdicom") is None:
        raise ValueError(f"--out-format dicom-seg needs highdicom: {INSTALL_HINT}")


def check_dicom_seg_input(volume_path: str | Path) -> None:
    """Before any work: the input must be a DICOM series folder and highdicom installed."""
    if not Path(volume_path).is_dir():
        raise ValueError(f"--out-format dicom-seg: {volume_path} is not a DICOM series folder; a DICOM-SEG "
                         "references the series' slices, so a NIfTI input can only get a NIfTI mask")
    require_highdicom()


def source_headers(volume: Volume) -> list:
    """The series' headers (no pixel data) in slice order; a named error for a header a DICOM-SEG
    needs from its sources."""
    import pydicom

    if not volume.sources:
        raise ValueError(f"{volume.path}: not a DICOM series (no source slices); write a NIfTI mask instead")
    sources = []
    for source in volume.sources:
        ds = pydicom.dcmread(source, stop_before_pixels=True)
        for field in ("StudyInstanceUID", "FrameOfReferenceUID"):
            if not getattr(ds, field, None):
                raise VolumeInputError(source, "unreadable_dicom", field, (
                    "missing; a DICOM-SEG must name the study and frame of reference of its source slices "
                    "(write a NIfTI mask, or fix the series' headers)"))
        sources.append(ds)
    return sources


def source_frames(volume: Volume, mask: np.ndarray) -> np.ndarray:
    """A view-order mask ``bool [D, H, W]`` -> ``bool [slices, Rows, Columns]`` in the order of
    ``volume.sources`` (the series' slice order, each frame in its file's pixel layout)."""
    data = np.asarray(volume.mask_image(mask).dataobj) > 0  # the loader's grid: [column, row, slice]
    if data.shape[2] != len(volume.sources):
        raise ValueError(f"{volume.path}: {len(volume.sources)} source slices for a mask of {data.shape[2]} slices")
    return np.ascontiguousarray(np.transpose(data, (2, 1, 0)))


def write_dicom_seg(volume: Volume, mask: np.ndarray, path: str | Path, *, label: str,
                    description: str = "") -> Path:
    """Writes ``mask`` as a one-segment binary DICOM-SEG referencing ``volume.sources``."""
    require_highdicom()
    import highdicom as hd
    from pydicom.sr.codedict import codes

    import ibis_jax

    sources = source_headers(volume)
    frames = source_frames(volume, mask)
    # highdicom reads SliceThickness (type 2: may be absent or empty in a series) off the sources;
    # where it is missing the step between slices (the loader checked it is even) stands in for it,
    # in these in-memory headers only.
    step = float(np.linalg.norm(np.asarray(volume.image.affine)[:3, 2]))
    for ds in sources:
        if not getattr(ds, "SliceThickness", None):
            ds.SliceThickness = round(step, 6)
    version = getattr(ibis_jax, "__version__", "0")
    algorithm = hd.AlgorithmIdentificationSequence(name="ibis-jax", version=version,
                                                    family=codes.cid7162.ArtificialIntelligence)
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label=(label or "target")[:64], segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.Tissue, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC,
        algorithm_identification=algorithm)
    try:
        seg = hd.seg.Segmentation(
            source_images=sources, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[segment], series_instance_uid=hd.UID(), series_number=9001,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer="ibis-jax",
            manufacturer_model_name="ibis-jax segment", software_versions=version, device_serial_number="0",
            content_description=description[:64] or None, content_label="IBISJAX",
            omit_empty_frames=bool(frames.any()))  # an empty mask still gets its (empty) frames
    except (AttributeError, KeyError, TypeError, ValueError) as error:  # a header highdicom needs
        raise ValueError(f"{volume.path}: highdicom cannot build a DICOM-SEG from this series' headers: "
                         f"{type(error).__name__}: {error}; write a NIfTI mask (--out-format nifti)") from error
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, suffix=".dcm") as tmp:
        seg.save_as(tmp)
    return path
