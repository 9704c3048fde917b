"""HF <-> Flax weights: load_hf / save_hf round trips, sharding of files, clear errors."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

from ibis_jax.models.qwen2_5_vl.layers import layer_view
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from ibis_jax.models.qwen2_5_vl import Qwen25VL, load_hf, save_hf
from ibis_jax.models.qwen2_5_vl.params import canonical_hf_key, expand_rules
from ibis_jax.models.qwen2_5_vl.testing import flax_logits, hf_logits, image_sequence

torch = pytest.importorskip("torch")


def _read_all(directory):
    out = {}
    index = os.path.join(directory, "model.safetensors.index.json")
    files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index) else ["model.safetensors"]
    for name in files:
        with safe_open(os.path.join(directory, name), framework="np") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
    return out


def test_rules_cover_every_hf_parameter(torch_model, tiny_cfg):
    hf_keys = {canonical_hf_key(k) for k in torch_model.state_dict()}
    ours = {e.hf for e in expand_rules(tiny_cfg)}
    assert ours == hf_keys


def test_hf_to_flax_to_hf_is_byte_identical(hf_dir_and_model, flax_model, tmp_path):
    src, _ = hf_dir_and_model
    save_hf(flax_model, tmp_path / "out", source_dir=src)
    a, b = _read_all(src), _read_all(tmp_path / "out")
    assert set(a) == set(b)  # same names as transformers' save_pretrained writes
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k
    assert os.path.exists(tmp_path / "out" / "tokenizer.json")
    assert os.path.exists(tmp_path / "out" / "preprocessor_config.json")


def test_flax_to_hf_sharded_loads_in_transformers_with_same_logits(tiny_cfg, tok_dir, tmp_path):
    from flax import nnx
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen25VL(tiny_cfg, rngs=nnx.Rngs(3))
    out = tmp_path / "exported"
    save_hf(model, out, source_dir=tok_dir, max_shard_size="200KB")
    index = json.load(open(out / "model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) > 1
    tm = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(out), local_files_only=True).eval()
    rng = np.random.default_rng(0)
    grids = np.array([[1, 6, 8]])
    ids = image_sequence(tiny_cfg, rng, grids, [4, 5])[None]
    pv = rng.standard_normal((48, tiny_cfg.vision.patch_dim)).astype(np.float32)
    ref = hf_logits(tm, ids, np.ones_like(ids), pv, grids)
    ours = flax_logits(model, ids, np.ones_like(ids), pv, grids)
    assert np.abs(ours - ref).max() < 1e-4
    # ... and the sharded directory loads back into Flax unchanged.
    again = load_hf(out)
    assert np.abs(flax_logits(again, ids, np.ones_like(ids), pv, grids) - ours).max() == 0


def test_missing_and_unexpected_keys_are_named(hf_dir_and_model, tmp_path):
    src, _ = hf_dir_and_model
    d = tmp_path / "broken"
    shutil.copytree(src, d)
    tensors = _read_all(src)
    tensors.pop("model.norm.weight")
    tensors["model.extra.weight"] = np.zeros(3, np.float32)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError) as e:
        load_hf(d)
    msg = str(e.value)
    assert "model.language_model.norm.weight" in msg and "model.language_model.extra.weight" in msg
    assert "model.safetensors" in msg


def test_current_key_layout_and_bf16(flax_model, hf_dir_and_model, tmp_path):
    import jax.numpy as jnp

    save_hf(flax_model, tmp_path / "new", legacy_keys=False, dtype=jnp.bfloat16)
    keys = set(_read_all(tmp_path / "new"))
    assert "model.language_model.norm.weight" in keys and "model.visual.merger.ln_q.weight" in keys
    m16 = load_hf(tmp_path / "new", dtype=jnp.bfloat16)
    w = layer_view(m16.language_model.layers, 0).self_attn.q_proj.kernel[...]
    assert w.dtype == jnp.bfloat16
    ref = np.asarray(layer_view(flax_model.language_model.layers, 0).self_attn.q_proj.kernel[...])
    assert np.array_equal(np.asarray(w), ref.astype(jnp.bfloat16))
    ids = np.arange(12)[None]
    lo = flax_logits(m16, ids)
    hi = flax_logits(flax_model, ids)
    assert lo.dtype == np.float32
    assert np.abs(lo - hi).max() < 0.05 * np.abs(hi).max()


def test_tied_embeddings_parity_and_export(tiny_cfg, tmp_path):
    import dataclasses

    from transformers import Qwen2_5_VLForConditionalGeneration

    from ibis_jax.models.qwen2_5_vl.testing import make_hf_model_dir

    cfg = dataclasses.replace(tiny_cfg, tie_word_embeddings=True)
    tm = make_hf_model_dir(tmp_path / "tied", cfg, seed=1)
    model = load_hf(tmp_path / "tied")
    assert not hasattr(model, "lm_head")
    ids = np.arange(3, 40, 3)[None]
    assert np.abs(flax_logits(model, ids) - hf_logits(tm, ids)).max() < 1e-4
    save_hf(model, tmp_path / "tied_out")
    assert "lm_head.weight" not in _read_all(tmp_path / "tied_out")
    tm2 = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tmp_path / "tied_out")).eval()
    assert np.abs(hf_logits(tm2, ids) - hf_logits(tm, ids)).max() < 1e-6
