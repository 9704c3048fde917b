import json

import numpy as np
import pytest
from PIL import Image

from data_helpers import disk, write_dicom, write_nifti, write_png
from ibis_jax.cli import main
from ibis_jax.data.shapes import synthetic_shapes
from ibis_jax.metrics import iou


def _segment(*args: str) -> int:
    return main(["segment", "--tool", "classical", "--max-steps", "4", *args])


def _summary(out):
    return json.loads((out / "summary.json").read_text())


def test_segment_png_with_oracle_writes_mask_gif_and_report(tmp_path, capsys):
    sample = synthetic_shapes(1, size=48, seed=2)[0]
    image, gt = write_png(tmp_path / "img.png", sample.image), write_png(tmp_path / "gt.png", sample.mask.astype(np.uint8) * 255)
    out = tmp_path / "out"
    assert _segment("--model", "oracle", "--image", str(image), "--gt", str(gt), "--query", "Segment the shape.",
                    "--out", str(out)) == 0
    summary = _summary(out)
    mask = np.array(Image.open(out / "mask.png")) > 0
    assert mask.shape == (48, 48) and summary["mask_pixels"] == mask.sum()
    assert iou(mask, sample.mask) == pytest.approx(summary["final_iou"])
    assert summary["clicks"] >= 1 and summary["steps"][0]["iou"] is not None
    page = (out / "report.html").read_text()
    assert page.count('class="card step"') == summary["turns"] and "data:image/gif;base64," in page
    assert "http://" not in page and "https://" not in page  # self-contained
    with Image.open(out / "episode.gif") as gif:
        assert gif.n_frames == summary["turns"] + 1  # start + one per turn
    assert "report: " in capsys.readouterr().out


def test_segment_mask_init_and_oracle_needs_gt(tmp_path, capsys):
    sample = synthetic_shapes(1, size=40, seed=5)[0]
    image, gt = write_png(tmp_path / "img.png", sample.image), write_png(tmp_path / "gt.png", sample.mask.astype(np.uint8) * 255)
    rows = np.flatnonzero(sample.mask.any(axis=1))
    start = sample.mask.copy()
    start[rows[len(rows) // 2]:] = False  # the user's mask: the upper half of the target
    init = write_png(tmp_path / "init.png", start.astype(np.uint8) * 255)
    out = tmp_path / "out"
    assert _segment("--model", "oracle", "--image", str(image), "--gt", str(gt), "--mask-init", str(init),
                    "--query", "Fix the mask.", "--out", str(out)) == 0
    page = (out / "report.html").read_text()
    assert "Starting mask" in page
    assert _summary(out)["final_iou"] >= iou(start, sample.mask) - 0.05
    assert _segment("--model", "oracle", "--image", str(image), "--query", "q", "--out", str(out)) == 1
    assert "pass --gt" in capsys.readouterr().err


def test_segment_dicom(tmp_path):
    raw = np.full((40, 48), (-1000 + 1024), np.int16)  # slope 1, intercept -1024: -1000 HU
    organ = disk((40, 48), (20, 22), 9)
    raw[organ] = 60 + 1024
    dcm = write_dicom(tmp_path / "IM0001.dcm", raw)
    gt = write_png(tmp_path / "gt.png", organ.astype(np.uint8) * 255)
    out = tmp_path / "out"
    assert _segment("--model", "oracle", "--image", str(dcm), "--gt", str(gt), "--query", "Segment the organ.",
                    "--out", str(out)) == 0
    summary = _summary(out)
    mask = np.array(Image.open(out / "mask.png")) > 0
    assert summary["kind"] == "dicom" and mask.shape == (40, 48)
    assert iou(mask, organ) == pytest.approx(summary["final_iou"]) and summary["final_iou"] > 0.8


def test_segment_nifti_slice_writes_mask_in_the_input_grid(tmp_path):
    shape = (36, 32, 8)
    hu = np.full(shape, -1000.0, np.float32)
    labels = np.zeros(shape, np.uint8)
    xx, yy = np.mgrid[0:shape[0], 0:shape[1]]
    ball = (xx - 14) ** 2 + (yy - 20) ** 2 <= 7 ** 2
    for z in range(2, 6):
        hu[..., z][ball] = 120.0
        labels[..., z][ball] = 1
    # LPS-like affine (x and y flipped, anisotropic, shifted): the output must keep it exactly.
    affine = np.array([[-0.8, 0, 0, 30.0], [0, -0.8, 0, 12.0], [0, 0, 2.5, -40.0], [0, 0, 0, 1]])
    volume = write_nifti(tmp_path / "ct.nii.gz", hu, affine)
    gt = write_nifti(tmp_path / "labels.nii.gz", labels, affine)
    out = tmp_path / "out"
    assert _segment("--model", "oracle", "--image", str(volume), "--slice", "axial:3", "--gt", str(gt),
                    "--gt-label", "1", "--modality", "CT", "--query", "Segment the ball.", "--out", str(out)) == 0
    import nibabel as nib

    written = nib.load(str(out / "mask.nii.gz"))
    data = np.asanyarray(written.dataobj)
    assert data.shape == shape and np.allclose(written.affine, affine)
    assert not data[..., [0, 1, 2, 4, 5, 6, 7]].any()  # only the segmented slice
    summary = _summary(out)
    assert iou(data[..., 3] > 0, labels[..., 3] == 1) == pytest.approx(summary["final_iou"])
    assert summary["final_iou"] > 0.8
