"""Logit parity of the Flax Qwen2.5-VL with transformers on a tiny random model (fp32, < 1e-4)."""

from __future__ import annotations

import numpy as np
import pytest

from ibis_jax.models.qwen2_5_vl import get_rope_index
from ibis_jax.models.qwen2_5_vl.testing import flax_logits, hf_logits, image_sequence, pad_batch

TOL = 1e-4


def _pixels(rng, grids, cfg):
    n = int(sum(np.prod(g) for g in grids))
    return rng.standard_normal((n, cfg.vision.patch_dim)).astype(np.float32)


def test_text_only(flax_model, torch_model):
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 400, (2, 17))
    ref = hf_logits(torch_model, ids)
    out = flax_logits(flax_model, ids)
    assert out.shape == (2, 17, flax_model.config.text.vocab_size)
    assert np.abs(out - ref).max() < TOL


def test_one_image(flax_model, torch_model, tiny_cfg):
    rng = np.random.default_rng(2)
    grids = np.array([[1, 8, 12]])
    ids = image_sequence(tiny_cfg, rng, grids, [6, 9])[None]
    pv = _pixels(rng, grids, tiny_cfg)
    ref = hf_logits(torch_model, ids, np.ones_like(ids), pv, grids)
    out = flax_logits(flax_model, ids, np.ones_like(ids), pv, grids)
    assert np.abs(out - ref).max() < TOL
    # The image changes the logits (the scatter is not a no-op).
    assert np.abs(out - flax_logits(flax_model, ids, np.ones_like(ids), pv * 0.5, grids)).max() > 1e-3


def test_two_images_of_different_sizes_in_one_sequence(flax_model, torch_model, tiny_cfg):
    rng = np.random.default_rng(3)
    grids = np.array([[1, 8, 12], [1, 6, 4]])
    ids = image_sequence(tiny_cfg, rng, grids, [4, 5, 3])[None]
    pv = _pixels(rng, grids, tiny_cfg)
    ref = hf_logits(torch_model, ids, np.ones_like(ids), pv, grids)
    out = flax_logits(flax_model, ids, np.ones_like(ids), pv, grids)
    assert np.abs(out - ref).max() < TOL


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_of_two_with_images(flax_model, torch_model, tiny_cfg, side):
    rng = np.random.default_rng(4)
    grids = np.array([[1, 4, 4], [1, 8, 6], [1, 4, 8]])  # seq 0 has image 0; seq 1 has images 1, 2
    seqs = [image_sequence(tiny_cfg, rng, grids[:1], [3, 2]), image_sequence(tiny_cfg, rng, grids[1:], [5, 4, 6])]
    ids, mask = pad_batch(seqs, side)
    pv = _pixels(rng, grids, tiny_cfg)
    ref = hf_logits(torch_model, ids, mask, pv, grids)
    out = flax_logits(flax_model, ids, mask, pv, grids)
    valid = mask.astype(bool)
    assert np.abs(out - ref)[valid].max() < TOL
    assert np.isfinite(out).all()  # padding rows stay finite
    # Padding does not change a sequence's logits: run the short one alone.
    alone = flax_logits(flax_model, seqs[0][None], None, pv[:16], grids[:1])[0]
    assert np.abs(out[0][valid[0]] - alone).max() < TOL


def test_text_only_left_padding_with_explicit_positions(flax_model, torch_model):
    rng = np.random.default_rng(5)
    ids, mask = pad_batch([rng.integers(0, 400, 6), rng.integers(0, 400, 11)], "left")
    pos, _ = get_rope_index(ids, mask, None, image_token_id=flax_model.config.image_token_id)
    ref = hf_logits(torch_model, ids, mask, position_ids=pos)
    out = flax_logits(flax_model, ids, mask)
    assert np.abs(out - ref)[mask.astype(bool)].max() < TOL


def test_large_image_windowed_and_full_attention(flax_model, torch_model, tiny_cfg):
    """20x26 patches = 10x13 merged tokens: 5x7 windows of 2x2 (ragged at the border) in the
    windowed blocks, one segment in the full-attention blocks."""
    rng = np.random.default_rng(6)
    grids = np.array([[1, 20, 26], [1, 6, 6]])
    ids = image_sequence(tiny_cfg, rng, grids, [2, 3, 2])[None]
    pv = _pixels(rng, grids, tiny_cfg)
    ref = hf_logits(torch_model, ids, np.ones_like(ids), pv, grids)
    out = flax_logits(flax_model, ids, np.ones_like(ids), pv, grids)
    assert np.abs(out - ref).max() < TOL


def test_layout_required_under_jit_and_token_count_checked(flax_model, tiny_cfg):
    import jax

    rng = np.random.default_rng(7)
    grids = np.array([[1, 4, 4]])
    ids = image_sequence(tiny_cfg, rng, grids, [3, 4])[None]
    pv = _pixels(rng, grids, tiny_cfg)
    with pytest.raises(ValueError, match="vision_layout"):
        jax.jit(lambda g: flax_model(ids, None, pv, g))(grids)
    with pytest.raises(ValueError, match="image tokens"):
        flax_model(ids[:, :-3], None, np.concatenate([pv, pv]), np.concatenate([grids, grids]))


@pytest.mark.slow
def test_released_window_size_on_a_504px_image(tiny_cfg, tmp_path):
    """window_size 112 (the released value: 4x4 merged tokens per window) on the SFT image size
    504x504 (36x36 patches, 324 visual tokens: 5x5 windows, ragged) plus a small second image."""
    import dataclasses

    from ibis_jax.models.qwen2_5_vl import load_hf
    from ibis_jax.models.qwen2_5_vl.testing import make_hf_model_dir

    cfg = dataclasses.replace(tiny_cfg, vision=dataclasses.replace(tiny_cfg.vision, window_size=112))
    tm = make_hf_model_dir(tmp_path, cfg, seed=5)
    model = load_hf(tmp_path)
    rng = np.random.default_rng(8)
    grids = np.array([[1, 36, 36], [1, 10, 14]])
    ids = image_sequence(cfg, rng, grids, [3, 2, 4])[None]
    pv = _pixels(rng, grids, cfg)
    ref = hf_logits(tm, ids, np.ones_like(ids), pv, grids)
    out = flax_logits(model, ids, np.ones_like(ids), pv, grids)
    assert np.abs(out - ref).max() < TOL
