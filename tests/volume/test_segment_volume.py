"""``ibis-jax segment --volume``: NIfTI masks in the input's grid (RAS, LPS, anisotropic), DICOM
series, and bad input as named errors with no half-written mask."""

import json

import nibabel as nib
import numpy as np
import pytest

from ibis_jax.cli import main
from ibis_jax.data.volumes import VolumeInputError, load_dicom_series

SHAPE = (20, 18, 12)  # file axes i, j, k


def _scene():
    i, j, k = np.indices(SHAPE)
    target = ((i - 9) / 5.0) ** 2 + ((j - 8) / 4.0) ** 2 + ((k - 6) / 3.5) ** 2 <= 1.0
    rng = np.random.default_rng(0)
    values = np.where(target, 200.0, 50.0) + rng.normal(0, 5, SHAPE)
    return values.astype(np.float32), target.astype(np.uint8)


AFFINES = {
    "ras_aniso": np.diag([1.5, 1.0, 3.0, 1.0]),
    "lps_aniso": np.array([[-1.5, 0, 0, 30.0], [0, -1.0, 0, 20.0], [0, 0, 3.0, -5.0], [0, 0, 0, 1]]),
    "permuted": np.array([[0, 0, 3.0, 0], [1.2, 0, 0, 0], [0, -1.0, 0, 0], [0, 0, 0, 1]]),  # k -> x, i -> y
}


def _write(path, data, affine):
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def _segment(tmp_path, volume, gt, *extra):
    out = tmp_path / "out"
    code = main(["segment", "--volume", str(volume), "--gt", str(gt), "--model", "oracle", "--tool", "classical",
                 "--query", "Segment the blob.", "--out", str(out), "--max-steps", "3", "--window", "minmax", *extra])
    return code, out


@pytest.mark.parametrize("name", sorted(AFFINES))
def test_mask_has_the_inputs_shape_affine_and_orientation(tmp_path, name, capsys):
    values, target = _scene()
    affine = AFFINES[name]
    volume = _write(tmp_path / "ct.nii.gz", values, affine)
    gt = _write(tmp_path / "gt.nii.gz", target, affine)
    code, out = _segment(tmp_path, volume, gt)
    assert code == 0, capsys.readouterr().err
    mask = nib.load(str(out / "mask.nii.gz"))
    assert mask.shape == SHAPE and np.allclose(mask.affine, affine)
    data = np.asarray(mask.dataobj)
    assert data.dtype == np.uint8
    # voxel for voxel in the file's own grid: the mask overlaps the target it was clicked on
    dice = 2 * np.sum((data > 0) & (target > 0)) / (np.sum(data > 0) + np.sum(target > 0))
    summary = json.loads((out / "summary.json").read_text())
    assert dice == pytest.approx(summary["dice"], abs=1e-9) and dice > 0.8
    assert "3D Dice" in capsys.readouterr().out
    assert "<img" in (out / "report.html").read_text()
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]


def test_view_spacing_follows_the_header():
    values, _ = _scene()
    img = nib.Nifti1Image(values, AFFINES["lps_aniso"])
    from ibis_jax.data.volumes import volume_from_image

    vol = volume_from_image(img, "mem.nii", window="minmax")
    assert vol.spacing == (3.0, 1.0, 1.5)  # axial slices 3 mm; rows along y (1 mm), cols along x (1.5 mm)
    assert vol.shape == (12, 18, 20)


def _bad(tmp_path, gt_data, gt_affine, capsys, field):
    values, _ = _scene()
    volume = _write(tmp_path / "ct.nii.gz", values, AFFINES["ras_aniso"])
    gt = _write(tmp_path / "gt.nii.gz", gt_data, gt_affine)
    code, out = _segment(tmp_path, volume, gt)
    err = capsys.readouterr().err
    assert code == 1 and f"{field}:" in err and str(gt) in err
    assert not (out / "mask.nii.gz").exists()
    return err


def test_bad_label_maps(tmp_path, capsys):
    _, target = _scene()
    _bad(tmp_path, target[:, :, :10], AFFINES["ras_aniso"], capsys, "dim")
    assert "resample" in _bad(tmp_path, target, np.diag([1.0, 1.0, 3.0, 1.0]), capsys, "affine")
    _bad(tmp_path, np.zeros_like(target), AFFINES["ras_aniso"], capsys, "label")


def test_4d_volume_is_a_named_error(tmp_path, capsys):
    values, target = _scene()
    volume = _write(tmp_path / "ct4d.nii.gz", np.stack([values, values], -1), AFFINES["ras_aniso"])
    gt = _write(tmp_path / "gt.nii.gz", target, AFFINES["ras_aniso"])
    code, out = _segment(tmp_path, volume, gt)
    err = capsys.readouterr().err
    assert code == 1 and "dim:" in err and "4D" in err and "ct4d" in err


# -- DICOM series ------------------------------------------------------------------------------

def _series(folder, positions, *, pixel=(0.8, 0.7), orientation=(1, 0, 0, 0, 1, 0), rows=10, cols=12, uid="1.2.3"):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    for n, z in enumerate(positions):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.SeriesInstanceUID, ds.InstanceNumber = "CT", uid, n + 1
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit, ds.PixelRepresentation = 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.ImagePositionPatient = [-5.0, -4.0, float(z)]
        ds.ImageOrientationPatient = list(orientation)
        ds.PixelSpacing = list(pixel)
        raw = np.full((rows, cols), 1024 + 40, np.int16)
        raw[0, 0] = 1024 + 40 + n  # slice fingerprint
        ds.PixelData = raw.astype("<i2").tobytes()
        ds.save_as(str(folder / f"IM{(7 * n) % 11:04d}.dcm"), enforce_file_format=True)  # names out of order
    return folder


