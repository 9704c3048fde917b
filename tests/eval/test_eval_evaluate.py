import json

import numpy as np
import pytest

from ibis_jax.agent.loop import PolicyTurn
from ibis_jax.agent.oracle import OraclePolicy
from ibis_jax.agent.oracle import oracle_iou_curve, run_oracle
from ibis_jax.cli import main
from ibis_jax.data.records import read_records
from ibis_jax.data.sources import DemoSource
from ibis_jax.eval import EvalConfig, PolicyUnavailable, evaluate, load_policy
from ibis_jax.eval.report import comparison_markdown
from ibis_jax.metrics import dice, interactive_summary
from ibis_jax.tools.classical import ClassicalTool

SOURCE = DemoSource(parts=("shapes",), num_shapes=3, shapes_size=48)


def _samples():
    return [s for item in SOURCE.items() for s in SOURCE.load(item)]


def test_oracle_eval_reproduces_the_oracle_runner_and_interactive_summary(tmp_path):
    config = EvalConfig(max_steps=6, curve_clicks=5, batch_size=2, policy_name="oracle", tool_name="classical",
                        num_examples=1)
    metrics = evaluate(load_policy("oracle", stop_iou=0.9, max_clicks=5), ClassicalTool(), SOURCE,
                       config=config, out_dir=tmp_path)
    tool = ClassicalTool()
    stopped = [run_oracle(tool, s.image, s.mask, max_clicks=5, stop_iou=0.9) for s in _samples()]
    curves = [oracle_iou_curve(run_oracle(tool, s.image, s.mask, max_clicks=5), 5) for s in _samples()]
    expected = interactive_summary(curves, 5, (1, 3, 5))
    got = metrics["interactive"]["overall"]
    assert got["samples"] == 3
    assert {k: got[k] for k in expected} == pytest.approx(expected, abs=1e-12)
    assert "early stop off" in metrics["interactive"]["curve"]
    # The agent run (early stop at 0.9) gives the runner's final masks.
    overall = metrics["overall"]
    assert overall["mean_iou"] == pytest.approx(np.mean([e.ious[-1] for e in stopped]), abs=1e-12)
    assert overall["mean_dice"] == pytest.approx(np.mean([dice(e.current_mask, e.gt_mask) for e in stopped]), abs=1e-12)
    assert overall["avg_steps"] == pytest.approx(np.mean([len(e.clicks) for e in stopped]))
    assert overall["parse_failure_rate"] == 0.0
    assert sum(overall["end_reasons"].values()) == 3


def test_metrics_json_markdown_and_records(tmp_path):
    config = EvalConfig(max_steps=4, curve_clicks=3, policy_name="oracle", tool_name="classical", source_name="demo",
                        num_examples=2)
    evaluate(load_policy("oracle", stop_iou=None, max_clicks=3), ClassicalTool(), SOURCE, config=config,
             out_dir=tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics) >= {"policy", "tool", "source", "config", "samples", "overall", "per_modality",
                            "per_target", "interactive", "skipped", "seconds", "records", "examples"}
    assert metrics["samples"] == 3 and list(metrics["per_modality"]) == ["Synthetic"]
    assert sum(g["samples"] for g in metrics["per_target"].values()) == 3
    for key in ("mean_iou", "mean_dice", "avg_steps", "end_reasons", "parse_failure_rate",
                "generate_seconds_per_case", "tool_seconds_per_case"):
        assert key in metrics["overall"]
    assert metrics["overall"]["tool_seconds_per_case"] > 0
    # Early stop off and budget == curve: the agent episodes are the curves (3 clicks each, no stop).
    assert metrics["overall"]["avg_steps"] <= 3 and metrics["interactive"]["overall"]["samples"] == 3
    records = read_records(tmp_path)
    cases = [json.loads(line) for line in (tmp_path / "cases.jsonl").read_text().splitlines()]
    assert [r.record_id for r in records] == [c["sample_id"] for c in cases] == [s.sample_id for s in _samples()]
    assert [r.final_iou for r in records] == pytest.approx([c["iou"] for c in cases])
    # The oracle tags its own turns (first click, then oracle clicks, then the final terminate).
    assert records[0].steps[0].tag == "first" and records[0].steps[0].user == records[0].query
    assert records[0].steps[-1].tag == "final"
    table = (tmp_path / "metrics.md").read_text()
    row = f"| oracle + classical | {100 * metrics['overall']['mean_iou']:.2f} / {100 * metrics['overall']['mean_dice']:.2f}"
    assert row in table and "NoC@85" in table and "Synthetic/" in table
    assert len(metrics["examples"]) == 4  # two episodes: PNG + HTML each


