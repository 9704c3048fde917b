"""Layer-level parity with transformers, to localise any end-to-end mismatch."""

from __future__ import annotations

import numpy as np

from ibis_jax.models.qwen2_5_vl.layers import layer_view
import pytest

torch = pytest.importorskip("torch")

from ibis_jax.models.qwen2_5_vl import get_rope_index, vision_layout  # noqa: E402
from ibis_jax.models.qwen2_5_vl.testing import image_sequence, pad_batch  # noqa: E402
from ibis_jax.models.qwen2_5_vl.text import mrope_cos_sin  # noqa: E402

GRIDS = np.array([[1, 8, 12], [1, 6, 4], [1, 20, 26]])


def _boundaries(segments: np.ndarray) -> np.ndarray:
    change = np.flatnonzero(np.diff(segments)) + 1
    return np.concatenate([[0], change, [len(segments)]])


def test_vision_layout_matches_hf(tiny_cfg):
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

    v = tiny_cfg.vision
    for window_size in (56, 112):
        lay = vision_layout(GRIDS, v.__class__(**{**v.__dict__, "window_size": window_size}))
        g = torch.tensor(GRIDS)
        win_idx, cu_win = get_vision_window_index(g, 2, window_size, 14)
        np.testing.assert_array_equal(lay.window_index, win_idx.numpy())
        np.testing.assert_array_equal(_boundaries(lay.window_segments), cu_win.numpy())
        np.testing.assert_array_equal(_boundaries(lay.image_segments), get_vision_cu_seqlens(g).numpy())
        pos = get_vision_position_ids(g, 2).numpy().reshape(-1, 4, 2)[win_idx.numpy()].reshape(-1, 2)
        np.testing.assert_array_equal(lay.rope_hw, pos)
        np.testing.assert_array_equal(lay.window_index[lay.reverse_index], np.arange(len(lay.window_index)))
        for gather, seg in ((lay.window_gather, lay.window_segments), (lay.image_gather, lay.image_segments)):
            real = gather[gather < len(seg)]
            np.testing.assert_array_equal(np.sort(real), np.arange(len(seg)))  # every token once
            for row in gather:
                assert len(set(seg[row[row < len(seg)]])) == 1  # one segment per group


def _vision_inputs(torch_model, flax_model, grids):
    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

    lay = vision_layout(grids, flax_model.config.vision)
    g = torch.tensor(grids)
    win_idx, _ = get_vision_window_index(g, 2, flax_model.config.vision.window_size, 14)
    vis = torch_model.model.visual
    x = torch.randn(int(grids.prod(-1).sum()), flax_model.config.vision.hidden_size, generator=torch.Generator().manual_seed(0))
    cos, sin = vis.rotary_pos_emb(x, get_vision_position_ids(g, 2))
    cos = vis.permute_input_for_window_attn(cos, win_idx, len(x))
    sin = vis.permute_input_for_window_attn(sin, win_idx, len(x))
    return lay, x, cos, sin


def test_vision_rope(torch_model, flax_model):
    lay, x, cos, sin = _vision_inputs(torch_model, flax_model, GRIDS)
    c, s = flax_model.visual.rope(lay.rope_hw)
    np.testing.assert_allclose(np.asarray(c), cos.numpy(), atol=1e-6)
    np.testing.assert_allclose(np.asarray(s), sin.numpy(), atol=1e-6)


@pytest.mark.parametrize("block", [0, 1])  # 0 windowed, 1 full attention
def test_vision_block(torch_model, flax_model, block):
    import jax.numpy as jnp
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_window_index

    grids = GRIDS[:2]
    lay, x, cos, sin = _vision_inputs(torch_model, flax_model, grids)
    g = torch.tensor(grids)
    full = block in flax_model.config.vision.fullatt_block_indexes
    cu = get_vision_cu_seqlens(g) if full else get_vision_window_index(g, 2, 56, 14)[1]
    with torch.no_grad():
        ref = layer_view(torch_model.model.visual.blocks, block)(x, cu_seqlens=cu, position_embeddings=(cos, sin)).numpy()
    gather = lay.image_gather if full else lay.window_gather
    out = layer_view(flax_model.visual.blocks, block)(jnp.asarray(x.numpy()), cos.numpy(), sin.numpy(), gather)
    assert np.abs(np.asarray(out) - ref).max() < 1e-5


