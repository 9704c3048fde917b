"""Bad input: each error names the file and the problem; --on-error skip counts and continues."""

import json

import numpy as np
import pytest
from data_helpers import ct_volume, write_nifti, write_png

from ibis_jax.data.records import TrajectoryDataSource, shard_paths
from ibis_jax.data.sources import DicomSource, FolderSource, NiftiSource, SourceError
from ibis_jax.synth import SynthConfig, run_synthesis

FAST = SynthConfig(max_clicks=3, stop_iou=0.8)


def load_all(source):
    return [s for item in source.items() for s in source.load(item)]


def error_for(source, item_id):
    item = next(i for i in source.items() if i.item_id == item_id)
    with pytest.raises(SourceError) as info:
        list(source.load(item))
    return info.value


@pytest.fixture
def bad_folder(biomedparse_folder):
    root = biomedparse_folder
    # corrupt PNG: a PNG header followed by garbage
    (root / "train" / "case3_CT_chest.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    write_png(root / "train_mask" / "case3_CT_chest_lung.png", np.zeros((48, 64), np.uint8))
    # mask whose size differs from its image
    write_png(root / "train" / "case4_CT_chest.png", np.zeros((48, 64), np.uint8))
    write_png(root / "train_mask" / "case4_CT_chest_heart.png", np.zeros((40, 64), np.uint8))
    # a non-binary mask
    write_png(root / "train" / "case5_CT_chest.png", np.zeros((48, 64), np.uint8))
    write_png(root / "train_mask" / "case5_CT_chest_aorta.png", np.arange(48 * 64, dtype=np.uint16).reshape(48, 64) % 7)
    return root


def test_folder_errors_name_file_and_problem(bad_folder):
    source = FolderSource(root=str(bad_folder))
    e = error_for(source, "case3_CT_chest_lung")
    assert e.reason == "corrupt_image" and "case3_CT_chest.png" in str(e) and "cannot decode" in str(e)
    e = error_for(source, "case4_CT_chest_heart")
    assert e.reason == "size_mismatch" and "case4_CT_chest_heart.png" in str(e)
    assert "40x64" in str(e) and "48x64" in str(e)
    e = error_for(source, "case5_CT_chest_aorta")
    assert e.reason == "bad_mask" and "not binary" in str(e)


def test_nifti_nan_and_missing_target(tmp_path):
    hu, lab = ct_volume()
    hu[3, 3, 3] = np.nan
    write_nifti(tmp_path / "nan.nii.gz", hu)
    write_nifti(tmp_path / "lab.nii.gz", lab)
    source = NiftiSource(images=str(tmp_path / "nan.nii.gz"), labels=str(tmp_path / "lab.nii.gz"),
                         targets=(("tumour", 1),), modality="CT")
    e = error_for(source, "nan/tumour")
    assert e.reason == "nan_values" and "nan.nii.gz" in str(e) and "1 NaN" in str(e)

    hu, _ = ct_volume()
    write_nifti(tmp_path / "ok.nii.gz", hu)
    source = NiftiSource(images=str(tmp_path / "ok.nii.gz"), labels=str(tmp_path / "lab.nii.gz"),
                         targets=(("kidney", 5),), modality="CT")
    e = error_for(source, "ok/kidney")
    assert e.reason == "missing_target" and "lab.nii.gz" in str(e) and "label 5" in str(e)
    assert "[0, 1, 2]" in str(e)


def test_unreadable_dicom(tmp_path, dicom_folder):
    dcm, masks = dicom_folder
    (dcm / "IM0003.dcm").write_bytes(b"this is not a dicom file" * 10)
    write_png(masks / "IM0003_liver.png", np.zeros((32, 40), np.uint8))
    e = error_for(DicomSource(dicom=str(dcm), masks=str(masks)), "IM0003/liver")
    assert e.reason == "unreadable_dicom" and "IM0003.dcm" in str(e)


def test_run_raises_by_default_and_leaves_no_half_shard(bad_folder, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SourceError, match="case3_CT_chest.png"):
        run_synthesis(FolderSource(root=str(bad_folder)), out, FAST, tool_name="fake_tool:make_tool",
                      shard_size=10, show_progress=False, num_examples=0)
    assert shard_paths(out) == [] and not list(out.glob("*.tmp"))


def test_run_skip_counts_reasons(bad_folder, tmp_path):
    out = tmp_path / "out"
    stats = run_synthesis(FolderSource(root=str(bad_folder)), out, FAST, tool_name="fake_tool:make_tool",
                          shard_size=2, on_error="skip", show_progress=False, num_examples=0)
    assert stats["skipped"] == {"bad_mask": 1, "corrupt_image": 1, "size_mismatch": 1}
    assert stats["all"]["samples"] == 3  # the three good masks
    saved = json.loads((out / "stats.json").read_text())
    assert saved["skipped"] == stats["skipped"]
    assert {x["reason"] for x in saved["skipped_items"]} == {"bad_mask", "corrupt_image", "size_mismatch"}
    records = list(TrajectoryDataSource(out))
    assert sorted(r.record_id for r in records) == [
        "case1_CT_abdomen_left+kidney", "case1_CT_abdomen_liver", "case2_MRI_brain_tumor"]


def test_tool_failure_is_skipped_with_reason(biomedparse_folder, tmp_path):
    stats = run_synthesis(FolderSource(root=str(biomedparse_folder)), tmp_path / "o", FAST,
                          tool_name="fake_tool:make_failing_tool", on_error="skip", show_progress=False,
                          num_examples=0)
    assert stats["skipped"] == {"tool_error": 3} and stats["all"]["samples"] == 0


def test_mask_without_image_is_named(biomedparse_folder):
    write_png(biomedparse_folder / "train_mask" / "orphan_CT_x_liver.png", np.zeros((48, 64), np.uint8))
    e = error_for(FolderSource(root=str(biomedparse_folder)), "orphan_CT_x_liver")
    assert e.reason == "missing_file" and "orphan_CT_x_liver.png" in str(e)