def test_dicom_series_stacks_by_position_with_its_spacing(tmp_path):
    folder = _series(tmp_path / "s", [2.5 * n for n in (3, 0, 2, 1, 4)])
    vol = load_dicom_series(folder, window="-1024,4000")
    assert vol.shape == (5, 10, 12) and vol.spacing == pytest.approx((2.5, 0.8, 0.7))
    affine = vol.image.affine
    assert np.allclose(affine[:3, 3], [5.0, 4.0, 0.0])  # LPS (-5, -4, 0) -> RAS (5, 4, 0)
    assert np.allclose(np.diag(affine)[:3], [-0.7, -0.8, 2.5])
    # slices in position order: written n = 0..4 at positions 3, 0, 2, 1, 4 (x 2.5 mm), so the
    # fingerprint (40 + n HU) along k reads the writers 1, 3, 2, 0, 4
    fingerprints = np.asarray(vol.image.dataobj)[0, 0, :]
    assert fingerprints.tolist() == [41.0, 43.0, 42.0, 40.0, 44.0]


@pytest.mark.parametrize("positions, words", [
    ([0, 2.5, 2.5, 5.0], "duplicated"),
    ([0, 2.5, 7.5, 10.0], "missing"),
    ([0, 2.5, 5.2, 7.5, 10.0], "inconsistent slice spacing"),
])
def test_bad_dicom_series(tmp_path, positions, words):
    folder = _series(tmp_path / "s", positions)
    with pytest.raises(VolumeInputError) as e:
        load_dicom_series(folder)
    assert e.value.field == "ImagePositionPatient" and words in str(e.value) and ".dcm" in e.value.path


def test_dicom_series_with_two_series_or_pixel_spacings(tmp_path):
    folder = _series(tmp_path / "s", [0, 2.5, 5.0])
    _series(folder, [7.5], uid="9.9")
    with pytest.raises(VolumeInputError) as e:
        load_dicom_series(folder)
    assert e.value.field == "SeriesInstanceUID"
    folder = _series(tmp_path / "t", [0, 2.5])
    other = _series(tmp_path / "u", [5.0], pixel=(1.0, 1.0))
    (other / next(other.iterdir()).name).rename(folder / "IMX.dcm")
    with pytest.raises(VolumeInputError) as e:
        load_dicom_series(folder)
    assert e.value.field == "PixelSpacing"


def test_segment_a_dicom_series_writes_a_nifti_with_the_series_affine(tmp_path, capsys):
    folder = _series(tmp_path / "s", [2.5 * n for n in range(6)])
    vol = load_dicom_series(folder)
    target = np.zeros(vol.image.shape, np.uint8)
    target[3:9, 2:8, 1:5] = 1
    gt = _write(tmp_path / "gt.nii.gz", target, vol.image.affine)
    code = main(["segment", "--volume", str(folder), "--gt", str(gt), "--model", "oracle", "--query", "q",
                 "--out", str(tmp_path / "o"), "--max-steps", "2"])
    assert code == 0, capsys.readouterr().err
    mask = nib.load(str(tmp_path / "o" / "mask.nii.gz"))
    assert mask.shape == (12, 10, 6) and np.allclose(mask.affine, vol.image.affine)


def test_unknown_volume_tool_is_a_named_error(tmp_path, capsys):
    values, target = _scene()
    volume = _write(tmp_path / "ct.nii.gz", values, AFFINES["ras_aniso"])
    gt = _write(tmp_path / "gt.nii.gz", target, AFFINES["ras_aniso"])
    code = main(["segment", "--volume", str(volume), "--gt", str(gt), "--model", "oracle", "--tool", "nonsense",
                 "--query", "q", "--out", str(tmp_path / "o")])
    assert code == 1 and "classical-tissue" in capsys.readouterr().err
    assert not (tmp_path / "o" / "mask.nii.gz").exists()


def test_a_model_directory_segments_a_volume(tmp_path, hf_dir_and_model, capsys):
    """`segment --volume` with a model directory (a random tiny Qwen2.5-VL saved by transformers):
    whatever it writes, the run ends with a NIfTI mask in the input's grid and a report."""
    values, target = _scene()
    affine = AFFINES["lps_aniso"]
    volume = _write(tmp_path / "ct.nii.gz", values, affine)
    gt = _write(tmp_path / "gt.nii.gz", target, affine)
    out = tmp_path / "out"
    code = main(["segment", "--volume", str(volume), "--gt", str(gt), "--model", hf_dir_and_model[0], "--tool",
                 "classical", "--query", "Segment the blob.", "--out", str(out), "--max-steps", "2",
                 "--window", "minmax"])
    assert code == 0, capsys.readouterr().err
    mask = nib.load(str(out / "mask.nii.gz"))
    assert mask.shape == SHAPE and np.allclose(mask.affine, affine)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == hf_dir_and_model[0] and 1 <= summary["turns"] <= 2
    assert summary["end_reason"] in ("parse_error", "max_actions", "terminate", "repeated_action")
    assert 0.0 <= summary["dice"] <= 1.0 and (out / "report.html").is_file()
