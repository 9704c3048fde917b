"""The commands against the GCS emulator: synth, sft, grpo, eval, segment and plan --json with
gs:// paths; killed uploads leave nothing a reader accepts; no local ``gs:`` folder ever appears."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from ibis_jax import storage
from ibis_jax.errors import DataError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny_cpu.py")
GRPO_TINY = os.path.join(ROOT, "configs", "grpo_tiny_cpu.py")
SHAPES = ["--source", "demo", "--demo-parts", "shapes", "--num-shapes", "4", "--tool", "classical"]
# 2-3 steps of the tiny model on 4-sample batches: the compile is most of the time
SFT_SMALL = ["batch_size=4", "checkpoint_every=1", "keep_checkpoints=5"]


def cli(*args, cwd, driver: str | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """``ibis-jax ARGS`` in a subprocess (fresh JAX), this checkout first on the path, run in ``cwd``
    (where a collapsed URL would land as a local ``gs:`` folder)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    head = [sys.executable, "-c", driver] if driver else [sys.executable, "-m", "ibis_jax.cli"]
    return subprocess.run([*head, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def no_local_url_folder(cwd) -> None:
    assert not any(name.startswith(("gs:", "gs")) and os.path.isdir(os.path.join(cwd, name))
                   for name in os.listdir(cwd)), os.listdir(cwd)


def test_synth_to_gs_never_creates_a_local_folder_and_resumes(gcs_url, tmp_path):
    data = gcs_url + "/data"
    first = ok(cli("synth", *SHAPES, "--out", data, "--no-progress", "--examples", "1", cwd=tmp_path))
    no_local_url_folder(tmp_path)
    assert f"uploaded and committed {data}" in first.stdout
    assert storage.is_committed(data) and storage.exists(data + "/trajectories-00000-of-00001.manifest.json")
    from ibis_jax.data.records import check_dataset, stage_dataset

    assert check_dataset(stage_dataset(data)) == 4
    # a rerun on another host (an empty cache) resumes from what the bucket holds
    env_cache = os.environ["IBIS_JAX_CACHE"]
    os.environ["IBIS_JAX_CACHE"] = str(tmp_path / "host2")
    try:
        again = ok(cli("synth", *SHAPES, "--out", data, "--no-progress", "--examples", "1", cwd=tmp_path))
    finally:
        os.environ["IBIS_JAX_CACHE"] = env_cache
    assert "1 already done" in again.stdout


def test_unserved_scheme_is_refused_before_anything_is_written(tmp_path):
    for args in (["synth", *SHAPES, "--out", "s3://bucket/x"], ["synth", *SHAPES, "--out", "gs:/bucket/x"],
                 ["eval", "--policy", "oracle", *SHAPES, "--out", "hdfs://n/x"]):
        proc = cli(*args, cwd=tmp_path)
        assert proc.returncode == 1 and ("not served" in proc.stderr or "missing '//'" in proc.stderr), proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert os.listdir(tmp_path) == []


KILL_AFTER_SHARD = textwrap.dedent("""
    import os, signal, sys
    from ibis_jax import storage
    original = storage.stage_up
    def stage_up(local, remote, **kwargs):
        def kill(name):
            if name.endswith(sys.argv[1]):
                os.kill(os.getpid(), signal.SIGKILL)
        return original(local, remote, after_upload=kill)
    storage.stage_up = stage_up
    from ibis_jax.cli import main
    sys.exit(main(sys.argv[2:]))
""")


@pytest.mark.parametrize("kill_after", [".array_record", ".manifest.json"])
def test_synth_killed_mid_upload_leaves_no_dataset_a_reader_accepts(gcs_url, tmp_path, kill_after):
    data = gcs_url + "/data"
    proc = cli(kill_after, "synth", *SHAPES, "--out", data, "--no-progress", "--examples", "0", cwd=tmp_path,
               driver=KILL_AFTER_SHARD)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert storage.exists(data + "/trajectories-00000-of-00001.array_record")  # the shard object is there...
    assert not storage.is_committed(data)  # ...but nothing says the dataset is complete
    from ibis_jax.data.records import stage_dataset

    with pytest.raises(DataError, match="not a committed folder"):
        stage_dataset(data)
    refused = cli("sft", "--config", TINY, "--data", data, "--workdir", gcs_url + "/run", cwd=tmp_path)
    assert refused.returncode == 1 and "not a committed folder" in refused.stderr, refused.stderr[-2000:]
    assert len(refused.stderr.strip().splitlines()) == 1


def test_plan_json_to_gs(gcs_url, tmp_path):
    pytest.importorskip("libtpu", reason="plan needs the plan extra (libtpu)")
    out = gcs_url + "/plan.json"
    ok(cli("plan", "--config", TINY, "--topology", "v5e-4", "--stage", "sft", "--json", out, "batch_size=4",
           cwd=tmp_path))
    import json

    assert json.loads(storage.read_text(out))["stages"][0]["name"] == "sft"
    no_local_url_folder(tmp_path)


def test_synth_sft_eval_chain_through_gs(gcs_url, tmp_path):
    """The fast end to end: synth -> sft (2 steps) -> eval, every path a gs:// one."""
    data, run, out = gcs_url + "/data", gcs_url + "/run", gcs_url + "/eval"
    ok(cli("synth", *SHAPES, "--out", data, "--no-progress", "--examples", "0", cwd=tmp_path))
    sft = ok(cli("sft", "--config", TINY, "--data", data, "--workdir", run, "--no-progress", "max_steps=2",
                 *SFT_SMALL, cwd=tmp_path))
    assert f"HF export in {run}/hf" in sft.stdout
    assert storage.is_committed(run + "/hf") and storage.is_committed(run + "/tokenizer")
    assert storage.exists(run + "/checkpoints/2") and storage.exists(run + "/metrics.jsonl")
    assert [r["step"] for r in map(__import__("json").loads, storage.read_text(run + "/metrics.jsonl").splitlines())] == [1, 2]
    ok(cli("eval", "--policy", run + "/hf", "--out", out, *SHAPES, "--limit", "2", "--max-steps", "2",
           "--curve-clicks", "2", "--examples", "1", cwd=tmp_path))
    assert storage.is_committed(out) and storage.exists(out + "/metrics.json")
    no_local_url_folder(tmp_path)
