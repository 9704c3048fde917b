"""``segment --volume SERIES --out-format dicom-seg``: a DICOM-SEG that highdicom reads back, whose
frames reference the right source slices and equal the NIfTI mask slice for slice."""

import json

import nibabel as nib
import numpy as np
import pytest

from ibis_jax.cli import main

ROWS, COLS = 14, 16
STUDY, FRAME = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2"


def _series(folder, positions, *, frame_of_reference=FRAME):
    """A CT series, files named out of slice order; a bright box across the middle slices."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    series = generate_uid()
    for n, z in enumerate(positions):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^Box", "P1", "", "O"
        ds.StudyInstanceUID, ds.StudyID, ds.StudyDate, ds.StudyTime = STUDY, "1", "20260101", "120000"
        ds.AccessionNumber, ds.ReferringPhysicianName = "", ""
        ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = "CT", series, 1, n + 1
        if frame_of_reference:
            ds.FrameOfReferenceUID = frame_of_reference
        ds.Rows, ds.Columns = ROWS, COLS
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit, ds.PixelRepresentation = 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.ImagePositionPatient = [-5.0, -4.0, float(z)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.8, 0.7]
        raw = np.full((ROWS, COLS), 1024 - 100, np.int16)
        if 1.5 <= z / 2.5 <= 4.5:
            raw[3:10, 4:12] = 1024 + 200
        ds.PixelData = raw.astype("<i2").tobytes()
        ds.save_as(str(folder / f"IM{(7 * n) % 11:04d}.dcm"), enforce_file_format=True)
    return folder


def _run(tmp_path, folder, *extra):
    from ibis_jax.data.volumes import load_dicom_series

    vol = load_dicom_series(folder, window="-200,600")
    target = np.zeros(vol.image.shape, np.uint8)  # the loader's grid: [column, row, slice]
    target[4:12, 3:10, 2:5] = 1
    gt = tmp_path / "gt.nii.gz"
    nib.save(nib.Nifti1Image(target, vol.image.affine), str(gt))
    out = tmp_path / "out"
    code = main(["segment", "--volume", str(folder), "--gt", str(gt), "--model", "oracle", "--tool", "classical",
                 "--query", "Segment the box.", "--out", str(out), "--max-steps", "3", "--window=-200,600",
                 *extra])
    return code, out, vol


def test_dicom_seg_references_each_source_slice_and_equals_the_nifti_mask(tmp_path, capsys):
    hd = pytest.importorskip("highdicom")
    import pydicom

    folder = _series(tmp_path / "series", [2.5 * n for n in (3, 0, 5, 2, 1, 4)])
    code, out, vol = _run(tmp_path, folder, "--out-format", "both")
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dicom_seg"] == str(out / "mask.dcm") and summary["dice"] > 0.8
    nifti = np.asarray(nib.load(str(out / "mask.nii.gz")).dataobj) > 0  # [column, row, slice]
    assert nifti.any()

    seg = hd.seg.segread(str(out / "mask.dcm"))
    assert seg.SegmentationType == "BINARY" and seg.Modality == "SEG"
    assert seg.StudyInstanceUID == STUDY and seg.FrameOfReferenceUID == FRAME
    assert seg.get_segment_description(1).SegmentLabel == "Segment the box."
    # slice k of the mask (the series in position order) goes with the file at that position
    by_position = sorted(folder.iterdir(), key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
    uids = [pydicom.dcmread(p).SOPInstanceUID for p in by_position]
    frames = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1],
                                               assert_missing_frames_are_empty=True)
    assert frames.shape == (len(uids), ROWS, COLS, 1)
    np.testing.assert_array_equal(frames[..., 0] > 0, np.transpose(nifti, (2, 1, 0)))
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]


def test_dicom_seg_only_and_its_named_errors(tmp_path, capsys):
    pytest.importorskip("highdicom")
    folder = _series(tmp_path / "series", [2.5 * n for n in range(6)])
    code, out, _ = _run(tmp_path, folder, "--out-format", "dicom-seg")
    assert code == 0, capsys.readouterr().err
    assert (out / "mask.dcm").is_file() and not (out / "mask.nii.gz").exists()

    # a NIfTI input has no slices to reference: refused before any work
    nii = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.float32), np.eye(4)), str(nii))
    code = main(["segment", "--volume", str(nii), "--gt", str(nii), "--model", "oracle", "--query", "q",
                 "--out", str(tmp_path / "n"), "--out-format", "dicom-seg"])
    assert code == 1 and "not a DICOM series folder" in capsys.readouterr().err
    assert not (tmp_path / "n").exists()

    # a series without a frame of reference cannot be referenced: a named error, no half-written file
    bare = _series(tmp_path / "bare", [2.5 * n for n in range(6)], frame_of_reference=None)
    (tmp_path / "b").mkdir()
    code, out, _ = _run(tmp_path / "b", bare, "--out-format", "dicom-seg")
    err = capsys.readouterr().err
    assert code == 1 and "FrameOfReferenceUID" in err
    assert not out.exists()  # checked before the agent ran: nothing written
