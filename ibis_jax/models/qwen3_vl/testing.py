"""Test fixtures for Qwen3-VL: the family-independent ones of `qwen2_5_vl.testing` (random HF model
dirs of a config's family, the sequence builders, `hf_logits` which passes `mm_token_type_ids` so
HF computes 3D positions, and the jitted `flax_logits`), under this family's name. Never imported
by the package itself.

    cfg = Qwen3VLConfig.tiny(**special_token_ids(tok_dir))
    torch_model = make_hf_model_dir(tmp / "model", cfg, tokenizer_dir=tok_dir)   # torch + transformers
    model = load_hf(tmp / "model")
"""

from __future__ import annotations

from ibis_jax.models.qwen2_5_vl.testing import flax_logits, hf_logits, image_sequence, make_hf_model_dir, pad_batch

__all__ = ["flax_logits", "hf_logits", "image_sequence", "make_hf_model_dir", "pad_batch"]
