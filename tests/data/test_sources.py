import json

import numpy as np
import pytest
from data_helpers import ct_volume, disk, write_dicom, write_nifti, write_png

from ibis_jax.data.sources import DemoSource, DicomSource, FolderSource, NiftiSource, parse_target_labels
from ibis_jax.data.sources.folder import modality_from_name
from ibis_jax.data.sources.nifti import slice_volume


def load_all(source):
    return [s for item in source.items() for s in source.load(item)]


# -- folder ------------------------------------------------------------------------------------

def test_folder_biomedparse_layout(biomedparse_folder):
    samples = {s.sample_id: s for s in load_all(FolderSource(root=str(biomedparse_folder)))}
    assert sorted(samples) == ["case1_CT_abdomen_left+kidney", "case1_CT_abdomen_liver", "case2_MRI_brain_tumor"]
    liver = samples["case1_CT_abdomen_liver"]
    assert (liver.target, liver.modality) == ("liver", "CT")
    assert liver.image.shape == (48, 64, 3) and liver.image.dtype == np.uint8
    assert liver.image[20, 20].tolist() == [200, 200, 200]  # grayscale repeated to RGB
    assert np.array_equal(liver.mask, disk((48, 64), (20, 20), 9))
    assert samples["case1_CT_abdomen_left+kidney"].target == "left kidney"
    tumor = samples["case2_MRI_brain_tumor"]
    assert tumor.modality == "MRI" and tumor.mask.sum() == disk((48, 64), (24, 32), 8).sum()  # 0/1 mask
    assert tumor.provenance["image"].endswith("case2_MRI_brain.png")


def test_folder_target_filter_and_modality_override(biomedparse_folder):
    source = FolderSource(root=str(biomedparse_folder), targets=("liver",), modality="X-Ray")
    (sample,) = load_all(source)
    assert (sample.target, sample.modality) == ("liver", "X-Ray")


def test_folder_csv_and_json_sidecar(tmp_path, biomedparse_folder):
    rows = [
        {"image": "bp/train/case1_CT_abdomen.png", "mask": "bp/train_mask/case1_CT_abdomen_liver.png",
         "target": "liver", "modality": "CT", "id": "a"},
        {"image": "bp/train/case2_MRI_brain.png", "mask": "bp/train_mask/case2_MRI_brain_tumor.png",
         "target": "brain tumor", "id": "b"},
    ]
    (tmp_path / "index.json").write_text(json.dumps(rows))
    (tmp_path / "index.csv").write_text(
        "image,mask,target,modality,id\n" + "\n".join(",".join(r.get(k, "") for k in ("image", "mask", "target", "modality", "id")) for r in rows)
    )
    for name in ("index.json", "index.csv"):
        samples = load_all(FolderSource(index=str(tmp_path / name)))
        assert [(s.sample_id, s.target, s.modality) for s in samples] == [
            ("a", "liver", "CT"), ("b", "brain tumor", "MRI")  # MRI read from the image name
        ]


def test_folder_label_map_with_label_column(tmp_path):
    image = np.zeros((20, 20), np.uint8)
    labels = np.zeros((20, 20), np.uint8)
    labels[2:8, 2:8], labels[10:18, 10:18] = 1, 2
    write_png(tmp_path / "img.png", image)
    write_png(tmp_path / "lab.png", labels)
    (tmp_path / "i.csv").write_text("image,mask,target,label\nimg.png,lab.png,spleen,2\n")
    (sample,) = load_all(FolderSource(index=str(tmp_path / "i.csv")))
    assert sample.mask.sum() == 64 and sample.mask[12, 12] and not sample.mask[4, 4]


def test_modality_from_name():
    assert modality_from_name("amos_0001_CT_abdomen") == "CT"
    assert modality_from_name("ISIC_001_dermoscopy_skin") == "Dermoscopy"
    assert modality_from_name("plain_name") is None


# -- nifti -------------------------------------------------------------------------------------

