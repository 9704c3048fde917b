"""``ibis-jax eval --source volumes``: volume sources, 3D metrics, the shared agent loop and oracle."""

import json

import nibabel as nib
import numpy as np
import pytest

from ibis_jax.agent.loop import run_agent
from ibis_jax.agent.oracle import OraclePolicy
from ibis_jax.agent.volume import VolumeEpisode, VolumeEpisodeConfig
from ibis_jax.cli import main
from ibis_jax.data.sources.base import SourceError
from ibis_jax.data.sources.volumes import EllipsoidVolumeSource, ManifestVolumeSource, volume_source
from ibis_jax.eval.evaluate import EvalConfig, evaluate
from ibis_jax.metrics import dice
from ibis_jax.tools.auto import AutoTool
from ibis_jax.tools.volume import ClassicalVolumeTool


def test_volume_eval_reports_3d_metrics_equal_to_the_episodes(tmp_path):
    source = EllipsoidVolumeSource(num=2, side=20)
    config = EvalConfig(max_steps=6, curve_clicks=5, ks=(1, 3), batch_size=2, nsd_tolerance_mm=2.0)
    metrics = evaluate(OraclePolicy(stop_iou=0.9, max_clicks=5), AutoTool(), source, config=config, out_dir=tmp_path)
    # the same episodes run by hand: the classical 3D tool, the oracle, the same budget
    samples = [s for item in source.items() for s in source.load(item)]
    episodes = [VolumeEpisode(s.volume, s.spacing, "q", s.mask, config=VolumeEpisodeConfig(max_actions=6)) for s in samples]
    run_agent(OraclePolicy(stop_iou=0.9, max_clicks=5), ClassicalVolumeTool(), episodes)
    overall = metrics["overall"]
    assert overall["mean_dice"] == pytest.approx(np.mean([dice(e.current_mask, e.gt_mask) for e in episodes]))
    assert overall["mean_nsd"] == pytest.approx(np.mean([e.surface_dice(2.0) for e in episodes]))
    assert overall["mean_dice"] >= 0.85 and overall["avg_steps"] <= 5
    assert set(metrics["interactive"]["overall"]) >= {"NoC@85", "NoC@90", "mIoU@1"}
    cases = [json.loads(line) for line in (tmp_path / "cases.jsonl").read_text().splitlines()]
    assert [c["sample_id"] for c in cases] == ["ellipsoid_0000", "ellipsoid_0001"]
    assert all(0 <= c["nsd"] <= 1 and c["first_click_hit"] for c in cases)
    assert metrics["records"] is None and metrics["per_target"]["synthetic/ellipsoid"]["samples"] == 2


def _write(path, data, affine):
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path.name


def test_manifest_source_reads_nifti_pairs_and_names_bad_entries(tmp_path, capsys):
    i, j, k = np.indices((18, 16, 10))
    blob = (((i - 9) / 5.0) ** 2 + ((j - 8) / 4.0) ** 2 + ((k - 5) / 3.0) ** 2 <= 1.0)
    values = np.where(blob, 200.0, 50.0).astype(np.float32)
    affine = np.diag([1.0, 1.0, 2.5, 1.0])
    entry = {"image": _write(tmp_path / "ct.nii.gz", values, affine),
             "labels": _write(tmp_path / "seg.nii.gz", (blob * 3).astype(np.uint8), affine),
             "target": "blob", "label": 3, "modality": "CT", "window": "minmax"}
    manifest = tmp_path / "scans.json"
    manifest.write_text(json.dumps([entry]))
    [sample] = [s for item in volume_source(str(manifest)).items() for s in volume_source(str(manifest)).load(item)]
    assert sample.volume.shape == (10, 16, 18) and sample.spacing == (2.5, 1.0, 1.0)  # axial view: k slices
    assert sample.mask.sum() == blob.sum() and sample.modality == "CT"
    out = tmp_path / "eval"
    code = main(["eval", "--policy", "oracle", "--source", "volumes", "--volumes", str(manifest), "--tool",
                 "classical", "--max-steps", "4", "--curve-clicks", "3", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert "NSD@2mm" in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text())["per_target"]["CT/blob"]["mean_dice"] > 0.8
    # a label the map lacks, an unknown field: named errors, not tracebacks
    manifest.write_text(json.dumps([{**entry, "label": 7}]))
    source = ManifestVolumeSource(manifest)
    with pytest.raises(SourceError, match="label 7"):
        list(source.load(source.items()[0]))
    manifest.write_text(json.dumps([{**entry, "lables": "x"}]))
    with pytest.raises(SourceError, match=r"entry 0: unknown field\(s\) \['lables'\]"):
        ManifestVolumeSource(manifest)
    with pytest.raises(ValueError, match="ellipsoids"):
        volume_source("ct-scans")


def test_stardist_3d_nuclei_sample_loads_from_the_wheel():
    source = volume_source("stardist")
    [sample] = [s for item in source.items() for s in source.load(item)]
    assert sample.volume.shape == sample.mask.shape == (31, 61, 57) and sample.volume.dtype == np.uint8
    assert sample.provenance["nuclei"] == 51 and 0.05 < sample.mask.mean() < 0.5
    assert (sample.target, sample.modality) == ("cell nuclei", "Microscopy")
