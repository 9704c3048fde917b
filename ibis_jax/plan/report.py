"""The plan's table (stdout), the one-line not-fit message and the JSON file."""

from __future__ import annotations

import json
from typing import Any, Sequence

from ibis_jax.plan.programs import StageResult

GiB = 1024**3
LEVERS = "lora_rank=8 (LoRA), remat=true, a larger fsdp (mesh_shape=1,-1,1 or more chips), a smaller micro-batch (grad_accum=N, rl.prompts_per_step=N)"


def gib(n: float) -> str:
    return f"{n / GiB:.2f}"


def fmt_seconds(s: float) -> str:
    return f"{s * 1e3:.0f} ms" if s < 1 else f"{s:.1f} s"


def gib_parts(parts: dict[str, int]) -> str:
    """'state 3.90, gradients 0.10, ...' (GiB)."""
    return ", ".join(f"{k} {gib(v)}" for k, v in parts.items())


def table(target: str, stages: Sequence[StageResult], mfu: float) -> str:
    head = (f"{'stage':<8} {'devices':>7} {'mesh (data,fsdp,tensor)':<24} {'params':>7} {'optim':>7} {'kv':>7} "
            f"{'temp':>7} {'total':>7} {'HBM':>7}  {'fits':<4} {'TFLOP/step':>10} {'step@MFU':>9} {'compile':>8}")
    lines = [f"target {target}; bytes per device in GiB; FLOPs analytic (train.metrics.step_flops); "
             f"step time at MFU {mfu:.0%}", head, "-" * len(head)]
    for s in stages:
        mesh = f"{s.mesh.get('data', 1)},{s.mesh.get('fsdp', 1)},{s.mesh.get('tensor', 1)}"
        b = s.bytes
        lines.append(
            f"{s.name:<8} {s.devices:>7} {mesh:<24} {gib(b['params']):>7} {gib(b['optimizer']):>7} "
            f"{gib(b['kv_cache']):>7} {gib(b['temp']):>7} {gib(b['total']):>7} {gib(s.hbm_bytes):>7}  "
            f"{'yes' if s.fits else 'NO':<4} {s.flops_per_step / 1e12:>10.1f} {fmt_seconds(s.step_seconds):>9} "
            f"{s.compile_seconds:>7.1f}s")
    for s in stages:
        lines.append(f"  {s.name}: {s.shapes}" + (f"; {s.note}" if s.note else ""))
    return "\n".join(lines)


def not_fit_line(stage: str, needed: int | None, hbm: int, lower_bound: bool = False) -> str:
    need = f"{gib(needed)} GiB per chip" if needed else "more than the chip has"
    if needed and lower_bound:
        need = f"at least {need} (params + optimizer state + fp32 gradients, before activations)"
    return f"plan: {stage} does not fit: needs {need}, HBM {gib(hbm)} GiB; levers: {LEVERS}"


def write_json(path: str, config: str, topology: str, stages: Sequence[StageResult], extra: dict[str, Any]) -> None:
    data = {"config": config, "topology": topology, "stages": [s.to_json() for s in stages], **extra}
    from ibis_jax import storage

    text = json.dumps(data, indent=1)
    if storage.is_remote(storage.check_path(path, "--json")):
        storage.write_bytes(path, text.encode("utf-8"))  # one object: visible whole or not at all
    else:
        from ibis_jax.fileio import atomic_write_text

        atomic_write_text(path, text)
