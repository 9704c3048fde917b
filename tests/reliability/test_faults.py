"""Faults survived by SFT (slow: five short training runs of the tiny model as subprocesses).

One workdir goes through them in turn, each run a real ``ibis-jax sft`` process:
1. SIGKILL while saving the step-4 checkpoint: the earlier checkpoint stays intact;
2. the rerun resumes ("resumed from step 2"), trains to the end and is SIGKILLed during the HF
   export: no ``hf`` folder (and no torn config.json) is left;
3. a rerun says the run is finished (no ``loss nan``) and writes the missing export;
4. the latest checkpoint is corrupted: the rerun warns naming it, falls back to step 2, trains
   steps 3-4 again and exports weights identical to step 3's;
and ``metrics.jsonl`` keeps one row per step throughout.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import write_dataset

REPO = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("fault_driver.py")
CONFIG = """
from ibis_jax.train.config import TrainConfig

def get_config():
    return TrainConfig(image_size=56, seq_buckets=(1024,), batch_size=2, max_steps=4, lr=1e-3, warmup_frac=0.0,
                       freeze_vision=False, checkpoint_every=2, keep_checkpoints=3, export_hf=True,
                       system_prompt="short")
"""


def _run(args: list[str], fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    env.pop("IBIS_DEBUG", None)
    head = [sys.executable, str(DRIVER), fault] if fault else [sys.executable, "-m", "ibis_jax.cli"]
    return subprocess.run([*head, *args], capture_output=True, text=True, env=env, timeout=900)


def _steps(work: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (work / "metrics.jsonl").read_text().splitlines()]


def _weights(hf: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(hf / "model.safetensors"))


@pytest.mark.slow
def test_sft_survives_kills_and_a_corrupt_checkpoint(tmp_path):
    data = write_dataset(str(tmp_path / "data"), records=3)
    (tmp_path / "cfg.py").write_text(CONFIG)
    work = tmp_path / "work"
    args = ["sft", "--config", str(tmp_path / "cfg.py"), "--data", data, "--workdir", str(work), "--no-progress"]

    # 1. killed while saving step 4: steps 2 stays, 4 never appears
    killed = _run(args, "save:4")
    assert killed.returncode == -9, killed.stderr[-2000:]
    steps = os.listdir(work / "checkpoints")
    assert "2" in steps and "4" not in steps, steps  # (Orbax's temporary 4.orbax-checkpoint-tmp-* may stay)

    # 2. resumes from step 2; killed during the export: no hf folder, no torn config.json
    killed = _run(args, "export")
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert "resumed from step 2" in killed.stderr
    assert not (work / "hf").exists() and not (work / "hf" / "config.json").exists()
    assert _steps(work) == [1, 2, 3, 4]

    # 3. finished: says so, writes the export the kill prevented, leaves no partial folder
    done = _run(args)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "already finished at step 4/4" in done.stdout and "nan" not in done.stdout
    assert json.loads((work / "hf" / "config.json").read_text())["model_type"] == "qwen2_5_vl"
    assert not glob.glob(str(work / ".hf.partial-*"))
    exported = _weights(work / "hf")

    # 4. a corrupt latest checkpoint: warns naming it, falls back to step 2, same weights at the end
    biggest = max((p for p in (work / "checkpoints" / "4").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    with open(biggest, "r+b") as handle:
        handle.truncate(100)
    again = _run(args)
    assert again.returncode == 0, again.stderr[-2000:]
    warning = [line for line in again.stderr.splitlines() if "does not restore" in line]
    assert warning and str(work / "checkpoints" / "4") in warning[0]
    assert "resumed from step 2" in again.stderr and "step 4/4" in again.stdout
    assert _steps(work) == [1, 2, 3, 4]
    assert list((work / "checkpoints-unrestorable").iterdir())
    redone = _weights(work / "hf")
    assert exported.keys() == redone.keys()
    for key in exported:
        np.testing.assert_array_equal(exported[key], redone[key])
