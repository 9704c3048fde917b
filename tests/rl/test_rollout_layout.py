"""The rollouts' decode layout (rl/rollout_layout.py) and the collectives of the compiled decode
loop (plan/hlo.py): on 8 CPU devices the trainer's decode step gathers no parameter per token."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ibis_jax.plan.hlo import loop_collectives, shape_bytes
from ibis_jax.rl.rollout_layout import resolve_layout, tensor_ways

GiB = 2**30


def test_layout_choice():
    assert resolve_layout("auto", 4, 4, 16 * GiB, None) == ("replicated", 1)  # no budget known: replicated
    assert resolve_layout("auto", 4, 4, 16 * GiB, 50 * GiB) == ("replicated", 1)
    assert resolve_layout("auto", 8, 4, 16 * GiB, 5 * GiB) == ("tensor", 4)  # 16 / 4 = 4 GiB fits
    assert resolve_layout("auto", 8, 4, 16 * GiB, 9 * GiB) == ("tensor", 2)  # the fewest ways that fit
    assert resolve_layout("tensor", 8, 4, 16 * GiB, None) == ("tensor", 4)  # named: as many as divide
    assert resolve_layout("tensor", 8, 4, 16 * GiB, 90 * GiB) == ("tensor", 2)  # named: at least two
    assert tensor_ways(8, 4, 64 * GiB, 1 * GiB) == 4  # none fits: the most ways
    with pytest.raises(ValueError, match="rl.rollout_layout"):
        resolve_layout("fsdp", 4, 4, 1, None)


HLO = """HloModule m
%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %s = f32[] add(%x, %y)
}
%layer (p: (s32[], bf16[8,64])) -> (s32[], bf16[8,64]) {
  %p = (s32[], bf16[8,64]{1,0}) parameter(0)
  %h = bf16[8,64]{1,0} get-tuple-element(%p), index=1
  %ag = bf16[32,64]{1,0} all-gather(%h), dimensions={0}
  %ar = bf16[8,64]{1,0} all-reduce(%h), to_apply=%add
  ROOT %t = (s32[], bf16[8,64]{1,0}) tuple(%i, %ar)
}
%lcond (q: (s32[], bf16[8,64])) -> pred[] {
  ROOT %c = pred[] constant(true)
}
%body (b: (s32[], bf16[8,64])) -> (s32[], bf16[8,64]) {
  %b = (s32[], bf16[8,64]{1,0}) parameter(0)
  %w = (s32[], bf16[8,64]{1,0}) while(%b), condition=%lcond, body=%layer, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %o = (s32[], bf16[8,64]{1,0}) tuple(%w)
}
%cond (a: (s32[], bf16[8,64])) -> pred[] {
  %a = (s32[], bf16[8,64]{1,0}) parameter(0)
  %f = f32[] constant(0)
  %done = f32[] all-reduce(%f), to_apply=%add
  ROOT %r = pred[] compare(%done, %f), direction=LT
}
ENTRY %main (arg: (s32[], bf16[8,64])) -> (s32[], bf16[8,64]) {
  %arg = (s32[], bf16[8,64]{1,0}) parameter(0)
  %pre = bf16[8,64]{1,0} all-gather(%arg), dimensions={0}
  ROOT %loop = (s32[], bf16[8,64]{1,0}) while(%arg), condition=%cond, body=%body
}
"""


def test_loop_collectives_per_iteration():
    moved = loop_collectives(HLO)
    assert moved.loops == 1
    # The layer loop runs 3 times per iteration: 3 x (8 x 64 x 2 B) per kind; the condition's scalar
    # all-reduce once; the all-gather before the loop is not counted.
    assert moved.bytes == {"all-gather": 3 * 1024, "all-reduce": 3 * 1024 + 4}
    assert moved.counts == {"all-gather": 3, "all-reduce": 4}
    assert shape_bytes("(s32[], bf16[8,64]{1,0})") == 4 + 1024


def _worker(layout: str) -> dict:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
                                           os.environ.get("PYTHONPATH", "")]))
    worker = os.path.join(os.path.dirname(__file__), "decode_layout_worker.py")
    res = subprocess.run([sys.executable, worker, layout], env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("layout,mesh", [("auto", {"data": 8, "fsdp": 1, "tensor": 1}),
                                         ("tensor", {"data": 4, "fsdp": 1, "tensor": 2})])
def test_trainer_decode_step_gathers_no_parameter(layout, mesh):
    out = _worker(layout)
    assert out["devices"] == 8 and out["decode_mesh"] == mesh and out["sampler_mesh"] == mesh
    assert out["prefix_cache"] is True
    decode, fsdp = out["decode"], out["fsdp"]
    assert decode["loops"] == 1 and fsdp["loops"] == 1
    # The FSDP training layout gathers the weights inside the loop (the detector sees them) ...
    # (operands are the 1/8 shards of the decoder's weights: ~5 % of all parameter bytes, vision included)
    assert fsdp["counts"].get("all-gather", 0) > 0 and fsdp["bytes"]["all-gather"] > 0.02 * fsdp["param_bytes"]
    # ... the decode layout gathers no weight: replicated nothing at all; tensor-parallel only
    # activations (the sharded logits): under 1 % of the parameter bytes per token either way.
    if layout == "auto":
        assert "all-gather" not in decode["counts"]
    assert sum(decode["bytes"].values()) <= 0.01 * decode["param_bytes"]
    print(layout, "per token per chip:", decode["bytes"], "vs FSDP", fsdp["bytes"])
