"""`ibis-jax quickstart` end to end at toy sizes: every stage runs, the report holds its tables,
and a rerun resumes instead of starting over."""

from __future__ import annotations

import json

from ibis_jax.cli import main

ARGS = ["--train-parts", "shapes", "--train-shapes", "4", "--sft-steps", "2", "--grpo-steps", "1",
        "--eval-samples", "2"]


def test_quickstart_runs_every_stage_and_resumes(tmp_path, capsys):
    out = tmp_path / "qs"
    assert main(["quickstart", "--out", str(out), *ARGS]) == 0
    report = (out / "report.md").read_text()
    for heading in ("## Stages (seconds in this run", "## Evaluation on held-out demo shapes", "| oracle |", "| SFT |",
                    "| SFT + GRPO |", "well-formed turns"):
        assert heading in report, heading
    assert list((out / "sft" / "hf").glob("*.safetensors"))
    # The tiny config trains with the one-line system prompt at 112 px; both exports record what
    # the model was trained to see, for evaluation.
    for stage in ("sft", "grpo"):
        recorded = json.loads((out / stage / "hf" / "ibis_agent.json").read_text())
        assert recorded == {"system_prompt": "short", "image_size": 112, "overlay_color": [0, 255, 0],
                            "overlay_alpha": 0.5, "history": "none"}
    grpo_rows = [json.loads(line) for line in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in grpo_rows] == [1]
    oracle = json.loads((out / "eval" / "oracle" / "metrics.json").read_text())
    assert oracle["overall"]["samples"] == 2 and oracle["overall"]["well_formed_rate"] == 1.0
    assert str(out / "report.md") in capsys.readouterr().out
    # A rerun finds every stage done: SFT and GRPO resume at their last step, nothing is retrained.
    before = (out / "sft" / "metrics.jsonl").read_text()
    assert main(["quickstart", "--out", str(out), *ARGS]) == 0
    assert (out / "sft" / "metrics.jsonl").read_text() == before
    assert len((out / "grpo" / "metrics.jsonl").read_text().splitlines()) == 1


def test_quickstart_on_another_runs_folder_names_the_fix(tmp_path, capsys):
    data = tmp_path / "qs" / "data"
    data.mkdir(parents=True)
    (data / "config.json").write_text(json.dumps({"source": "demo", "source_args": {"num_shapes": 1}}))
    assert main(["quickstart", "--out", str(tmp_path / "qs"), *ARGS]) == 1
    err = capsys.readouterr().err
    assert "other settings" in err and "--clean" in err
    assert json.loads((data / "config.json").read_text())["source_args"] == {"num_shapes": 1}  # nothing overwritten
    assert not (tmp_path / "qs" / "sft").exists()