class ScriptedPolicy:
    """Clicks inside the target once, then terminates; writes garbage on the second episode."""

    def generate(self, requests):
        turns = []
        for r in requests:
            if r.episode.episode_id == "eval-1":
                turns.append(PolicyTurn("no idea"))
            elif r.episode.steps:
                turns.append(PolicyTurn("<think>\nok\n</think>\n<action>\nTerminate\n</action>\n<answer>\ndone\n</answer>"))
            else:  # a pixel inside the target (a model would find it from the image)
                row, col = np.argwhere(r.episode.gt_mask)[int(r.episode.gt_mask.sum()) // 2]
                x, y = (col + 0.5) / r.episode.width, (row + 0.5) / r.episode.height
                turns.append(PolicyTurn(f"<think>\nhere\n</think>\n<action>\nPositive Point ({x:.4f}, {y:.4f})\n</action>"))
        return turns


def test_model_like_policy_parse_failures_and_own_click_curves():
    metrics = evaluate(ScriptedPolicy(), ClassicalTool(), SOURCE, config=EvalConfig(curve_clicks=3))
    overall = metrics["overall"]
    assert overall["end_reasons"] == {"terminate": 2, "parse_error": 1}
    assert overall["parse_failure_rate"] == pytest.approx(1 / 3)
    assert overall["avg_steps"] == pytest.approx(2 / 3)
    assert metrics["interactive"]["curve"].startswith("policy clicks")
    # The parse failure made no click (empty curve, IoU 0); the others terminate on their first
    # click's mask, so mIoU@1 equals the mean final IoU.
    assert metrics["interactive"]["overall"]["mIoU@1"] == pytest.approx(overall["mean_iou"], abs=1e-12)
    assert 0 < overall["mean_iou"] < 1


def test_comparison_table_has_a_row_per_run():
    run = {"policy": "sft", "tool": "classical", "per_modality": {"CT": {"mean_iou": 0.5, "mean_dice": 0.6}},
           "overall": {"mean_iou": 0.5, "mean_dice": 0.6, "avg_steps": 3.0, "samples": 2}}
    other = dict(run, policy="grpo", per_modality={"MRI": {"mean_iou": 0.7, "mean_dice": 0.8}})
    table = comparison_markdown([run, other]).splitlines()
    assert table[0] == "| Method | CT IoU / Dice | MRI IoU / Dice | All IoU / Dice | Avg. steps | Samples |"
    assert table[2] == "| sft + classical | 50.00 / 60.00 | - | 50.00 / 60.00 | 3.00 | 2 |"
    assert table[3].startswith("| grpo + classical | - | 70.00 / 80.00 |")


def test_load_policy(tmp_path):
    assert isinstance(load_policy("oracle", stop_iou=None, max_clicks=7), OraclePolicy)
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        load_policy(str(tmp_path / "missing"))
    try:
        import ibis_jax.generate.policy  # noqa: F401
    except ImportError:
        with pytest.raises(PolicyUnavailable, match="model policy not available yet"):
            load_policy(str(tmp_path))


def test_eval_command_on_demo_shapes(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["eval", "--policy", "oracle", "--tool", "classical", "--source", "demo", "--demo-parts", "shapes",
                 "--num-shapes", "2", "--max-steps", "3", "--curve-clicks", "2", "--examples", "0", "--out", str(out)])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["samples"] == 2 and metrics["source"] == "demo" and metrics["policy"] == "oracle"
    printed = capsys.readouterr().out
    assert "| oracle + classical |" in printed and "NoC@90" in printed
    assert main(["eval", "--policy", "oracle", "--out", str(out)]) == 1  # neither --source nor --vqa


class TwoSampleSource:
    """One shape and one image where the target is absent (empty ground truth)."""

    name = "mem"

    def items(self):
        from ibis_jax.data.sources import Item

        return [Item("shape", ("shape",)), Item("absent", ("absent",))]

    def load(self, item):
        from ibis_jax.data.sources import Sample

        shape = _samples()[0]
        mask = shape.mask if item.item_id == "shape" else np.zeros_like(shape.mask)
        yield Sample(shape.image, mask, "blob", "Synthetic", item.item_id, self.name)


def test_absent_target_counts_in_iou_but_not_in_curves():
    metrics = evaluate(load_policy("oracle", stop_iou=None, max_clicks=2), ClassicalTool(), TwoSampleSource(),
                       config=EvalConfig(max_steps=2, curve_clicks=2))
    assert metrics["samples"] == 2 and metrics["interactive"]["overall"]["samples"] == 1
    absent = metrics["per_target"]["Synthetic/blob"]
    assert absent["samples"] == 2
    # The oracle has nothing to click on the empty target: it terminates at once with IoU 1.0.
    assert absent["end_reasons"]["terminate"] == 1
    with pytest.raises(ValueError, match="no samples"):
        evaluate(OraclePolicy(), ClassicalTool(), SOURCE, config=EvalConfig(limit=0))


def test_max_rows_continuous_batching_gives_the_same_metrics(tmp_path):
    """eval with fewer sampler rows than episodes per batch (continuous batching) gives the static
    batch's metrics; the command passes --max-rows through."""
    base = dict(max_steps=4, curve_clicks=3, batch_size=3, num_examples=0)
    static = evaluate(load_policy("oracle", stop_iou=0.9, max_clicks=3), ClassicalTool(), SOURCE,
                      config=EvalConfig(**base))
    rows = evaluate(load_policy("oracle", stop_iou=0.9, max_clicks=3), ClassicalTool(), SOURCE,
                    config=EvalConfig(**base, max_rows=2))
    drop = ("seconds", "wall", "time")
    clean = lambda m: {k: v for k, v in m.items() if not any(d in k for d in drop)}  # noqa: E731
    assert clean(rows["overall"]) == clean(static["overall"])
    assert rows["interactive"] == static["interactive"]
    out = tmp_path / "run"
    assert main(["eval", "--policy", "oracle", "--tool", "classical", "--source", "demo", "--demo-parts", "shapes",
                 "--num-shapes", "3", "--max-steps", "3", "--curve-clicks", "2", "--examples", "0",
                 "--batch-size", "3", "--max-rows", "2", "--out", str(out)]) == 0
    assert json.loads((out / "metrics.json").read_text())["samples"] == 3
