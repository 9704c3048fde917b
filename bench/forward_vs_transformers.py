"""Forward time of the jitted Flax Qwen2.5-VL vs transformers on CPU, same weights and input.

Input: one 448x448 image (32x32 patches -> 256 visual tokens) + 256 text tokens.
Model: a "medium" random config (vision 8 blocks x 384, text 8 layers x 768, GQA 6/2, head_dim 128, vocab 32k).

    python bench/forward_vs_transformers.py [--iters 5] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ibis_jax.models.qwen2_5_vl import Qwen25VLConfig, TextConfig, VisionConfig, load_hf, vision_layout  # noqa: E402
from ibis_jax.models.qwen2_5_vl.testing import image_sequence, make_hf_model_dir  # noqa: E402


def medium_config() -> Qwen25VLConfig:
    return Qwen25VLConfig(
        vision=VisionConfig(
            depth=8, hidden_size=384, intermediate_size=768, num_heads=6, out_hidden_size=768,
            fullatt_block_indexes=(3, 7), window_size=112,
        ),
        text=TextConfig(
            vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
            num_attention_heads=6, num_key_value_heads=2, mrope_section=(16, 24, 24),
        ),
        image_token_id=31990, video_token_id=31991, vision_start_token_id=31992, vision_end_token_id=31993,
    )


def _time_interleaved(fns: dict, iters: int) -> dict:
    """Median seconds per call of each fn, alternating them so that load from other processes on
    a shared machine hits both sides alike."""
    for fn in fns.values():
        fn()  # warm-up (jit compile)
    times = {k: [] for k in fns}
    for _ in range(iters):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = ap.parse_args()

    import jax
    import torch
    from flax import nnx

    from ibis_jax.models.qwen2_5_vl.testing import hf_logits

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = medium_config()
    rng = np.random.default_rng(0)
    grid = np.array([[1, 32, 32]])  # 448 / 14 = 32 patches per side
    ids = image_sequence(cfg, rng, grid, [128, 126], vocab=31000)[None]  # 256 text + 256 visual tokens
    mask = np.ones_like(ids)
    pv = rng.standard_normal((1024, cfg.vision.patch_dim)).astype(np.float32)

    with tempfile.TemporaryDirectory() as d:
        tm = make_hf_model_dir(d, cfg, randomize=False)
        model = load_hf(d)
    layout = vision_layout(grid, cfg.vision)

    @nnx.jit
    def forward(model, ids, mask, pv, grid, layout):
        return model(ids, mask, pv, grid, vision_layout=layout)

    t0 = time.perf_counter()
    jax_out = np.asarray(forward(model, ids, mask, pv, grid, layout))
    compile_s = time.perf_counter() - t0
    ref = hf_logits(tm, ids, mask, pv, grid)
    diff = float(np.abs(jax_out - ref).max())

    t = _time_interleaved(
        {
            "flax": lambda: forward(model, ids, mask, pv, grid, layout).block_until_ready(),
            "hf": lambda: hf_logits(tm, ids, mask, pv, grid),
        },
        args.iters,
    )
    t_jax, t_hf = t["flax"], t["hf"]
    print(f"input: 1 image 448x448 ({grid.prod() // 4} visual tokens) + 256 text tokens, seq {ids.shape[1]}")
    print(f"devices: jax {jax.devices()[0].platform} x{len(jax.devices())}, torch threads {torch.get_num_threads()}")
    print(f"max |logits diff| = {diff:.2e}; flax first call (compile + run) {compile_s:.2f} s")
    print(f"flax (jit)   : {t_jax * 1e3:8.1f} ms / forward (median of {args.iters})")
    print(f"transformers : {t_hf * 1e3:8.1f} ms / forward (median of {args.iters})")
    print(f"ratio transformers / flax = {t_hf / t_jax:.2f}x")


if __name__ == "__main__":
    main()
