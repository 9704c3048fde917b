"""Qwen3-VL: logit parity with transformers (fp32, < 1e-4) on a tiny random model with DeepStack,
images of several sizes and padding; scan vs unrolled layers; HF import/export byte-identical;
the family dispatch of `ibis_jax.models`."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ibis_jax.models.qwen3_vl import Qwen3VL, Qwen3VLConfig, get_rope_index, load_hf, save_hf  # noqa: E402
from ibis_jax.models.qwen3_vl.params import expand_rules  # noqa: E402
from ibis_jax.models.qwen3_vl.testing import (  # noqa: E402
    flax_logits, hf_logits, image_sequence, make_hf_model_dir, pad_batch,
)

TOL = 1e-4


def _pixels(rng, grids, cfg):
    n = int(sum(np.prod(g) for g in grids))
    return rng.standard_normal((n, cfg.vision.patch_dim)).astype(np.float32)


def _read_all(directory):
    from safetensors import safe_open

    out = {}
    index = os.path.join(directory, "model.safetensors.index.json")
    files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index) else ["model.safetensors"]
    for name in files:
        with safe_open(os.path.join(directory, name), framework="np") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
    return out


def test_config_round_trip_and_presets(q3_cfg, q3_hf):
    assert Qwen3VLConfig.from_hf_config(q3_hf[0]) == q3_cfg
    assert Qwen3VLConfig.from_hf_config(q3_cfg.to_hf_dict()) == q3_cfg
    for preset in (Qwen3VLConfig.qwen3_vl_2b(), Qwen3VLConfig.qwen3_vl_4b(), Qwen3VLConfig.qwen3_vl_8b()):
        assert preset.text.head_dim == 128 and preset.vision.patch_size == 16
        assert Qwen3VLConfig.from_hf_config(preset.to_hf_dict()) == preset
    with pytest.raises(ValueError, match="qwen3_vl"):
        Qwen3VLConfig.from_hf_config({"model_type": "qwen2_5_vl"})


def test_rules_cover_every_hf_parameter(q3_hf, q3_cfg):
    assert {e.hf for e in expand_rules(q3_cfg)} == set(q3_hf[1].state_dict())


def test_text_only(q3_model, q3_hf):
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 400, (2, 17))
    out = flax_logits(q3_model, ids)
    assert out.shape == (2, 17, q3_model.config.text.vocab_size)
    assert np.abs(out - hf_logits(q3_hf[1], ids)).max() < TOL


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_with_images_of_different_sizes(q3_model, q3_hf, q3_cfg, side):
    """Row 0: one 4x4-patch image; row 1: a 20x26 (the 8x8 position table upsampled, ragged) and
    an 8x6 image. DeepStack taps after vision blocks 0 and 2 feed decoder layers 0 and 1."""
    rng = np.random.default_rng(4)
    grids = np.array([[1, 4, 4], [1, 20, 26], [1, 8, 6]])
    seqs = [image_sequence(q3_cfg, rng, grids[:1], [3, 2]), image_sequence(q3_cfg, rng, grids[1:], [5, 4, 6])]
    ids, mask = pad_batch(seqs, side)
    pv = _pixels(rng, grids, q3_cfg)
    ref = hf_logits(q3_hf[1], ids, mask, pv, grids)
    out = flax_logits(q3_model, ids, mask, pv, grids)
    valid = mask.astype(bool)
    assert np.abs(out - ref)[valid].max() < TOL
    assert np.isfinite(out).all()
    # Padding does not change a sequence's logits: the short one alone.
    alone = flax_logits(q3_model, seqs[0][None], None, pv[:16], grids[:1])[0]
    assert np.abs(out[0][valid[0]] - alone).max() < TOL


def test_deepstack_changes_the_image_tokens(q3_model, q3_cfg):
    """The DeepStack features are non-zero exactly at the image tokens and move the logits."""
    rng = np.random.default_rng(5)
    grids = np.array([[1, 6, 8]])
    ids = image_sequence(q3_cfg, rng, grids, [4, 5])[None]
    pv = _pixels(rng, grids, q3_cfg)
    emb, deep = q3_model.embed(ids, pv, grids)
    assert deep.shape == (2, *emb.shape)
    is_img = ids == q3_cfg.image_token_id
    deep = np.asarray(deep)
    assert np.all(deep[:, ~is_img] == 0) and np.abs(deep[:, is_img]).max(-1).min() > 0
    pos = q3_model.position_ids(ids, None, grids)
    with_ds, _ = q3_model.language_model(emb, pos, None, deepstack=deep)
    without, _ = q3_model.language_model(emb, pos, None)
    assert np.abs(np.asarray(with_ds - without)).max() > 1e-2


def test_unrolled_layers_equal_scanned(q3_hf, q3_model, q3_cfg):
    rng = np.random.default_rng(6)
    grids = np.array([[1, 8, 12], [1, 4, 6]])
    ids, mask = pad_batch([image_sequence(q3_cfg, rng, grids, [4, 5, 3]), rng.integers(0, 400, 9)], "left")
    pv = _pixels(rng, grids, q3_cfg)
    unrolled = load_hf(q3_hf[0], scan_layers=False, remat="full")
    a = flax_logits(q3_model, ids, mask, pv, grids)
    b = flax_logits(unrolled, ids, mask, pv, grids)
    assert np.abs(a - b)[mask.astype(bool)].max() < 1e-5


def test_get_rope_index_matches_transformers(q3_hf, q3_cfg):
    rng = np.random.default_rng(7)
    grids = np.array([[1, 4, 4], [1, 8, 6], [1, 6, 10]])
    seqs = [image_sequence(q3_cfg, rng, grids[:1], [3, 2]), image_sequence(q3_cfg, rng, grids[1:], [5, 4, 6])]
    ids, mask = pad_batch(seqs, "left")
    ref_pos, ref_delta = q3_hf[1].model.get_rope_index(
        torch.tensor(ids), mm_token_type_ids=torch.tensor((ids == q3_cfg.image_token_id).astype(np.int64)),
        image_grid_thw=torch.tensor(grids), attention_mask=torch.tensor(mask))
    pos, delta = get_rope_index(ids, mask, grids, image_token_id=q3_cfg.image_token_id)
    valid = mask.astype(bool)
    assert np.array_equal(np.asarray(pos)[:, valid], ref_pos.numpy()[:, valid])
    assert np.array_equal(np.asarray(delta), ref_delta.numpy())


def test_hf_to_flax_to_hf_is_byte_identical(q3_hf, q3_model, tmp_path):
    src, _ = q3_hf
    save_hf(q3_model, tmp_path / "out", source_dir=src)
    a, b = _read_all(src), _read_all(tmp_path / "out")
    assert set(a) == set(b)  # the names transformers' save_pretrained writes
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k
    assert os.path.exists(tmp_path / "out" / "tokenizer.json")
    assert Qwen3VLConfig.from_hf_config(tmp_path / "out") == q3_model.config


def test_flax_export_sharded_tied_loads_in_transformers(q3_cfg, tok_dir, tmp_path):
    """A random Flax model with tied embeddings (as the 2B / 4B), exported in shards, gives the
    same logits in transformers, and loads back into Flax unchanged."""
    from flax import nnx
    from transformers import Qwen3VLForConditionalGeneration

    cfg = dataclasses.replace(q3_cfg, tie_word_embeddings=True)
    model = Qwen3VL(cfg, rngs=nnx.Rngs(3))
    assert not hasattr(model, "lm_head")
    out = tmp_path / "exported"
    save_hf(model, out, source_dir=tok_dir, max_shard_size="300KB")
    index = json.load(open(out / "model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) > 1 and "lm_head.weight" not in index["weight_map"]
    tm = Qwen3VLForConditionalGeneration.from_pretrained(str(out), local_files_only=True).eval()
    rng = np.random.default_rng(0)
    grids = np.array([[1, 6, 8]])
    ids = image_sequence(cfg, rng, grids, [4, 5])[None]
    pv = _pixels(rng, grids, cfg)
    ours = flax_logits(model, ids, np.ones_like(ids), pv, grids)
    assert np.abs(ours - hf_logits(tm, ids, np.ones_like(ids), pv, grids)).max() < TOL
    assert np.abs(flax_logits(load_hf(out), ids, np.ones_like(ids), pv, grids) - ours).max() == 0


def test_trainable_filter_keeps_the_projectors(q3_model):
    from flax import nnx

    from ibis_jax.models.qwen3_vl import trainable_filter

    paths = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(q3_model, trainable_filter(True)))}
    assert any(p.startswith("visual.merger.") for p in paths)
    assert any(p.startswith("visual.deepstack_merger_list.") for p in paths)
    assert not any(p.startswith(("visual.blocks.", "visual.patch_embed", "visual.pos_embed")) for p in paths)


def test_family_dispatch(q3_hf, hf_dir_and_model, tmp_path):
    from ibis_jax import models
    from ibis_jax.models.qwen2_5_vl import Qwen25VL, Qwen25VLConfig

    assert isinstance(models.load_hf(q3_hf[0]), Qwen3VL)
    assert isinstance(models.model_config_from_hf(q3_hf[0]), Qwen3VLConfig)
    assert isinstance(models.load_hf(hf_dir_and_model[0]), Qwen25VL)
    assert isinstance(models.model_config_from_hf(hf_dir_and_model[0]), Qwen25VLConfig)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(ValueError, match="model_type 'llava'"):
        models.load_hf(tmp_path)


def test_processor_matches_transformers_qwen3vl_processor(tok_dir, tmp_path):
    """Multi-turn, two images (sizes multiples of 32 above the 65536-pixel minimum, so no resize):
    ids, masks, grids and pixel values equal transformers' Qwen3VLProcessor on the same directory."""
    import shutil

    from transformers import AutoProcessor

    from ibis_jax.models.qwen3_vl.processor import Qwen3VLProcessor, image_tokens, prepare_image
    from ibis_jax.models.qwen3_vl.processor import write_processor_config

    d = tmp_path / "proc"
    shutil.copytree(tok_dir, d)
    write_processor_config(d)
    rng = np.random.default_rng(2)
    im1 = rng.integers(0, 256, (256, 288, 3), dtype=np.uint8)
    im2 = rng.integers(0, 256, (320, 256, 3), dtype=np.uint8)
    msgs = [
        {"role": "user", "content": [{"type": "image", "image": im1}, {"type": "text", "text": "Segment the liver."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "<action>\nTerminate\n</action>"}]},
        {"role": "user", "content": [{"type": "image", "image": im2}, {"type": "text", "text": "Is the mask right?"}]},
    ]
    ref = AutoProcessor.from_pretrained(str(d), local_files_only=True).apply_chat_template(
        msgs, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="np")
    proc = Qwen3VLProcessor(d)
    ours = proc.apply_chat_template(msgs, add_generation_prompt=True)
    for k in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw"):
        np.testing.assert_array_equal(ours[k], ref[k], err_msg=k)
    assert ours["pixel_values"].shape == (608, 1536) and np.abs(ours["pixel_values"] - ref["pixel_values"]).max() < 1e-5
    assert ours["image_grid_thw"].tolist() == [[1, 16, 18], [1, 20, 16]]
    n_img = int((ours["input_ids"] == proc.image_token_id).sum())
    assert n_img == (256 // 32) * (288 // 32) + (320 // 32) * (256 // 32)
    assert image_tokens(448) == 196 and prepare_image(im1, 448).shape == (448, 448, 3)
    with pytest.raises(ValueError, match="multiple of 32"):
        prepare_image(im1, 448 + 28)


def test_freeze_vision_gradients_reach_the_deepstack_mergers(q3_hf, q3_cfg):
    """Scanned, rematerialised backward: with freeze_vision the ViT gets no gradient, the merger
    and the DeepStack mergers (fed through decoder layers 0 and 1) do."""
    import jax.numpy as jnp
    from flax import nnx

    from ibis_jax.models.qwen3_vl import vision_layout

    model = load_hf(q3_hf[0], freeze_vision=True, remat="full")
    rng = np.random.default_rng(8)
    grids = np.array([[1, 6, 8]])
    ids = image_sequence(q3_cfg, rng, grids, [4, 5])[None]
    pv = _pixels(rng, grids, q3_cfg)
    layout = vision_layout(grids, q3_cfg.vision)
    grads = nnx.grad(lambda m: m(ids, None, pv, grids, vision_layout=layout).mean())(model)
    size = {".".join(map(str, p)): float(jnp.abs(v[...]).max()) for p, v in nnx.to_flat_state(nnx.state(grads))}
    assert size["visual.blocks.mlp.linear_fc1.kernel"] == 0 and size["visual.pos_embed.embedding"] == 0
    assert size["visual.deepstack_merger_list.linear_fc1.kernel"] > 0 and size["visual.merger.linear_fc1.kernel"] > 0
    assert size["language_model.layers.self_attn.q_norm.weight"] > 0
