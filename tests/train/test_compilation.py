"""Compile once: with the persistent compilation cache (`ibis_jax.compilation`), a second run of
the same GRPO stage compiles no program, and says how many came from the cache."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ibis_jax.compilation import cache_dir

REPO = Path(__file__).resolve().parents[2]


def test_cache_dir_setting(monkeypatch, tmp_path):
    monkeypatch.setenv("IBIS_COMPILATION_CACHE", str(tmp_path / "c"))
    assert cache_dir() == str(tmp_path / "c")
    assert cache_dir("off") is None and cache_dir(str(tmp_path / "d")) == str(tmp_path / "d")
    monkeypatch.setenv("IBIS_COMPILATION_CACHE", "off")
    assert cache_dir() is None


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory):
    from flax import nnx

    from ibis_jax.models.qwen2_5_vl import Qwen25VL, save_hf
    from ibis_jax.models.qwen2_5_vl.tiny import make_tokenizer_dir, tiny_config

    root = tmp_path_factory.mktemp("cache_init")
    tok = make_tokenizer_dir(root / "tok")
    save_hf(Qwen25VL(tiny_config(tok), rngs=nnx.Rngs(0)), root / "hf", source_dir=tok)
    return str(root / "hf")


def _grpo(init_dir: str, workdir: Path, cache: Path) -> tuple[int, int]:
    env = {**os.environ, "IBIS_COMPILATION_CACHE": str(cache), "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "ibis_jax.cli", "grpo", "--config", str(REPO / "configs" / "tiny_cpu.py"),
           "--init", init_dir, "--source", "demo", "--demo-parts", "shapes", "--limit", "2", "--tool", "classical",
           "--workdir", str(workdir), "rl.steps=1", "rl.prompts_per_step=1", "rl.group_size=2", "rl.max_turns=2",
           "rl.max_new_tokens=8", "image_size=56", "export_hf=false"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    m = re.search(r"programs: (\d+) compiled, (\d+) from the compilation cache", done.stdout)
    assert m, done.stdout[-2000:]
    return int(m.group(1)), int(m.group(2))


def test_second_grpo_run_compiles_nothing_new(init_dir, tmp_path):
    cache = tmp_path / "xla"
    compiled, _ = _grpo(init_dir, tmp_path / "first", cache)
    assert compiled > 0
    again, from_cache = _grpo(init_dir, tmp_path / "second", cache)
    assert again == 0 and from_cache >= compiled
