"""Fixtures that write small datasets in the real formats (PNG, NIfTI, DICOM) into tmp_path."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

# fake_tool and data_helpers by plain name, here and in spawned synthesis workers (they inherit sys.path).
sys.path.insert(0, str(Path(__file__).parent))

from data_helpers import ct_volume, disk, write_dicom, write_nifti, write_png  # noqa: E402


@pytest.fixture
def biomedparse_folder(tmp_path: Path) -> Path:
    """BiomedParseData layout: two images, three target masks."""
    root = tmp_path / "bp"
    shape = (48, 64)
    ct = np.full(shape, 40, np.uint8)
    liver, kidney = disk(shape, (20, 20), 9), disk(shape, (30, 48), 6)
    ct[liver], ct[kidney] = 200, 140
    write_png(root / "train" / "case1_CT_abdomen.png", ct)
    write_png(root / "train_mask" / "case1_CT_abdomen_liver.png", liver.astype(np.uint8) * 255)
    write_png(root / "train_mask" / "case1_CT_abdomen_left+kidney.png", kidney.astype(np.uint8) * 255)
    mr = np.zeros((*shape, 3), np.uint8)
    tumor = disk(shape, (24, 32), 8)
    mr[tumor] = (180, 170, 160)
    write_png(root / "train" / "case2_MRI_brain.png", mr)
    write_png(root / "train_mask" / "case2_MRI_brain_tumor.png", tumor.astype(np.uint8))
    return root


@pytest.fixture
def nifti_pair(tmp_path: Path) -> tuple[Path, Path]:
    hu, labels = ct_volume()
    return (write_nifti(tmp_path / "imagesTr" / "case_7_0000.nii.gz", hu),
            write_nifti(tmp_path / "labelsTr" / "case_7.nii.gz", labels))


@pytest.fixture
def dicom_folder(tmp_path: Path) -> tuple[Path, Path]:
    """Two CT slices (slope 2, intercept -1024) with a liver mask each."""
    raw = np.full((32, 40), (-1000 + 1024) // 2, np.int16)  # -1000 HU after rescale
    organ = disk((32, 40), (16, 18), 7)
    raw[organ] = (60 + 1024) // 2  # 60 HU
    for i in (1, 2):
        write_dicom(tmp_path / "dcm" / f"IM{i:04d}.dcm", raw, slope=2.0, intercept=-1024.0, instance=i)
        write_png(tmp_path / "dcm_masks" / f"IM{i:04d}_liver.png", organ.astype(np.uint8) * 255)
    return tmp_path / "dcm", tmp_path / "dcm_masks"