def test_patch_merger(torch_model, flax_model):
    x = torch.randn(64, flax_model.config.vision.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = torch_model.model.visual.merger(x).numpy()
    out = np.asarray(flax_model.visual.merger(x.numpy()))
    assert out.shape == (16, flax_model.config.text.hidden_size)
    assert np.abs(out - ref).max() < 1e-5


def test_vision_tower(torch_model, flax_model, tiny_cfg):
    rng = np.random.default_rng(0)
    pv = rng.standard_normal((int(GRIDS.prod(-1).sum()), tiny_cfg.vision.patch_dim)).astype(np.float32)
    with torch.no_grad():
        ref = torch_model.model.visual(torch.tensor(pv), grid_thw=torch.tensor(GRIDS))
    lay = vision_layout(GRIDS, tiny_cfg.vision)
    pre = np.asarray(flax_model.visual.encode(pv, lay))
    assert np.abs(pre - ref.last_hidden_state.numpy()).max() < 1e-4
    out = np.asarray(flax_model.image_features(pv, lay)[0])
    assert np.abs(out - ref.pooler_output.numpy()).max() < 1e-4


def test_mrope_cos_sin(torch_model, tiny_cfg):
    rng = np.random.default_rng(2)
    pos = rng.integers(0, 5000, (3, 2, 9))
    x = torch.zeros(1, dtype=torch.float32)
    cos, sin = torch_model.model.language_model.rotary_emb(x, torch.tensor(pos))
    c, s = mrope_cos_sin(pos, tiny_cfg.text, np.float32)
    np.testing.assert_allclose(np.asarray(c), cos.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(s), sin.numpy(), atol=1e-5)


def test_decoder_layer(torch_model, flax_model, tiny_cfg):
    import jax.numpy as jnp

    rng = np.random.default_rng(3)
    b, s, d = 2, 7, tiny_cfg.text.hidden_size
    x = rng.standard_normal((b, s, d)).astype(np.float32)
    pos = np.broadcast_to(np.arange(s), (3, b, s)).copy()
    pos[1:, :, 2:5] += 3  # some non-text (3D) positions
    lm = torch_model.model.language_model
    cos, sin = lm.rotary_emb(torch.tensor(x), torch.tensor(pos))
    causal = np.tril(np.ones((s, s), bool))
    mask4 = torch.tensor(np.where(causal, 0.0, np.finfo(np.float32).min)[None, None].repeat(b, 0), dtype=torch.float32)
    with torch.no_grad():
        ref = lm.layers[1](torch.tensor(x), attention_mask=mask4, position_embeddings=(cos, sin)).numpy()
    c, sn = mrope_cos_sin(pos, tiny_cfg.text, jnp.float32)
    segments = jnp.ones((b, s), jnp.int32)  # the full forward's mask: causal within segment ids
    out, _ = layer_view(flax_model.language_model.layers, 1)(jnp.asarray(x), c, sn, segments)
    assert np.abs(np.asarray(out) - ref).max() < 1e-5


@pytest.mark.parametrize("side", ["left", "right", None])
def test_rope_index_matches_hf(torch_model, tiny_cfg, side):
    rng = np.random.default_rng(4)
    grids = np.array([[1, 4, 6], [1, 8, 4], [1, 2, 2], [1, 6, 6]])
    seqs = [image_sequence(tiny_cfg, rng, grids[:1], [2, 3]), image_sequence(tiny_cfg, rng, grids[1:], [4, 1, 0, 5])]
    if side is None:
        seqs = [seqs[1]]
        grids = grids[1:]
    ids, mask = pad_batch(seqs, side or "right")
    mm = torch.tensor((ids == tiny_cfg.image_token_id).astype(np.int64))
    ref_pos, ref_delta = torch_model.model.get_rope_index(
        torch.tensor(ids), mm, torch.tensor(grids), attention_mask=torch.tensor(mask)
    )
    pos, delta = get_rope_index(ids, mask, grids, image_token_id=tiny_cfg.image_token_id)
    np.testing.assert_array_equal(np.asarray(pos), ref_pos.numpy())
    np.testing.assert_array_equal(np.asarray(delta), ref_delta.numpy())


def test_cached_attention_blocks_up_to_the_limit_equal_full_softmax():
    """The length-bounded (blockwise, online softmax) cache attention equals a plain softmax over
    the filled slots, with left padding masked and garbage past the limit ignored."""
    import jax.numpy as jnp

    from ibis_jax.models.qwen2_5_vl.layers import CACHE_BLOCK, MASK_VALUE, cached_attention

    rng = np.random.default_rng(0)
    b, s, kv, g, d, t = 3, 2, 2, 3, 16, 3 * CACHE_BLOCK
    limit = CACHE_BLOCK + 37  # two blocks read, the third skipped
    q = rng.standard_normal((b, s, kv, g, d)).astype(np.float32)
    k = rng.standard_normal((b, kv, t, d)).astype(np.float32)
    v = rng.standard_normal((b, kv, t, d)).astype(np.float32)
    k[:, :, limit:] = 1e4  # never written: masked in the blocks read, and the last block is not read
    v[:, :, limit:] = 1e4
    v[:, :, 2 * CACHE_BLOCK:] = np.nan
    valid = np.zeros((b, s, t), bool)
    valid[:, :, :limit] = True
    valid[1, :, :CACHE_BLOCK + 5] = False  # row 1 left-padded past the whole first block
    valid[2, 0, limit - 1] = False  # causal: the first query does not see the last slot
    bias = np.where(valid, 0.0, MASK_VALUE).astype(np.float32)
    out = np.asarray(cached_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(bias), 0.25,
                                      limit=jnp.int32(limit)))
    logits = np.einsum("bskgd,bktd->bskgt", q, k[:, :, :limit]) * 0.25 + bias[:, :, None, None, :limit]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    ref = np.einsum("bskgt,bktd->bskgd", probs, v[:, :, :limit])
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, ref, atol=2e-5)
