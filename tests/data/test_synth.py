import json
import os

import numpy as np
import pytest
from data_helpers import disk
from fake_tool import DiskTool

from ibis_jax.cli import main as cli_main
from ibis_jax.data.records import TrajectoryDataSource, shard_paths
from ibis_jax.data.sources import DemoSource, FolderSource, Sample
from ibis_jax.data.clicks import correction_click, wrong_click
from ibis_jax.report.synth_stats import format_table
from ibis_jax.synth import ConfigMismatch, SynthConfig, run_synthesis, synthesize_trajectory


def disk_sample(radius=10, center=(30, 30), size=64, sample_id="d0") -> Sample:
    mask = disk((size, size), center, radius)
    image = np.where(mask[..., None], 200, 40).astype(np.uint8).repeat(3, axis=2)
    return Sample(image, mask, "cyst", "Ultrasound", sample_id, "test", {})


def test_easy_sample_one_click_then_terminate():
    # DiskTool's disk (radius 0.12 * 64 = 7.68) inside a radius-7 target centred on the first click.
    sample = disk_sample(radius=7.7, center=(30, 30))
    out = synthesize_trajectory(sample, DiskTool(), SynthConfig(stop_iou=0.85))
    r = out.record
    assert [s.kind for s in r.steps] == ["click", "terminate"] and r.num_sft_samples == 2
    first = r.steps[0]
    assert (first.row, first.col, first.positive) == (30, 30, True)  # RITM: deepest interior point
    assert first.user == r.query and first.tag == "first" 
    assert any(p in first.reasoning.lower() for p in ("no mask", "nothing is segmented"))
    assert r.steps[1].user.startswith("Original request: " + r.query)
    assert r.final_iou >= 0.85 and r.meta["reached"] and out.filtered is None
    assert r.answer and "cyst" in r.answer and r.steps[-1].answer == r.answer
    assert all(s.loss_weight == 1.0 for s in r.steps)


def test_budget_and_filters():
    sample = disk_sample(radius=20)
    cfg = SynthConfig(max_clicks=2, stop_iou=0.99)
    out = synthesize_trajectory(sample, DiskTool(), cfg)
    assert out.record.num_clicks == 2 and not out.record.meta["reached"]
    assert "stop here" in out.record.steps[-1].reasoning or "I finish" in out.record.steps[-1].reasoning
    assert synthesize_trajectory(sample, DiskTool(), SynthConfig(max_clicks=2, min_dice=0.99)).filtered == "low_dice"
    assert synthesize_trajectory(sample, DiskTool(), SynthConfig(max_clicks=2, stop_iou=0.99, drop_unreached=True)).filtered == "not_reached"


def test_absent_target_terminates_with_a_no_answer():
    sample = Sample(np.zeros((32, 32, 3), np.uint8), np.zeros((32, 32), bool), "tumor", "MRI", "e", "test")
    r = synthesize_trajectory(sample, DiskTool(), SynthConfig()).record
    assert [s.kind for s in r.steps] == ["terminate"] and r.query_style == "question"
    assert r.answer.startswith("No tumor is visible")


def test_self_correction_weights_and_reasoning():
    tool = DiskTool()
    cfg = SynthConfig(max_clicks=6, stop_iou=0.97, self_correction=1.0, seed=0)
    seen = 0
    for i in range(6):
        sample = disk_sample(radius=14 + i, center=(28 + i, 34 - i), sample_id=f"sc{i}")
        r = synthesize_trajectory(sample, tool, cfg).record
        tags = [s.tag for s in r.steps]
        if "wrong" not in tags:
            continue
        seen += 1
        k = tags.index("wrong")
        assert tags.count("wrong") == 1 and k >= 1 and r.meta["wrong_step"] == k
        assert tags[k + 1] == "correction"
        assert [s.loss_weight for s in r.steps] == [0.0 if j == k else 1.0 for j in range(len(r.steps))]
        wrong = r.steps[k]
        gt = sample.mask
        # the wrong click is really wrong: positive on background or negative inside the target
        assert (wrong.positive and not gt[wrong.row, wrong.col]) or (not wrong.positive and gt[wrong.row, wrong.col])
        assert "mistake" in r.steps[k + 1].reasoning or "misplaced" in r.steps[k + 1].reasoning
    assert seen >= 4


def test_wrong_and_correction_clicks_by_hand():
    gt = np.zeros((40, 40), bool)
    gt[10:30, 10:30] = True
    rng = np.random.default_rng(0)
    sim = wrong_click(gt, gt.copy(), np.zeros_like(gt), rng)
    assert sim is not None
    if sim.positive:
        assert not gt[sim.row, sim.col]
    else:
        assert gt[sim.row, sim.col]
    before = gt.copy()
    after = gt.copy()
    after[0:6, 0:6] = True  # a wrong positive click added excess in the corner
    click, effect = correction_click(gt, before, after, np.zeros_like(gt))
    assert effect == "excess" and not click.positive and after[click.row, click.col] and not gt[click.row, click.col]
    click, effect = correction_click(gt, before, before, np.zeros_like(gt))
    assert (click, effect) == (None, "none")


