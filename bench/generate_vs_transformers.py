"""Decode throughput of the jitted KV-cache sampler vs transformers `generate` (its KV cache).

Same "medium" random config as bench/forward_vs_transformers.py (text 8 layers x 768, GQA 6/2,
vocab 32k), batch 8, 64-token text prompts, 128 new tokens, greedy, no stop; fp32 on CPU.
Decode time: ours = the jitted while-loop decode call (prefill excluded); transformers =
generate(128 new) - generate(1 new), i.e. its 127 cached decode steps, scaled to 128 tokens.
Ours runs twice: with the decoder weights packed for skinny matmuls (the CPU default) and with
the model's own kernels (`SamplerConfig(packed_weights=False)`), to show what packing buys.
Median of --iters runs, the sides interleaved (the machine is shared).

    python bench/generate_vs_transformers.py [--iters 3] [--threads N]
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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from forward_vs_transformers import medium_config  # noqa: E402

from ibis_jax.generate import Sampler, SamplerConfig  # noqa: E402
from ibis_jax.models.qwen2_5_vl import load_hf  # noqa: E402
from ibis_jax.models.qwen2_5_vl.testing import make_hf_model_dir  # noqa: E402

BATCH, PROMPT, NEW = 8, 64, 128


class _Tok:
    """The sampler only needs eos / special ids and decode from a tokenizer."""

    eos_token_id = None
    all_special_ids: list[int] = []

    def __len__(self):
        return 0

    def convert_ids_to_tokens(self, ids):
        return []

    def decode(self, ids, skip_special_tokens=False):
        return ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = medium_config()
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 31000, (BATCH, PROMPT))
    with tempfile.TemporaryDirectory() as d:
        tm = make_hf_model_dir(d, cfg, randomize=False)
        model = load_hf(d)
    samplers = {packed: Sampler(model, _Tok(), SamplerConfig(max_new_tokens=NEW, stop_strings=(), eos_token_ids=(),
                                                             packed_weights=packed))
                for packed in (True, False)}
    prompts = list(ids)

    def ours(packed=True):
        sampler = samplers[packed]
        state = sampler.prefill(prompts)
        state.logits.block_until_ready()
        t = time.perf_counter()
        _, out = sampler.decode(state, BATCH)
        return time.perf_counter() - t, out

    def hf(n):
        t = time.perf_counter()
        with torch.no_grad():
            out = tm.generate(torch.tensor(ids), attention_mask=torch.ones(BATCH, PROMPT, dtype=torch.long),
                              max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
        return time.perf_counter() - t, out

    _, ref = hf(NEW)  # warm-up + parity check
    same = {}
    for packed in (True, False):
        _, mine = ours(packed)  # compile
        same[packed] = np.array_equal(ref[:, PROMPT:].numpy(), np.array([c.token_ids for c in mine]))
    t_ours, t_model, t_hf = [], [], []
    for _ in range(args.iters):
        t_ours.append(ours(True)[0])
        t_model.append(ours(False)[0])
        t_hf.append((hf(NEW)[0] - hf(1)[0]) * NEW / (NEW - 1))
    ours_tps = BATCH * NEW / statistics.median(t_ours)
    model_tps = BATCH * NEW / statistics.median(t_model)
    hf_tps = BATCH * NEW / statistics.median(t_hf)
    print(f"config: medium (text 8x768, vocab 32k), batch {BATCH}, prompt {PROMPT}, {NEW} new tokens, fp32 CPU")
    print(f"greedy tokens identical to transformers: packed {same[True]}, model kernels {same[False]}")
    print(f"ibis-jax sampler decode (packed)       : {ours_tps:8.1f} tokens/s  ({statistics.median(t_ours):.3f} s)")
    print(f"ibis-jax sampler decode (model kernels): {model_tps:8.1f} tokens/s  ({statistics.median(t_model):.3f} s)")
    print(f"transformers generate                  : {hf_tps:8.1f} tokens/s  ({statistics.median(t_hf):.3f} s)")
    print(f"ratio (ours / transformers): {ours_tps / hf_tps:.2f}x  (model kernels: {model_tps / hf_tps:.2f}x)")


if __name__ == "__main__":
    main()
