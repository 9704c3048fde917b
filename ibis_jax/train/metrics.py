"""Step metrics: JSONL + TensorBoard writers, throughput and analytic MFU.

FLOPs are counted analytically per step from the model config and the batch's token counts
(matmuls only, 2 FLOPs per multiply-add): decoder + LM head on every text and image token,
causal attention scores, and the vision tower on every patch (forward only when it is frozen:
the gradient stops at its output; the merger always trains). Training = 3x forward (forward +
backward for activations and weights).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax

# Dense peak FLOP/s per device by jax device_kind substring, for (bf16, fp32) matmuls.
PEAK_FLOPS = {
    "H100": (989e12, 67e12), "H200": (989e12, 67e12), "A100": (312e12, 19.5e12),
    "TPU v5 lite": (197e12, 197e12 / 4), "TPU v5p": (459e12, 459e12 / 4), "TPU v5": (459e12, 459e12 / 4),
    "TPU v4": (275e12, 275e12 / 4), "TPU v6": (918e12, 918e12 / 4),
}
CPU_PEAK = 5e10  # per host "device": a rough 2-core AVX2 figure; set config peak_flops for yours


def peak_flops_per_device(compute_dtype: str, override: float = 0.0) -> float:
    if override > 0:
        return override
    kind = jax.devices()[0].device_kind
    for name, (bf16, fp32) in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return bf16 if compute_dtype == "bfloat16" else fp32
    return CPU_PEAK


def step_flops(
    cfg: Any, *, tokens: float, seq_len: int, sequences: float, patches: float,
    freeze_vision: bool, image_size: int = 0,
) -> float:
    """Training FLOPs of one step: `tokens` = all sequence positions computed (padding included),
    `patches` = all vision patches computed (padding images included). cfg: either family's
    model config (Qwen2.5-VL: windowed blocks + full-attention ones; Qwen3-VL: full attention
    within each image and one extra merger per DeepStack tap)."""
    t, v = cfg.text, cfg.vision
    d, f, hq = t.hidden_size, t.intermediate_size, t.num_attention_heads * t.head_dim
    hk = t.num_key_value_heads * t.head_dim
    per_layer = d * hq * 2 + d * hk * 2 + 3 * d * f  # q,o + k,v + gate,up,down
    dense = 2 * (t.num_hidden_layers * per_layer + d * t.vocab_size) * tokens
    attn = 2 * 2 * t.num_hidden_layers * hq * seq_len * seq_len * sequences / 2  # causal half
    text = 3 * (dense + attn)
    e, fv = v.hidden_size, v.intermediate_size
    inner = e * v.spatial_merge_size**2
    block = 4 * e * e + 3 * e * fv
    window = (getattr(v, "window_size", 0) // v.patch_size) ** 2
    full = (image_size // v.patch_size) ** 2 if image_size else window
    full_blocks = getattr(v, "fullatt_block_indexes", range(v.depth))
    attn_v = sum(2 * 2 * e * (full if i in full_blocks else window) for i in range(v.depth))
    tower = (2 * v.depth * block + attn_v) * patches + 2 * v.patch_dim * e * patches
    mergers = 1 + len(getattr(v, "deepstack_visual_indexes", ()))
    merger = mergers * 2 * (inner * inner + inner * v.out_hidden_size) * patches / v.spatial_merge_size**2
    return text + (1 if freeze_vision else 3) * tower + 3 * merger


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """The rows of `workdir/metrics.jsonl` (a torn last line from a kill is left out)."""
    path = os.path.join(workdir, "metrics.jsonl")
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict) and "step" in row:
                    rows.append(row)
    return rows


def last_metrics(workdir: str, step: int | None = None) -> dict[str, Any]:
    """The logged row of `step` (default: the last one), or {}."""
    rows = [r for r in read_metrics(workdir) if step is None or r["step"] == step]
    return rows[-1] if rows else {}


class MetricsWriter:
    """Appends one JSON object per logged step to `metrics.jsonl` and writes TensorBoard scalars
    (tensorboardX) under `tb/`. Only process 0 writes. In the spool of a `gs://` workdir
    (`ibis_jax.storage.spool`) both are uploaded every `upload_every_s` seconds and at `close`.

    start_step: the step training (re)starts from. Rows past it (logged after the checkpoint a
    resume restored, by the run that was interrupted) are dropped first, so the file keeps one row
    per step across resumes.
    """

    def __init__(self, workdir: str, enabled: bool = True, start_step: int | None = None,
                 upload_every_s: float = 60.0):
        from ibis_jax.storage import Syncer

        self.enabled = enabled and jax.process_index() == 0
        self._f = self._tb = None
        # in a gs:// workdir's spool: metrics.jsonl and tb/ are uploaded on this cadence and at close
        self._sync = Syncer(workdir, every_s=upload_every_s) if self.enabled else None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            path = os.path.join(workdir, "metrics.jsonl")
            if start_step is not None and os.path.exists(path):
                from ibis_jax.fileio import atomic_write_text

                kept = [r for r in read_metrics(workdir) if r["step"] <= start_step]
                atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
            self._f = open(path, "a")
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(os.path.join(workdir, "tb"))
            except ImportError:  # tensorboardX is optional: JSONL always works
                self._tb = None

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k != "step":
                    self._tb.add_scalar(k, v, step)
        if self._sync.due():
            self._flush()
            self._sync.now()

    def _flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._f:
            self._f.close()
        if self._tb is not None:
            self._tb.close()
        if self._sync is not None:
            self._sync.now()
