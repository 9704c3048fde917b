"""ibis-jax plan: topology names, the not-fit line, the JSON schema, one real TPU compile.

The compiles use the tiny model on compile-only TPU devices (libtpu, the `plan` extra); they are
skipped, with the reason, where libtpu is absent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ibis_jax.plan import topologies
from ibis_jax.plan.programs import parse_exhausted
from ibis_jax.plan.report import not_fit_line

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny_cpu.py")
NO_TPU = topologies.tpu_available()


def plan(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "ibis_jax.cli", "plan", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)


@pytest.mark.parametrize("name, platform, chips, slices, topo", [
    ("v5p-8", "tpu", 4, 1, "v5:2x2x1"), ("v5p-16", "tpu", 8, 1, "v5:2x2x2"), ("v4-8", "tpu", 4, 1, "v4:2x2x1"),
    ("v5e-4", "tpu", 4, 1, "v5e:2x2"), ("v5e-16", "tpu", 16, 1, "v5e:4x4"), ("v6e-8", "tpu", 8, 1, "v6e:2x4"),
    ("2xv5p-8", "tpu", 4, 2, "v5:2x2x1"), ("V5litepod-8", "tpu", 8, 1, "v5e:2x4"),
    ("h100x8", "cuda", 8, 1, "1x1x8"),
])
def test_topology_names(name, platform, chips, slices, topo):
    t = topologies.parse(name)
    assert (t.platform, t.chips_per_slice, t.num_slices, t.topology_name) == (platform, chips, slices, topo)
    assert t.num_devices == chips * slices


def test_unknown_topology_lists_known_ones():
    with pytest.raises(topologies.UnknownTopology) as e:
        topologies.parse("v5p-7")
    assert "v5p-8" in str(e.value) and "v5e-16" in str(e.value) and "h100x8" in str(e.value)
    out = plan("--config", TINY, "--topology", "v9-8", timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "known: v4-8" in out.stderr and "Traceback" not in out.stderr


def test_exhausted_message_and_not_fit_line():
    needed, available = parse_exhausted("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in "
                                        "memory space hbm. Used 16.76G of 15.75G hbm. Exceeded hbm capacity by 1.01G.")
    assert (needed, available) == (int(16.76 * 2**30), int(15.75 * 2**30))
    assert parse_exhausted("RESOURCE_EXHAUSTED: HLO temporaries (16.76G) exceeds available HBM (15.75G)") == (
        int(16.76 * 2**30), int(15.75 * 2**30))
    assert parse_exhausted("RESOURCE_EXHAUSTED: out of memory") == (None, None)
    line = not_fit_line("sft", 20 * 2**30, 16 * 2**30)
    assert "\n" not in line
    assert line.startswith("plan: sft does not fit: needs 20.00 GiB per chip, HBM 16.00 GiB")
    for lever in ("lora_rank", "remat", "fsdp", "micro-batch"):
        assert lever in line


# The tiny model at small shapes: one compile for a v5e-4 (4 compile-only chips).
SMALL = ("mesh_shape=1,-1,1", "compute_dtype=bfloat16", "batch_size=4", "seq_buckets=64", "image_size=56")
STAGE_KEYS = {"name", "fits", "devices", "mesh", "bytes", "hbm_bytes", "flops_per_step", "compile_seconds"}


@pytest.mark.skipif(NO_TPU is not None, reason=f"no compile-only TPU: {NO_TPU}")
def test_tiny_sft_compiles_for_v5e_and_writes_json(tmp_path):
    """A real compile of the SFT step for 4 compile-only v5e chips; the JSON schema."""
    out_json = tmp_path / "plan.json"
    out = plan("--config", TINY, "--topology", "v5e-4", "--stage", "sft", "--json", str(out_json), *SMALL)
    assert out.returncode == 0, out.stdout[-1000:] + out.stderr[-2000:]
    data = json.loads(out_json.read_text())
    assert data["topology"] == "v5e-4" and data["config"] == TINY
    (sft,) = data["stages"]
    assert set(sft) >= STAGE_KEYS and set(sft["bytes"]) == {"params", "optimizer", "kv_cache", "temp", "total"}
    assert sft["name"] == "sft" and sft["fits"] is True and sft["devices"] == 4
    assert sft["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1} and sft["hbm_bytes"] == 16 * 2**30
    b = sft["bytes"]
    # full fine-tuning, fp32 params: Adam's two moments are twice the trainable params (the
    # vision tower is trainable in the tiny config, so every parameter is), plus its step counts
    assert b["params"] > 0 and 2 * b["params"] <= b["optimizer"] <= 2 * b["params"] + 64, b
    assert b["kv_cache"] == 0 and b["temp"] > 0 and b["params"] + b["optimizer"] + b["temp"] <= b["total"] < 2**30
    assert sft["flops_per_step"] > 0 and sft["compile_seconds"] > 0
    assert "sft" in out.stdout and "1,4,1" in out.stdout


@pytest.mark.skipif(NO_TPU is not None, reason=f"no compile-only TPU: {NO_TPU}")
def test_state_too_big_exits_2_with_one_line(tmp_path):
    """Planned against a 1 MiB chip the tiny state does not fit: exit 2 before any compile."""
    out = plan("--config", TINY, "--topology", "v5e-4", "--stage", "all", "--hbm-gib", str(1 / 1024), *SMALL,
               timeout=300)
    assert out.returncode == 2, out.stdout[-1000:] + out.stderr[-2000:]
    err = out.stderr.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("plan: sft does not fit: needs at least ") and "HBM 0.00 GiB" in err
    for lever in ("lora_rank", "remat", "fsdp", "micro-batch"):
        assert lever in err


@pytest.mark.slow
@pytest.mark.skipif(NO_TPU is not None, reason=f"no compile-only TPU: {NO_TPU}")
def test_tiny_all_stages_fit_v5e(tmp_path):
    out_json = tmp_path / "plan.json"
    out = plan("--config", TINY, "--topology", "v5e-4", "--stage", "all", "--json", str(out_json), *SMALL,
               "rl.prompts_per_step=2", "rl.group_size=2", "rl.max_turns=2", "rl.seq_buckets=128",
               "rl.max_new_tokens=16")
    assert out.returncode == 0, out.stderr[-2000:]
    data = json.loads(out_json.read_text())
    assert [s["name"] for s in data["stages"]] == ["sft", "grpo", "rollout"]
    for s in data["stages"]:
        assert set(s) >= STAGE_KEYS and s["fits"] is True and 0 < s["bytes"]["total"] < s["hbm_bytes"]
    assert data["stages"][2]["bytes"]["kv_cache"] > 0


@pytest.mark.slow
@pytest.mark.skipif(topologies.gpu_available() is not None and not os.environ.get("IBIS_PLAN_GPU_PATH"),
                    reason="no CUDA PJRT plugin (the plan-gpu extra, or IBIS_PLAN_GPU_PATH=its --target dir)")
def test_tiny_sft_compiles_for_h100_node(tmp_path):
    out_json = tmp_path / "plan.json"
    out = plan("--config", TINY, "--topology", "h100x8", "--stage", "sft", "--json", str(out_json), *SMALL[1:],
               "mesh_shape=1,-1,1", "batch_size=8")
    assert out.returncode == 0, out.stderr[-2000:]
    (sft,) = json.loads(out_json.read_text())["stages"]
    assert sft["devices"] == 8 and sft["fits"] is True and sft["hbm_bytes"] == 80 * 10**9
    assert sft["xla_flops_per_device"] is None  # XLA:GPU has no cost analysis; FLOPs are analytic