def test_nifti_slices_window_and_orientation(nifti_pair):
    images, labels = nifti_pair
    source = NiftiSource(images=str(images.parent), labels=str(labels.parent),
                         targets=parse_target_labels(["tumour=1"]), modality="CT", window="abdomen")
    samples = load_all(source)
    assert [s.sample_id for s in samples] == [f"case_7/tumour/axial{z:04d}" for z in range(2, 8)]
    hu, lab = ct_volume()
    s = samples[0]
    assert s.provenance["slice"] == 2 and s.provenance["window"] == "abdomen"
    # axial slice z of a RAS volume, rotated 90 degrees: rows run anterior -> posterior.
    assert s.image.shape == (36, 40, 3)
    assert np.array_equal(s.mask, np.rot90(lab[:, :, 2] == 1))
    # HU 120 with abdomen (L40, W400): (120 + 160) * 255 / 400 = 178.5 -> 179; air -1000 -> 0.
    expected = np.where(np.rot90(hu[:, :, 2]) == 120.0, 179, None)
    assert set(s.image[..., 0][expected == 179].tolist()) == {179}
    assert s.image[0, 0, 0] == 0


def test_nifti_dataset_json_and_empty_ratio(tmp_path):
    hu, lab = ct_volume()
    write_nifti(tmp_path / "imagesTr" / "c1_0000.nii.gz", hu)
    write_nifti(tmp_path / "labelsTr" / "c1.nii.gz", lab)
    (tmp_path / "dataset.json").write_text(json.dumps(
        {"modality": {"0": "CT"}, "labels": {"0": "background", "1": "tumour", "2": "bone"}}))
    source = NiftiSource(images=str(tmp_path / "imagesTr"), labels=str(tmp_path / "labelsTr"),
                         empty_ratio=0.5, slice_stride=2, seed=3)
    samples = load_all(source)
    by_target = {}
    for s in samples:
        by_target.setdefault(s.target, []).append(s)
    assert set(by_target) == {"tumour", "bone"} and samples[0].modality == "CT"
    tumour = by_target["tumour"]
    full = [s for s in tumour if s.mask.any()]
    empty = [s for s in tumour if not s.mask.any()]
    # 6 target slices (2..7), stride 2 -> 3; empty ratio 0.5 -> round(1.5) = 2 of the empty slices
    # that show anatomy (none do here: slices 0, 1, 8, 9 are all air) -> 0.
    assert [s.provenance["slice"] for s in full] == [2, 4, 6]
    assert empty == []
    assert load_all(source)[0].sample_id == samples[0].sample_id  # deterministic


def test_nifti_keeps_empty_slices_with_anatomy(tmp_path):
    hu, lab = ct_volume()
    hu[..., 0:2] = 40.0  # soft tissue in slices 0-1, but no target there
    hu[..., 8:] = 40.0
    write_nifti(tmp_path / "v.nii.gz", hu)
    write_nifti(tmp_path / "l.nii.gz", lab)
    source = NiftiSource(images=str(tmp_path / "v.nii.gz"), labels=str(tmp_path / "l.nii.gz"),
                         targets=(("tumour", 1),), modality="CT", empty_ratio=0.5, seed=1)
    samples = load_all(source)
    empty = [s.provenance["slice"] for s in samples if not s.mask.any()]
    assert len(samples) == 6 + 3 and len(empty) == 3 and set(empty) <= {0, 1, 8, 9}


def test_nifti_axis_and_slice_helper():
    volume = np.arange(24).reshape(2, 3, 4)
    assert np.array_equal(slice_volume(volume, 2, 1), np.rot90(volume[:, :, 1]))
    assert np.array_equal(slice_volume(volume, 0, 1), np.rot90(volume[1]))


# -- dicom -------------------------------------------------------------------------------------

def test_dicom_rescale_and_file_window(dicom_folder):
    dcm, masks = dicom_folder
    samples = load_all(DicomSource(dicom=str(dcm), masks=str(masks)))
    assert [s.sample_id for s in samples] == ["IM0001/liver", "IM0002/liver"]
    s = samples[0]
    assert (s.modality, s.target) == ("CT", "liver")
    assert s.provenance["rescale"] == [2.0, -1024.0] and s.provenance["window"] == "dicom:40,400"
    # raw 542 * 2 - 1024 = 60 HU; window 40/400: (60 + 160) * 255 / 400 = 140.25 -> 140
    organ = disk((32, 40), (16, 18), 7)
    assert set(s.image[..., 0][organ].tolist()) == {140}
    assert set(s.image[..., 0][~organ].tolist()) == {0}  # -1000 HU
    assert np.array_equal(s.mask, organ)


