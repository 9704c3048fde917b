"""Writers for small datasets in the real formats (PNG, NIfTI, DICOM), shared by tests/data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image



def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def disk(shape: tuple[int, int], center: tuple[float, float], radius: float) -> np.ndarray:
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    return (yy - center[0]) ** 2 + (xx - center[1]) ** 2 <= radius**2


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


def write_dicom(path: Path, raw: np.ndarray, *, modality: str = "CT", slope: float = 1.0,
                intercept: float = -1024.0, window: tuple[float, float] | None = (40.0, 400.0),
                instance: int = 1) -> Path:
    """A real single-frame DICOM file (explicit VR little endian, signed 16-bit pixels)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.PatientName = "Test^Phantom"
    ds.InstanceNumber = instance
    ds.Rows, ds.Columns = raw.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = raw.astype("<i2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(path), enforce_file_format=True)
    return path

def ct_volume(shape=(40, 36, 10)) -> tuple[np.ndarray, np.ndarray]:
    """A float32 HU volume [X, Y, Z] with a sphere (label 1) and a box (label 2) in slices 2..7."""
    hu = np.full(shape, -1000.0, np.float32)
    labels = np.zeros(shape, np.uint8)
    xx, yy = np.mgrid[0 : shape[0], 0 : shape[1]]
    for z in range(2, 8):
        body = (xx - 20) ** 2 + (yy - 18) ** 2 <= 15**2
        hu[..., z][body] = 40.0
        sphere = (xx - 16) ** 2 + (yy - 14) ** 2 <= 6**2
        hu[..., z][sphere] = 120.0
        labels[..., z][sphere] = 1
        labels[26:31, 20:26, z] = 2
        hu[26:31, 20:26, z] = 300.0
    return hu, labels
