"""SFT train-step time and analytic MFU for a medium Qwen2.5-VL config (CPU by default).

    python bench/sft_step.py                 # medium config, batch 4 x 512 tokens, one 224 px image each
    python bench/sft_step.py --batch 8 --seq 1024 --peak-flops 1e12

Prints the jitted train step time (fwd + bwd + AdamW), the forward-only time of the same model
and batch measured in the same run (the anchor), their ratio (ideal ~3: backward = 2x forward),
achieved FLOP/s from the analytic count (`ibis_jax.train.metrics.step_flops`) and MFU against
`--peak-flops` (default: the table in metrics.py; CPU: a rough 5e10 per device), and the same
achieved rate over the rate of one large matmul measured in the same run (the honest anchor on a
CPU, whose nominal peak XLA does not reach).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import numpy as np
from flax import nnx

from ibis_jax.models.qwen2_5_vl import Qwen25VLConfig, vision_layout
from ibis_jax.train.config import TrainConfig
from ibis_jax.train.loss import LOSSES
from ibis_jax.train.mesh import make_mesh, named
from ibis_jax.train.metrics import peak_flops_per_device, step_flops
from ibis_jax.train.optim import make_optimizer
from ibis_jax.train.state import ModelDef, init_fn_for, make_model, split_model, state_specs
from ibis_jax.train.step import jit_train_step, make_train_step


def medium_config() -> Qwen25VLConfig:
    """~60M params: 4 text layers of 512, 4 vision blocks of 256 (2 windowed, 2 full)."""
    tiny = Qwen25VLConfig.tiny(vocab_size=4096, image_token_id=4000, video_token_id=4001,
                               vision_start_token_id=4002, vision_end_token_id=4003)
    vision = dataclasses.replace(tiny.vision, hidden_size=256, intermediate_size=512, num_heads=4,
                                 window_size=112, out_hidden_size=512)
    text = dataclasses.replace(tiny.text, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                               num_attention_heads=8, num_key_value_heads=2, mrope_section=(8, 12, 12))
    return dataclasses.replace(tiny, vision=vision, text=text)


def make_batch(cfg: Qwen25VLConfig, batch: int, seq: int, image_size: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    side = image_size // 14
    n_img = (side // 2) ** 2
    ids = rng.integers(0, 3900, (batch, seq)).astype(np.int32)
    ids[:, 10:10 + n_img] = cfg.image_token_id
    ids[:, 9], ids[:, 10 + n_img] = cfg.vision_start_token_id, cfg.vision_end_token_id
    weights = np.zeros((batch, seq), np.float32)
    weights[:, seq // 2:] = 1.0
    grid = np.tile(np.array([[1, side, side]], np.int32), (batch, 1))
    b = {
        "input_ids": ids, "attention_mask": np.ones_like(ids), "targets": np.roll(ids, -1, 1),
        "weights": weights, "action_mask": weights,
        "pixel_values": rng.standard_normal((batch * side * side, cfg.vision.patch_dim)).astype(np.float32),
        "image_grid_thw": grid, "num_images": np.asarray(batch, np.int32),
    }
    b = {k: v[None] for k, v in b.items()}  # one micro-batch
    lay = vision_layout(grid, cfg.vision)
    b["vision_layout"] = jax.tree.map(lambda x: x[None], lay)
    return b


def timeit(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def matmul_flop_s(dtype: str, n: int = 2048, iters: int = 5) -> float:
    """FLOP/s of a jitted [n, n] x [n, n] matmul in ``dtype`` (median of ``iters``)."""
    a = jax.random.normal(jax.random.key(1), (n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    return 2 * n**3 / timeit(lambda: f(a), iters)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--freeze-vision", action="store_true")
    ap.add_argument("--remat", action="store_true")
    ap.add_argument("--peak-flops", type=float, default=0.0, help="per device")
    args = ap.parse_args()

    mcfg = medium_config()
    cfg = TrainConfig(compute_dtype=args.dtype, freeze_vision=args.freeze_vision, remat=args.remat,
                      batch_size=args.batch, lr=1e-4, warmup_frac=0.0, peak_flops=args.peak_flops)
    mesh = make_mesh((-1, 1, 1))
    tx, schedule = make_optimizer(cfg, 1000)
    key = jax.random.key(0)
    graphdef, _, _, param_specs = split_model(nnx.eval_shape(lambda: make_model(cfg, mcfg, key)), cfg)
    model_def = ModelDef(graphdef, mcfg)
    init = init_fn_for(cfg, mcfg, tx)
    shardings = named(mesh, state_specs(jax.eval_shape(init, key), param_specs, tx, cfg))
    state = jax.jit(init, out_shardings=shardings)(key)
    batch = make_batch(mcfg, args.batch, args.seq, args.image_size)
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    bshard = jax.tree.map(lambda _: rep, batch)
    step = jit_train_step(make_train_step(model_def, LOSSES["sft"], tx, schedule), shardings, bshard, mesh)

    @jax.jit
    def forward(params, frozen, mb):
        mb = jax.tree.map(lambda x: x[0], mb)
        return LOSSES["sft"](model_def.build(params, frozen), mb)[0]

    n_params = sum(x.size for x in jax.tree.leaves((state.params, state.frozen)))
    t0 = time.perf_counter()
    state, _ = step(state, batch)
    jax.block_until_ready(state)
    compile_s = time.perf_counter() - t0

    def run_step():
        nonlocal state
        state, m = step(state, batch)
        return m["loss"]

    with jax.set_mesh(mesh):
        fwd_s = timeit(lambda: forward(state.params, state.frozen, batch), args.iters + 1)
    step_s = timeit(run_step, args.iters)
    flops = step_flops(mcfg, tokens=args.batch * args.seq, seq_len=args.seq, sequences=args.batch,
                       patches=batch["pixel_values"].shape[1], freeze_vision=args.freeze_vision,
                       image_size=args.image_size)
    peak = peak_flops_per_device(args.dtype, args.peak_flops) * mesh.size
    matmul = matmul_flop_s(args.dtype)
    out = {
        "device": jax.devices()[0].device_kind, "devices": mesh.size, "params_M": round(n_params / 1e6, 1),
        "batch": args.batch, "seq": args.seq, "image_size": args.image_size, "dtype": args.dtype,
        "compile_plus_first_step_s": round(compile_s, 2), "forward_s": round(fwd_s, 4), "step_s": round(step_s, 4),
        "step_over_forward": round(step_s / fwd_s, 2), "train_tflops_per_step": round(flops / 1e12, 4),
        "achieved_tflop_s": round(flops / step_s / 1e12, 4), "peak_tflop_s": peak / 1e12,
        "mfu": round(flops / step_s / peak, 4),
        # The anchor measured in this run: one large matmul, what XLA reaches on this device.
        "matmul_tflop_s": round(matmul / 1e12, 4),
        "step_over_matmul_rate": round(flops / step_s / matmul, 3),
        "tokens_per_s": round(args.batch * args.seq / step_s, 1),
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
