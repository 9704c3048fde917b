"""Test fixtures: random Hugging Face Qwen3-VL models in the real format and reference forwards
(transformers vs ours). Never imported by the package itself. The sequence builders and
`hf_logits` (which passes `mm_token_type_ids`, so HF computes 3D positions) are Qwen2.5-VL's.

    cfg = Qwen3VLConfig.tiny(**special_token_ids(tok_dir))
    torch_model = make_hf_model_dir(tmp / "model", cfg, tokenizer_dir=tok_dir)   # torch + transformers
    model = load_hf(tmp / "model")
"""

from __future__ import annotations

import functools
import os
import shutil

import numpy as np

from ibis_jax.models.qwen2_5_vl.testing import hf_logits, image_sequence, pad_batch  # noqa: F401  (re-exported)

from .config import Qwen3VLConfig


def make_hf_model_dir(
    directory: str | os.PathLike,
    config: Qwen3VLConfig,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    seed: int = 0,
    randomize: bool = True,
    dtype: str = "float32",
):
    """Build a random transformers `Qwen3VLForConditionalGeneration` for `config`, save it with
    `save_pretrained` into `directory` (+ tokenizer files) and return the torch model (eval).

    randomize: also draw norm weights / biases at random (HF initialises them to 1 / 0, which
    would hide a swapped or missing one in parity tests), and the position table at a scale
    that matters next to the patch embedding. Needs torch.
    """
    import torch
    from transformers import Qwen3VLConfig as HFConfig
    from transformers import Qwen3VLForConditionalGeneration

    directory = os.fspath(directory)
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(HFConfig(**config.to_hf_dict())).eval()
    if randomize:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                is_norm = "norm" in name and "proj" not in name
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


def flax_logits(
    model, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None, position_ids=None
) -> np.ndarray:
    """Jitted forward of a `Qwen3VL` (vision layout computed on the host) as numpy."""
    from .vision import vision_layout

    layout = None if image_grid_thw is None else vision_layout(np.asarray(image_grid_thw), model.config.vision)
    return np.asarray(_jit_forward()(model, input_ids, attention_mask, pixel_values, image_grid_thw, position_ids,
                                     layout))


@functools.cache
def _jit_forward():
    from flax import nnx

    def forward(model, input_ids, attention_mask, pixel_values, image_grid_thw, position_ids, layout):
        return model(input_ids, attention_mask, pixel_values, image_grid_thw, position_ids, vision_layout=layout)

    return nnx.jit(forward)