def test_dicom_preset_window_and_mr(tmp_path):
    raw = np.arange(30 * 30, dtype=np.int16).reshape(30, 30)
    write_dicom(tmp_path / "d" / "a.dcm", raw, modality="MR", slope=1.0, intercept=0.0, window=None)
    write_png(tmp_path / "m" / "a.png", (raw > 450).astype(np.uint8) * 255)
    (s,) = load_all(DicomSource(dicom=str(tmp_path / "d"), masks=str(tmp_path / "m"), default_target="lesion"))
    assert (s.modality, s.target, s.provenance["window"]) == ("MRI", "lesion", "percentile:0.5,99.5")
    (ct,) = load_all(DicomSource(dicom=str(tmp_path / "d"), masks=str(tmp_path / "m"), window="100,200", modality="CT"))
    # 100/200 -> [0, 200]: raw 100 -> 127.5 -> 128
    assert ct.image[3, 10, 0] == 128 and ct.image[0, 0, 0] == 0 and ct.image[29, 29, 0] == 255


# -- demo --------------------------------------------------------------------------------------

def test_demo_source_real_data():
    source = DemoSource(mri_slices=1, nuclei_tiles=2, num_shapes=2)
    items = source.items()
    kinds = [i.item_id.split("/")[0] for i in items]
    assert kinds == ["mri"] * 4 + ["nuclei"] * 2 + ["shapes"] * 2
    samples = load_all(source)
    mri = samples[0]
    assert (mri.modality, mri.target) == ("MRI", "white matter")
    assert mri.image.shape == (233, 197, 3) and 0.03 < mri.mask.mean() < 0.4
    nuclei = samples[4]
    assert (nuclei.modality, nuclei.target, nuclei.image.shape) == ("Microscopy", "cell nuclei", (128, 128, 3))
    assert 0.05 < nuclei.mask.mean() < 0.5
    shapes = samples[6]
    assert shapes.modality == "Synthetic" and shapes.mask.any()
    again = load_all(DemoSource(parts=("shapes",), num_shapes=2))
    assert np.array_equal(again[0].image, shapes.image)  # seeded per item


def test_demo_shapes_position_tint_writes_position_not_brightness():
    plain = load_all(DemoSource(parts=("shapes",), num_shapes=1, shapes_size=64, shapes_per_image=(1, 1)))[0]
    tinted = load_all(DemoSource(parts=("shapes",), num_shapes=1, shapes_size=64, shapes_per_image=(1, 1),
                                 position_tint=40.0))[0]
    assert np.array_equal(plain.mask, tinted.mask)  # same geometry, only the colour changes
    img = tinted.image.astype(np.float64)
    # red - blue grows with the column (by 80 x 2 across the image), green - blue with the row
    col_ramp = (img[..., 0] - img[..., 2]).mean(axis=0)
    row_ramp = (img[..., 1] - img[..., 2]).mean(axis=1)
    assert col_ramp[-4:].mean() - col_ramp[:4].mean() > 120
    assert row_ramp[-4:].mean() - row_ramp[:4].mean() > 120
    # the channel mean is the grey image: each untinted channel is it times that image's colour cast
    grey = img.mean(-1)
    for channel in plain.image.transpose(2, 0, 1).astype(np.float64):
        cast = (channel * grey).sum() / (grey * grey).sum()
        assert 0.8 < cast <= 1.0 and np.median(np.abs(channel - cast * grey)) < 1.0


def test_demo_shapes_located_targets_name_the_centroid_cell():
    from ibis_jax.data.sources.demo import located_name

    plain = load_all(DemoSource(parts=("shapes",), num_shapes=6, shapes_size=96))
    located = load_all(DemoSource(parts=("shapes",), num_shapes=6, shapes_size=96, located_targets=True))
    for p, s in zip(plain, located):
        assert np.array_equal(p.mask, s.mask) and np.array_equal(p.image, s.image)
        cell, kind = s.target.rsplit(" ", 1)
        assert kind == p.target
        rows, cols = np.nonzero(s.mask)
        r, c = int(3 * rows.mean() / 96), int(3 * cols.mean() / 96)
        grid = (("upper-left", "top", "upper-right"), ("left", "central", "right"),
                ("lower-left", "bottom", "lower-right"))
        assert cell == grid[r][c]
    corner = np.zeros((30, 30), bool)
    corner[25:, 25:] = True
    assert located_name("ring", corner) == "lower-right ring"
    with pytest.raises(ValueError, match="empty"):
        located_name("ring", np.zeros((30, 30), bool))
