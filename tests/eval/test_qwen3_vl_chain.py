"""A tiny Qwen3-VL policy through every command: synth -> sft -> grpo -> eval -> segment, then
transformers loads the GRPO export as a Qwen3-VL and computes the same logits as our model."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from ibis_jax.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny_cpu.py")
GRPO_TINY = os.path.join(ROOT, "configs", "grpo_tiny_cpu.py")
SHAPES = ["--source", "demo", "--demo-parts", "shapes", "--num-shapes", "4", "--tool", "classical"]
QWEN3 = ["model=tiny_qwen3_vl", "image_size=128"]  # 16 px patches: 128 px = 4 x 4 visual tokens


def test_tiny_qwen3_vl_runs_synth_sft_grpo_eval_segment(tmp_path):
    data, run, grpo, out, seg = (tmp_path / p for p in ("data", "run", "grpo", "eval", "seg"))
    assert main(["synth", *SHAPES, "--out", str(data), "--no-progress", "--examples", "0"]) == 0
    assert main(["sft", "--config", TINY, "--data", str(data), "--workdir", str(run), "--no-progress", "max_steps=2",
                 "batch_size=4", *QWEN3]) == 0
    exported = json.loads((run / "hf" / "config.json").read_text())
    assert exported["model_type"] == "qwen3_vl"
    assert json.loads((run / "hf" / "ibis_agent.json").read_text())["image_size"] == 128
    assert main(["grpo", "--config", GRPO_TINY, "--init", str(run / "hf"), "--workdir", str(grpo), *SHAPES[:4],
                 "--num-shapes", "2", "--tool", "classical", "rl.steps=1", "rl.group_size=2", "rl.prompts_per_step=1",
                 "rl.max_turns=2", "rl.max_new_tokens=16", *QWEN3]) == 0
    rows = [json.loads(line) for line in (grpo / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1] and np.isfinite(rows[0]["loss"])
    assert main(["eval", "--policy", str(grpo / "hf"), "--out", str(out), *SHAPES, "--limit", "2", "--max-steps", "2",
                 "--curve-clicks", "2", "--examples", "0"]) == 0
    overall = json.loads((out / "metrics.json").read_text())["overall"]
    assert overall["samples"] == 2 and 0.0 <= overall["well_formed_rate"] <= 1.0
    from PIL import Image

    yy, xx = np.mgrid[:96, :96]
    disk = ((yy - 40) ** 2 + (xx - 52) ** 2 < 15 ** 2)
    image = np.where(disk[..., None], 200, 40).astype(np.uint8).repeat(3, -1)
    Image.fromarray(image).save(tmp_path / "disk.png")
    assert main(["segment", "--model", str(grpo / "hf"), "--image", str(tmp_path / "disk.png"), "--query",
                 "Segment the disk.", "--tool", "classical", "--max-steps", "2", "--out", str(seg)]) == 0
    summary = json.loads((seg / "summary.json").read_text())
    # A 2-step model writes garbage: the episode ends (a parse error, or clicks) with its files written.
    assert (seg / "mask.png").exists() and (seg / "report.html").exists() and 1 <= summary["turns"] <= 2

    torch = pytest.importorskip("torch")
    import transformers

    from ibis_jax.models import load_hf
    from ibis_jax.models.qwen3_vl.testing import hf_logits, image_sequence

    hf = transformers.Qwen3VLForConditionalGeneration.from_pretrained(str(grpo / "hf"), dtype=torch.float32).eval()
    ours = load_hf(str(grpo / "hf"))
    cfg = ours.config
    rng = np.random.default_rng(0)
    grid = np.array([[1, 8, 8]])
    ids = image_sequence(cfg, rng, [grid[0]], [4, 3])[None]
    pv = rng.standard_normal((64, cfg.vision.patch_dim)).astype(np.float32)
    theirs = hf_logits(hf, ids, np.ones_like(ids), pv, grid)
    mine = np.asarray(ours(ids, np.ones_like(ids), pv, grid))
    assert np.abs(mine - theirs).max() < 1e-4
