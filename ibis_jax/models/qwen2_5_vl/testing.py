"""Test and benchmark fixtures: random Hugging Face models of either family in the real format, and
reference forwards (transformers vs ours). Never imported by the package itself; the tiny
tokenizer and config builders the trainers use are in ``tiny.py``.

    tok_dir = make_tokenizer_dir(tmp / "tok")
    cfg = tiny_config(tok_dir)
    make_hf_model_dir(tmp / "model", cfg, tokenizer_dir=tok_dir)   # needs torch + transformers
    model = load_hf(tmp / "model")
"""

from __future__ import annotations

import functools
import os
import shutil
from typing import Any

import numpy as np

from .tiny import (CHAT_TEMPLATE, GRAMMAR_TOKENS, SPECIAL_TOKENS, build_tokenizer, make_tokenizer_dir,
                   special_token_ids, tiny_config, tokenizer_size)

__all__ = [  # the tiny kit is re-exported for tests and benchmarks
    "CHAT_TEMPLATE", "GRAMMAR_TOKENS", "SPECIAL_TOKENS", "build_tokenizer", "flax_logits", "hf_logits",
    "image_sequence", "make_hf_model_dir", "make_tokenizer_dir", "pad_batch", "special_token_ids", "tiny_config",
    "tokenizer_size",
]


def make_hf_model_dir(
    directory: str | os.PathLike,
    config: Any,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    seed: int = 0,
    randomize: bool = True,
    dtype: str = "float32",
):
    """Build a random transformers model of `config`'s family (`config.architecture`, e.g.
    `Qwen2_5_VLForConditionalGeneration`), save it with `save_pretrained` into `directory`
    (+ tokenizer files) and return the torch model (eval).

    randomize: also draw norm weights and biases at random (HF initialises them to 1 / 0, which
    would hide a swapped or missing one in parity tests), and a learned position table at a scale
    that matters next to the patch embedding. Needs torch.
    """
    import torch
    import transformers

    directory = os.fspath(directory)
    torch.manual_seed(seed)
    model_class = getattr(transformers, config.architecture)
    model = model_class(model_class.config_class(**config.to_hf_dict())).eval()
    if randomize:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                is_norm = ("norm" in name or "ln_q" in name) and "proj" not in name
                if is_norm and name.endswith("weight"):
                    p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
                elif "pos_embed" in name:
                    p.copy_(0.5 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(0.05 * torch.randn(p.shape, generator=g))
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(directory)
    if tokenizer_dir is not None:
        for name in os.listdir(tokenizer_dir):
            src = os.path.join(tokenizer_dir, name)
            if os.path.isfile(src) and name != "config.json":
                shutil.copy2(src, os.path.join(directory, name))
    return model


def image_sequence(cfg, rng: np.random.Generator, grids, text_lens, vocab: int = 400) -> np.ndarray:
    """input_ids [S] with text chunks and <|vision_start|> pad*n <|vision_end|> per image grid."""
    parts = [rng.integers(0, vocab, text_lens[0])]
    for g, tl in zip(grids, text_lens[1:]):
        n = int(np.prod(g)) // 4
        parts += [[cfg.vision_start_token_id], np.full(n, cfg.image_token_id), [cfg.vision_end_token_id]]
        parts.append(rng.integers(0, vocab, tl))
    return np.concatenate(parts).astype(np.int64)


def pad_batch(seqs, side: str, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stack 1-D id arrays into input_ids / attention_mask [B, S] padded on `side`."""
    s = max(len(x) for x in seqs)
    ids = np.full((len(seqs), s), pad_id, np.int64)
    mask = np.zeros((len(seqs), s), np.int64)
    for i, x in enumerate(seqs):
        sl = slice(s - len(x), s) if side == "left" else slice(0, len(x))
        ids[i, sl] = x
        mask[i, sl] = 1
    return ids, mask


def hf_logits(
    model, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None, position_ids=None
) -> np.ndarray:
    """Logits of the torch model as numpy (mm_token_type_ids built so HF computes 3D positions)."""
    import torch

    cfg = model.config
    kw = dict(input_ids=torch.tensor(input_ids))
    if attention_mask is not None:
        kw["attention_mask"] = torch.tensor(attention_mask)
    if pixel_values is not None:
        kw["pixel_values"] = torch.tensor(pixel_values)
        kw["image_grid_thw"] = torch.tensor(image_grid_thw)
        kw["mm_token_type_ids"] = torch.tensor((input_ids == cfg.image_token_id).astype(np.int64))
    if position_ids is not None:
        kw["position_ids"] = torch.tensor(np.asarray(position_ids), dtype=torch.long)
    with torch.no_grad():
        return model(**kw).logits.float().numpy()


def flax_logits(
    model, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None, position_ids=None
) -> np.ndarray:
    """Jitted forward of a `Qwen25VL` or `Qwen3VL` (vision layout computed on the host, packed) as numpy.

    One XLA compile per input shape is several times cheaper than eager op-by-op dispatch."""
    layout = None if image_grid_thw is None else model.vision_layout(np.asarray(image_grid_thw), per_image=False)
    return np.asarray(_jit_forward()(model, input_ids, attention_mask, pixel_values, image_grid_thw, position_ids,
                                     layout))


@functools.cache
def _jit_forward():
    from flax import nnx

    def forward(model, input_ids, attention_mask, pixel_values, image_grid_thw, position_ids, layout):
        return model(input_ids, attention_mask, pixel_values, image_grid_thw, position_ids, vision_layout=layout)

    return nnx.jit(forward)