def test_run_resume_skips_finished_shards(biomedparse_folder, tmp_path):
    out = tmp_path / "out"
    source = FolderSource(root=str(biomedparse_folder))
    cfg = SynthConfig(max_clicks=3)
    kwargs = dict(tool_name="fake_tool:make_tool", shard_size=1, show_progress=False, num_examples=0)
    first = run_synthesis(source, out, cfg, **kwargs)
    assert first["shards"] == 3 and first["shards_skipped_as_done"] == 0 and first["all"]["samples"] == 3
    shards = shard_paths(out)
    mtimes = {p.name: p.stat().st_mtime_ns for p in shards}
    # a crash in shard 1: its record file is gone and a temporary file is left behind
    shards[1].unlink()
    (out / (shards[1].name + ".tmp")).write_bytes(b"half")
    second = run_synthesis(source, out, cfg, **kwargs)
    assert second["shards_skipped_as_done"] == 2 and second["all"]["samples"] == 3
    assert not list(out.glob("*.tmp"))
    for p in shard_paths(out):
        if p.name != shards[1].name:
            assert p.stat().st_mtime_ns == mtimes[p.name]  # untouched
    third = run_synthesis(source, out, cfg, **kwargs)
    assert third["shards_skipped_as_done"] == 3
    with pytest.raises(ConfigMismatch, match="synth"):
        run_synthesis(source, out, SynthConfig(max_clicks=4), **kwargs)
    again = run_synthesis(source, out, SynthConfig(max_clicks=4), overwrite=True, **kwargs)
    assert again["shards_skipped_as_done"] == 0


def test_stats_table_and_examples(tmp_path):
    source = DemoSource(parts=("shapes",), num_shapes=4, shapes_size=64)
    stats = run_synthesis(source, tmp_path / "o", SynthConfig(max_clicks=3, self_correction=0.5),
                          tool_name="fake_tool:make_tool", shard_size=2, show_progress=False, num_examples=2)
    records = list(TrajectoryDataSource(tmp_path / "o"))
    row = stats["modalities"]["Synthetic"]
    assert row["samples"] == 4 == len(records)
    assert row["sft_samples"] == sum(r.num_clicks + 1 for r in records)
    assert row["avg_length"] == pytest.approx(np.mean([r.num_clicks for r in records]))
    assert row["median_iou"] == pytest.approx(float(np.median([r.final_iou for r in records])))
    table = format_table(stats)
    assert table.splitlines()[0] == ("| Modality | Samples | Steps+1 samples | Avg. length | Mean IoU | "
                                     "Median IoU | Mean Dice | Median Dice |")
    assert "| Synthetic | 4 |" in table and "| All | 4 |" in table
    assert json.loads((tmp_path / "o" / "stats.json").read_text())["all"]["samples"] == 4
    assert len(stats["examples"]) == 2 and all(os.path.getsize(p) > 1000 for p in stats["examples"])


def test_workers_give_the_same_records(tmp_path):
    source = DemoSource(parts=("shapes",), num_shapes=4, shapes_size=48)
    cfg = SynthConfig(max_clicks=3, self_correction=0.5, seed=5)
    kwargs = dict(tool_name="fake_tool:make_tool", shard_size=1, show_progress=False, num_examples=0)
    run_synthesis(source, tmp_path / "one", cfg, workers=1, **kwargs)
    run_synthesis(source, tmp_path / "two", cfg, workers=2, **kwargs)
    one = [r.to_bytes() for r in TrajectoryDataSource(tmp_path / "one")]
    two = [r.to_bytes() for r in TrajectoryDataSource(tmp_path / "two")]
    assert one == two and len(one) == 4


def test_cli_synth_folder(biomedparse_folder, tmp_path, capsys):
    out = tmp_path / "cli"
    code = cli_main(["synth", "--source", "folder", "--root", str(biomedparse_folder), "--tool", "fake_tool:make_tool",
                     "--out", str(out), "--max-steps", "3", "--no-progress", "--examples", "1"])
    printed = capsys.readouterr().out
    assert code == 0 and "| CT | 2 |" in printed and "| MRI | 1 |" in printed and "example:" in printed
    (biomedparse_folder / "train" / "case1_CT_abdomen.png").write_bytes(b"broken")
    code = cli_main(["synth", "--source", "folder", "--root", str(biomedparse_folder), "--tool", "fake_tool:make_tool",
                     "--out", str(tmp_path / "cli2"), "--no-progress"])
    assert code == 1 and "case1_CT_abdomen.png" in capsys.readouterr().err


def test_classical_tool_smoke():
    from ibis_jax.tools.classical import ClassicalTool

    sample = disk_sample(radius=12)
    r = synthesize_trajectory(sample, ClassicalTool(), SynthConfig(max_clicks=2, stop_iou=0.8), tool_name="classical").record
    assert 1 <= r.num_clicks <= 2 and r.final_iou > 0.5


def test_teacher_hook_replaces_reasoning():
    seen = []

    def teacher(facts, draft):
        seen.append((facts.kind, facts.action, draft))
        return f"teacher says {facts.action} at step {facts.step_index}"

    r = synthesize_trajectory(disk_sample(radius=18), DiskTool(), SynthConfig(max_clicks=3), teacher=teacher).record
    assert [s.reasoning for s in r.steps] == [f"teacher says {k} at step {i}" for i, k in enumerate(
        ["positive" if s.positive else "negative" for s in r.steps[:-1]] + ["terminate"])]
    assert seen[0][0] == "first" and seen[-1][0] == "final" and all(d for _, _, d in seen)
    assert "<think>\nteacher says terminate" in r.steps[-1].text


def test_ibis_rule_runs_and_stops_on_repeats():
    r = synthesize_trajectory(disk_sample(radius=20), DiskTool(), SynthConfig(rule="ibis", max_clicks=6)).record
    clicks = [(s.row, s.col, s.positive) for s in r.steps if s.kind == "click"]
    assert 1 <= len(clicks) <= 6 and r.steps[-1].kind == "terminate"
    assert all(a != b for a, b in zip(clicks, clicks[1:]))  # never the same click twice in a row
