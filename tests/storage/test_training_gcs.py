"""Training from and to gs:// against the emulator (in CI, a few minutes together): a SIGKILL
mid-run and a resume give the weights of an uninterrupted run; 2 processes on one gs:// workdir
equal 1; GRPO from a gs:// SFT export to a gs:// workdir, evaluated from gs://, its export loading
with transformers."""

from __future__ import annotations

import os
import sys
import textwrap

import numpy as np
import pytest

from ibis_jax import storage

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train"))
from multiprocess import launch  # noqa: E402  (tests/train/multiprocess.py)

from test_commands_gcs import GRPO_TINY, SHAPES, SFT_SMALL, TINY, cli, no_local_url_folder, ok  # noqa: E402

KILL_AFTER_SAVE = textwrap.dedent("""
    import os, signal, sys
    from ibis_jax.train import checkpoint
    original = checkpoint.Checkpointer.save
    def save(self, step, *args, **kwargs):
        original(self, step, *args, **kwargs)
        if step == int(sys.argv[1]):
            self.wait()  # saves are asynchronous: the checkpoint is in the bucket once this returns
            os.kill(os.getpid(), signal.SIGKILL)  # mid-run
    checkpoint.Checkpointer.save = save
    from ibis_jax.cli import main
    sys.exit(main(sys.argv[2:]))
""")


def _weights(remote_hf: str, local: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(os.path.join(storage.stage_down(remote_hf, local), "model.safetensors"))


def test_sft_sigkill_and_resume_from_gs_equal_uninterrupted(gcs_url, tmp_path):
    data = gcs_url + "/data"
    ok(cli("synth", *SHAPES, "--out", data, "--no-progress", "--examples", "0", cwd=tmp_path))
    args = ["--config", TINY, "--data", data, "--no-progress", "max_steps=3", *SFT_SMALL]
    ok(cli("sft", *args, "--workdir", gcs_url + "/full", cwd=tmp_path))
    killed = cli("2", "sft", *args, "--workdir", gcs_url + "/run", cwd=tmp_path, driver=KILL_AFTER_SAVE)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not storage.exists(gcs_url + "/run/hf") and storage.exists(gcs_url + "/run/checkpoints/2")
    resumed = ok(cli("sft", *args, "--workdir", gcs_url + "/run", cwd=tmp_path))
    assert "resumed from step 2" in resumed.stderr + resumed.stdout
    full, run = _weights(gcs_url + "/full/hf", tmp_path / "a"), _weights(gcs_url + "/run/hf", tmp_path / "b")
    assert full.keys() == run.keys()
    for name in full:
        np.testing.assert_array_equal(full[name], run[name], err_msg=name)
    no_local_url_folder(tmp_path)


def test_two_processes_on_a_gs_workdir_equal_one(gcs_url, tmp_path):
    data = gcs_url + "/data"
    ok(cli("synth", *SHAPES, "--out", data, "--no-progress", "--examples", "0", cwd=tmp_path))
    common = ["sft", "--config", TINY, "--data", data, "--no-progress", "image_size=56", "seq_buckets=256",
              "drop_too_long=false", "batch_size=8", "max_steps=2", "mesh_shape=2,2,2", "warmup_frac=0",
              "log_every=1"]
    launch([*common, "--workdir", gcs_url + "/one"], 1, 8, str(tmp_path / "logs_one"))
    launch([*common, "--workdir", gcs_url + "/two"], 2, 4, str(tmp_path / "logs_two"))
    one, two = _weights(gcs_url + "/one/hf", tmp_path / "a"), _weights(gcs_url + "/two/hf", tmp_path / "b")
    for name in one:
        np.testing.assert_allclose(one[name], two[name], rtol=0, atol=2e-5, err_msg=name)


def test_grpo_from_and_to_gs_then_eval_and_transformers(gcs_url, tmp_path):
    data, run, grpo, out = (gcs_url + p for p in ("/data", "/run", "/grpo", "/eval"))
    ok(cli("synth", *SHAPES, "--out", data, "--no-progress", "--examples", "0", cwd=tmp_path))
    ok(cli("sft", "--config", TINY, "--data", data, "--workdir", run, "--no-progress", "max_steps=2", *SFT_SMALL,
           cwd=tmp_path))
    done = ok(cli("grpo", "--config", GRPO_TINY, "--init", run + "/hf", "--workdir", grpo, *SHAPES[:4], "--num-shapes",
                  "2", "--tool", "classical", "--export-every", "1", "rl.steps=2", "rl.group_size=2",
                  "rl.prompts_per_step=1", "rl.max_turns=2", "rl.max_new_tokens=16", cwd=tmp_path))
    assert f"{grpo}/hf" in done.stdout
    assert storage.is_committed(grpo + "/hf") and storage.is_committed(grpo + "/exports/step_1")
    assert storage.exists(grpo + "/metrics.jsonl") and storage.exists(grpo + "/checkpoints")
    ok(cli("eval", "--policy", grpo + "/hf", "--out", out, *SHAPES, "--limit", "2", "--max-steps", "2",
           "--curve-clicks", "2", "--examples", "0", cwd=tmp_path))
    assert storage.is_committed(out)
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    local = storage.stage_down(grpo + "/hf", tmp_path / "downloaded")
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(local)
    assert sum(p.numel() for p in model.parameters()) > 0
    no_local_url_folder(tmp_path)
