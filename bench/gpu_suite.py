"""The GPU suite: one run (< 8 minutes on one GPU) and one JSON + Markdown summary.

Sections (``--sections``, default all, in this order):
  parity   forward logits of the Flax Qwen2.5-VL vs transformers on the GPU, same weights and input
           (the medium config, one 448 px image + text): fp32 vs fp32, and bf16 (both sides) vs the
           fp32 reference;
  decode   decode tokens/s of the jitted sampler vs transformers `generate` (its KV cache) at batch
           1, 8 and 32, for the medium config (fp32) and a ~1B config (bf16), 128 new tokens;
  sft      the SFT train step (fwd + bwd + AdamW) on the ~1B config in bf16: step time and MFU
           against the GPU's bf16 peak (`ibis_jax.train.metrics.PEAK_FLOPS`, or --peak-tflops);
  sidecar  the MedSAM2 tool backend (random weights): image encodes/s and click steps/s at batch
           1, 8 and 32;
  agent    seconds per case of the whole agent, ibis-jax vs the official design
           (bench/agent_case.py on the GPU, its JSON).

``--dry-run`` builds every config and input *shape* (parameters as abstract shapes, FLOPs counted)
and runs nothing heavy: seconds on a CPU, so the CI keeps the suite from rotting.

    bash bench/gpu_suite.sh                       # writes gpu_suite.json and gpu_suite.md
    python bench/gpu_suite.py --dry-run --out /tmp/suite
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

SECTIONS = ("parity", "decode", "sft", "sidecar", "agent")
BATCHES = (1, 8, 32)
NEW_TOKENS, PROMPT = 128, 64


def medium():
    from forward_vs_transformers import medium_config

    return medium_config()


def one_b():
    """~1B parameters: text 16 x 2048 (GQA 16/4, MLP 5632), vision 16 x 768, vocab 32k."""
    from ibis_jax.models.qwen2_5_vl import Qwen25VLConfig, TextConfig, VisionConfig

    return Qwen25VLConfig(
        vision=VisionConfig(depth=16, hidden_size=768, intermediate_size=2048, num_heads=12, out_hidden_size=2048,
                            fullatt_block_indexes=(3, 7, 11, 15), window_size=112),
        text=TextConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                        num_attention_heads=16, num_key_value_heads=4, mrope_section=(16, 24, 24)),
        image_token_id=31990, video_token_id=31991, vision_start_token_id=31992, vision_end_token_id=31993,
    )


@functools.lru_cache(maxsize=None)
def param_count(cfg) -> int:
    """Parameters of a `Qwen25VL` for `cfg`, from abstract shapes (nothing allocated)."""
    import jax
    from flax import nnx

    from ibis_jax.models.qwen2_5_vl import Qwen25VL

    abstract = nnx.eval_shape(lambda: Qwen25VL(cfg, rngs=nnx.Rngs(0)))
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))))


def _sync(x):
    import jax

    return jax.block_until_ready(x)


def _cuda_sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _median_time(fn, iters: int) -> float:
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


# ---------------------------------------------------------------------------- sections
def parity(args, dry: bool) -> dict:
    from ibis_jax.models.qwen2_5_vl.testing import image_sequence

    cfg = medium()
    rng = np.random.default_rng(0)
    grid = np.array([[1, 32, 32]])  # 448 px: 1024 patches, 256 visual tokens
    ids = image_sequence(cfg, rng, grid, [128, 128], vocab=31000)[None]
    pixels = rng.standard_normal((1024, cfg.vision.patch_dim)).astype(np.float32)
    out = {"config": "medium", "params_M": round(param_count(cfg) / 1e6, 1), "input_ids": list(ids.shape),
           "pixel_values": list(pixels.shape)}
    if dry:
        return out
    import jax.numpy as jnp
    import torch

    from ibis_jax.models.qwen2_5_vl import load_hf
    from ibis_jax.models.qwen2_5_vl.testing import flax_logits, make_hf_model_dir

    dev = args.device
    with tempfile.TemporaryDirectory() as d:
        tm = make_hf_model_dir(d, cfg, randomize=True)
        ours = {dt: load_hf(d, dtype=dt) for dt in (jnp.float32, jnp.bfloat16)}

    def hf(dtype):
        m = tm.to(dev, dtype)
        kw = dict(input_ids=torch.tensor(ids, device=dev), pixel_values=torch.tensor(pixels, device=dev, dtype=dtype),
                  image_grid_thw=torch.tensor(grid, device=dev),
                  mm_token_type_ids=torch.tensor((ids == cfg.image_token_id).astype(np.int64), device=dev))
        with torch.no_grad():
            return m(**kw).logits.float().cpu().numpy()

    ref = hf(torch.float32)
    mine = flax_logits(ours[jnp.float32], ids, None, pixels, grid)
    hf16, mine16 = hf(torch.bfloat16), flax_logits(ours[jnp.bfloat16], ids, None, pixels.astype(jnp.bfloat16), grid)
    scale = float(np.abs(ref).max())
    out.update(fp32_max_abs=float(np.abs(mine - ref).max()), logit_scale=scale,
               fp32_argmax_agree=float((mine.argmax(-1) == ref.argmax(-1)).mean()),
               bf16_ours_vs_fp32_max_abs=float(np.abs(mine16 - ref).max()),
               bf16_hf_vs_fp32_max_abs=float(np.abs(hf16 - ref).max()),
               bf16_argmax_agree_ours=float((mine16.argmax(-1) == ref.argmax(-1)).mean()),
               bf16_argmax_agree_hf=float((hf16.argmax(-1) == ref.argmax(-1)).mean()))
    return out


def decode(args, dry: bool) -> dict:
    out = {}
    for name, cfg, dtype in (("medium", medium(), "float32"), ("1b", one_b(), "bfloat16")):
        plan = {"params_M": round(param_count(cfg) / 1e6, 1), "dtype": dtype, "prompt": PROMPT, "new_tokens": NEW_TOKENS,
                "batches": list(BATCHES)}
        out[name] = plan
        if dry:
            continue
        import jax.numpy as jnp
        import torch
        from generate_vs_transformers import _Tok

        from ibis_jax.generate import Sampler, SamplerConfig
        from ibis_jax.models.qwen2_5_vl import load_hf
        from ibis_jax.models.qwen2_5_vl.testing import make_hf_model_dir

        with tempfile.TemporaryDirectory() as d:
            tm = make_hf_model_dir(d, cfg, randomize=False, dtype=dtype).to(args.device)
            model = load_hf(d, dtype=getattr(jnp, dtype))
        sampler = Sampler(model, _Tok(), SamplerConfig(max_new_tokens=NEW_TOKENS, stop_strings=(), eos_token_ids=()))
        for b in BATCHES:
            ids = np.random.default_rng(b).integers(0, 31000, (b, PROMPT))

            def ours():
                state = _sync(sampler.prefill(list(ids)))
                t = time.perf_counter()
                sampler.decode(state, b)
                return time.perf_counter() - t

            def hf(n):
                _cuda_sync()
                t = time.perf_counter()
                with torch.no_grad():
                    tm.generate(torch.tensor(ids, device=args.device), attention_mask=torch.ones_like(torch.tensor(ids, device=args.device)),
                                max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
                _cuda_sync()
                return time.perf_counter() - t

            ours(), hf(2)  # compile / warm-up
            t_ours = float(np.median([ours() for _ in range(args.iters)]))
            t_hf = float(np.median([(hf(NEW_TOKENS) - hf(1)) * NEW_TOKENS / (NEW_TOKENS - 1) for _ in range(args.iters)]))
            plan[f"batch{b}"] = {"ours_tok_s": round(b * NEW_TOKENS / t_ours, 1),
                                 "transformers_tok_s": round(b * NEW_TOKENS / t_hf, 1), "ratio": round(t_hf / t_ours, 2)}
        del tm, model, sampler
    return out


def sft(args, dry: bool) -> dict:
    import jax

    from ibis_jax.train.metrics import PEAK_FLOPS, step_flops

    cfg = one_b()
    batch, seq, image = args.sft_batch, args.sft_seq, 224
    patches = batch * (image // 14) ** 2
    flops = step_flops(cfg, tokens=batch * seq, seq_len=seq, sequences=batch, patches=patches,
                       freeze_vision=False, image_size=image)
    out = {"config": "1b", "params_M": round(param_count(cfg) / 1e6, 1), "dtype": "bfloat16", "batch": batch,
           "seq": seq, "image_size": image, "train_tflops_per_step": round(flops / 1e12, 3)}
    if dry:
        return out
    from flax import nnx
    from sft_step import make_batch

    from ibis_jax.train.config import TrainConfig
    from ibis_jax.train.loss import LOSSES
    from ibis_jax.train.mesh import make_mesh, named
    from ibis_jax.train.optim import make_optimizer
    from ibis_jax.train.state import ModelDef, init_fn_for, make_model, split_model, state_specs
    from ibis_jax.train.step import jit_train_step, make_train_step

    tcfg = TrainConfig(compute_dtype="bfloat16", batch_size=batch, lr=1e-4, warmup_frac=0.0, remat=args.remat)
    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    tx, schedule = make_optimizer(tcfg, 1000)
    key = jax.random.key(0)
    graphdef, _, _, specs = split_model(nnx.eval_shape(lambda: make_model(tcfg, cfg, key)), tcfg)
    init = init_fn_for(tcfg, cfg, tx)
    shardings = named(mesh, state_specs(jax.eval_shape(init, key), specs, tx, tcfg))
    state = jax.jit(init, out_shardings=shardings)(key)
    mb = make_batch(cfg, batch, seq, image)
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    step = jit_train_step(make_train_step(ModelDef(graphdef, cfg), LOSSES["sft"], tx, schedule), shardings,
                          jax.tree.map(lambda _: rep, mb), mesh)
    t = time.perf_counter()
    state, m = step(state, mb)
    _sync(m)
    compile_s = time.perf_counter() - t

    def run():
        nonlocal state
        state, metrics = step(state, mb)
        _sync(metrics)

    step_s = _median_time(run, args.iters)
    kind = jax.devices()[0].device_kind
    peak = args.peak_tflops * 1e12 or next((bf16 for n, (bf16, _) in PEAK_FLOPS.items() if n.lower() in kind.lower()), 0.0)
    out.update(device=kind, compile_s=round(compile_s, 1), step_s=round(step_s, 4),
               tokens_per_s=round(batch * seq / step_s, 1), achieved_tflop_s=round(flops / step_s / 1e12, 1),
               peak_tflop_s=peak / 1e12 or None, mfu=round(flops / step_s / peak, 3) if peak else None)
    return out


def sidecar(args, dry: bool) -> dict:
    side = 512
    out = {"backend": "medsam2 (SAM2.1 Hiera-T, 512 px, random weights)", "image": [side, side, 3],
           "batches": list(BATCHES), "clicks_per_step": 3}
    if dry:
        return out
    from bridge import random_checkpoint

    from tool_bridge.backends.base import DecodeRequest
    from tool_bridge.backends.medsam2 import MedSAM2Backend

    with tempfile.TemporaryDirectory() as d:
        backend = MedSAM2Backend(random_checkpoint(d), device=args.device)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(max(BATCHES))]
    points = rng.uniform(0, side - 1, (3, 2)).astype(np.float32)
    labels = np.array([1, 0, 1], np.int32)
    for b in BATCHES:
        backend.encode(images[:b])  # warm-up
        _cuda_sync()
        enc_s = _median_time(lambda: (backend.encode(images[:b]), _cuda_sync()), args.iters)
        encoded = backend.encode(images[:b])
        reqs = [DecodeRequest(e, points, labels, None) for e in encoded]
        backend.decode(reqs)
        dec_s = _median_time(lambda: (backend.decode(reqs), _cuda_sync()), args.iters)
        out[f"batch{b}"] = {"encodes_per_s": round(b / enc_s, 1), "steps_per_s": round(b / dec_s, 1)}
        for e in encoded:
            backend.release(e)
    return out


def agent(args, dry: bool) -> dict:
    cmd = [sys.executable, os.path.join(HERE, "agent_case.py"), "--device", args.device]
    if dry:
        return {"command": " ".join(cmd[1:] + ["--json", "PATH"])}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "agent.json")
        proc = subprocess.run(cmd + ["--json", path], capture_output=True, text=True, timeout=args.agent_timeout_s)
        if proc.returncode != 0:
            return {"error": proc.stderr[-2000:]}
        with open(path) as f:
            return json.load(f) | {"printout": [line for line in proc.stdout.splitlines() if line.strip()]}


RUNNERS = {"parity": parity, "decode": decode, "sft": sft, "sidecar": sidecar, "agent": agent}


def markdown(summary: dict) -> str:
    lines = [f"# GPU suite ({'dry run: shapes only' if summary['dry_run'] else summary['device']})", "",
             f"jax {summary['jax']}, backend {summary['backend']}, {summary['seconds']:.1f} s", ""]
    for name, section in summary["sections"].items():
        lines += [f"## {name}", "", "```json", json.dumps(section, indent=1), "```", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="configs and shapes only (seconds, any CPU)")
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--out", default="gpu_suite", help="writes OUT.json and OUT.md")
    ap.add_argument("--device", default="cuda", help="torch device of transformers and the tool")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--sft-batch", type=int, default=8)
    ap.add_argument("--sft-seq", type=int, default=1024)
    ap.add_argument("--remat", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="bf16 peak per GPU (0: by device name)")
    ap.add_argument("--budget-s", type=float, default=450.0, help="skip the remaining sections past this")
    ap.add_argument("--agent-timeout-s", type=float, default=240.0)
    args = ap.parse_args(argv)
    import jax

    names = [s for s in args.sections.split(",") if s]
    unknown = set(names) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    start = time.perf_counter()
    sections: dict = {}
    for name in names:
        if time.perf_counter() - start > args.budget_s:
            sections[name] = {"skipped": f"past the {args.budget_s:.0f} s budget"}
            continue
        t = time.perf_counter()
        try:
            sections[name] = RUNNERS[name](args, args.dry_run)
        except Exception as error:  # one failing section must not lose the others' numbers
            if args.dry_run:
                raise
            sections[name] = {"error": f"{type(error).__name__}: {error}"}
        sections[name]["seconds"] = round(time.perf_counter() - t, 2)
        print(f"[gpu_suite] {name}: {sections[name]['seconds']} s", flush=True)
    summary = {"dry_run": args.dry_run, "device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
               "jax": jax.__version__, "seconds": time.perf_counter() - start, "sections": sections}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(summary, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(summary))
    print(f"[gpu_suite] wrote {args.out}.json and {args.out}.md in {summary['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
