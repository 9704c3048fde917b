"""Shared by tests/reliability: the dataset writers of tests/train and tests/data by plain name."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).parent
for folder in (HERE, HERE.parent / "train", HERE.parent / "data"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def biomedparse_folder(tmp_path: Path) -> Path:
    """BiomedParseData layout: one CT image with a liver mask, one MRI image with a tumour mask."""
    from data_helpers import disk, write_png

    root = tmp_path / "bp"
    shape = (48, 64)
    ct = np.full(shape, 40, np.uint8)
    liver = disk(shape, (20, 20), 9)
    ct[liver] = 200
    write_png(root / "train" / "case1_CT_abdomen.png", ct)
    write_png(root / "train_mask" / "case1_CT_abdomen_liver.png", liver.astype(np.uint8) * 255)
    mr = np.zeros((*shape, 3), np.uint8)
    tumor = disk(shape, (24, 32), 8)
    mr[tumor] = (180, 170, 160)
    write_png(root / "train" / "case2_MRI_brain.png", mr)
    write_png(root / "train_mask" / "case2_MRI_brain_tumor.png", tumor.astype(np.uint8))
    return root
