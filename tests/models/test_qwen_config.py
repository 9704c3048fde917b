"""Config parsing (flat pre-v5 and nested v5 config.json) and loading onto a mesh."""

from __future__ import annotations

import dataclasses

import numpy as np

from ibis_jax.models.qwen2_5_vl.layers import layer_view
import pytest

from ibis_jax.models.qwen2_5_vl import Qwen25VLConfig

# The layout of the released Qwen2.5-VL-7B-Instruct config.json (transformers 4.4x era, flat).
RELEASED_7B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "max_position_embeddings": 128000,
    "max_window_layers": 28,
    "model_type": "qwen2_5_vl",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {
        "depth": 32,
        "hidden_act": "silu",
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_chans": 3,
        "out_hidden_size": 3584,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
        "temporal_patch_size": 2,
    },
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 152064,
}


def test_released_flat_config_equals_7b_preset():
    assert Qwen25VLConfig.from_hf_config(RELEASED_7B) == Qwen25VLConfig.qwen2_5_vl_7b()


def test_hf_dict_roundtrip_through_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    for cfg in (Qwen25VLConfig.qwen2_5_vl_3b(), Qwen25VLConfig.tiny()):
        assert Qwen25VLConfig.from_hf_config(cfg.to_hf_dict()) == cfg
        hf = transformers.Qwen2_5_VLConfig(**cfg.to_hf_dict())
        hf.save_pretrained(tmp_path)
        assert Qwen25VLConfig.from_hf_config(tmp_path) == cfg
        assert hf.text_config.rope_parameters["mrope_section"] == list(cfg.text.mrope_section)
        assert hf.vision_config.fullatt_block_indexes == list(cfg.vision.fullatt_block_indexes)


def test_bad_configs_say_what_is_wrong():
    bad = dict(RELEASED_7B, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 20]})
    with pytest.raises(ValueError, match="mrope_section"):
        Qwen25VLConfig.from_hf_config(bad)
    with pytest.raises(ValueError, match="model_type"):
        Qwen25VLConfig.from_hf_config(dict(RELEASED_7B, model_type="qwen2_vl"))
    cfg = Qwen25VLConfig.tiny()
    with pytest.raises(ValueError, match="out_hidden_size"):
        dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, out_hidden_size=7))


def test_load_onto_a_mesh(hf_dir_and_model, flax_model):
    import jax
    from jax.sharding import Mesh, NamedSharding

    from ibis_jax.models.qwen2_5_vl import load_hf

    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    model = load_hf(hf_dir_and_model[0], mesh=mesh)
    stacked = model.language_model.layers.mlp.gate_proj.kernel[...]  # [layers, d, f]
    assert isinstance(stacked.sharding, NamedSharding)
    assert stacked.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    k = layer_view(model.language_model.layers, 0).mlp.gate_proj.kernel[...]
    ref = layer_view(flax_model.language_model.layers, 0).mlp.gate_proj.kernel[...]
    np.testing.assert_array_equal(np.asarray(k), np.asarray(ref))
    # The forward runs under the mesh with activation sharding constraints.
    from flax import nnx

    ids = np.arange(2, 26).reshape(2, 12)
    with jax.set_mesh(mesh):
        out = nnx.jit(lambda m, x: m(x))(model, ids)
    np.testing.assert_allclose(np.asarray(out), np.asarray(nnx.jit(lambda m, x: m(x))(flax_model, ids)), atol=1e-5)
