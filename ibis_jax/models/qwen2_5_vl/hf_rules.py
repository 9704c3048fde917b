"""The tables that map a Hugging Face Qwen-VL checkpoint onto Flax NNX parameters, for every family.

A family's params module declares one table of `Rule`s (HF key <-> NNX path, with `{i}` for
layer numbers in the HF key, and the tensor transform) and registers it for its config class
(`register`); import (`hf_import`) and export (`hf_export`) both walk that table, so a name can
only be wrong in one place. The decoder layers and vision blocks are stacked in the model (one
parameter `[layers, ...]` per kind, `layers.stacked`); on disk every layer keeps its own HF
tensor, so an `Entry` names the row of the stacked parameter it fills.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Rule:
    """One row of a family's table (`{i}` in `hf` expands to every layer of the `per` kind)."""

    hf: str  # HF key, `{i}` = layer / block number
    nnx: str  # NNX path, dot-separated; per-layer rules name the stacked parameter
    transform: str  # "id" | "T" (Linear [out,in] <-> kernel [in,out]) | "patch" (Conv3d <-> matmul)
    per: str = ""  # "" once, "vision" per vision block, "text" per decoder layer, "deepstack" per DeepStack merger


def linear_rules(hf: str, nx: str) -> list[tuple[str, str, str]]:
    """(HF key, NNX path, transform) of a Linear with a bias: weight [out, in] -> kernel [in, out]."""
    return [(f"{hf}.weight", f"{nx}.kernel", "T"), (f"{hf}.bias", f"{nx}.bias", "id")]


def layer_norm_rules(hf: str, nx: str) -> list[tuple[str, str, str]]:
    """(HF key, NNX path, transform) of a LayerNorm: weight -> scale, bias."""
    return [(f"{hf}.weight", f"{nx}.scale", "id"), (f"{hf}.bias", f"{nx}.bias", "id")]


# Where the two halves of a Qwen-VL checkpoint live (transformers >= 4.52 names).
VISION_PREFIX = "model.visual."
TEXT_PREFIX = "model.language_model."
_V, _T = VISION_PREFIX, TEXT_PREFIX


def decoder_rules(text_config_class: type) -> list[Rule]:
    """The rules of the shared decoder (`text.TextModel`, HF `model.language_model` + `lm_head`):
    the embedding, every layer's tensors, the final norm and the head, with q/k/v biases or q/k
    norms as the family's text config switches them (`qkv_bias`, `qk_norm`)."""
    layer = [
        ("input_layernorm.weight", "input_layernorm.weight", "id"),
        ("post_attention_layernorm.weight", "post_attention_layernorm.weight", "id"),
        *[(f"self_attn.{p}.weight", f"self_attn.{p}.kernel", "T") for p in ("q_proj", "k_proj", "v_proj", "o_proj")],
    ]
    if text_config_class.qkv_bias:
        layer += [(f"self_attn.{p}.bias", f"self_attn.{p}.bias", "id") for p in ("q_proj", "k_proj", "v_proj")]
    if text_config_class.qk_norm:
        layer += [(f"self_attn.{n}.weight", f"self_attn.{n}.weight", "id") for n in ("q_norm", "k_norm")]
    layer += [(f"mlp.{p}.weight", f"mlp.{p}.kernel", "T") for p in ("gate_proj", "up_proj", "down_proj")]
    return [
        Rule(_T + "embed_tokens.weight", "language_model.embed_tokens.embedding", "id"),
        *[Rule(_T + f"layers.{{i}}.{hf}", f"language_model.layers.{nx}", tr, "text") for hf, nx, tr in layer],
        Rule(_T + "norm.weight", "language_model.norm.weight", "id"),
        Rule("lm_head.weight", "lm_head", "T"),
    ]


@dataclasses.dataclass(frozen=True)
class Entry:
    """One HF tensor: its key, the NNX path of the parameter holding it, the transform, and the
    row of that (stacked) parameter it fills (None: the whole parameter)."""

    hf: str
    path: tuple[str, ...]
    transform: str
    layer: int | None = None


@dataclasses.dataclass(frozen=True)
class Layout:
    """A family's checkpoint layout: its table, and whether `save_hf` writes the legacy key names
    by default (`legacy_hf_key`: what transformers' `save_pretrained` writes for that family)."""

    rules: tuple[Rule, ...]
    legacy_keys: bool


# The layout of each model family, by its config class (each family's params module registers its
# own), so one import/export serves every family that shares these tensor kinds.
LAYOUTS: dict[type, Layout] = {}


def register(config_class: type, rules: tuple[Rule, ...], *, legacy_keys: bool) -> None:
    """Make `rules` the table of every config of `config_class` (a family's params module does this)."""
    LAYOUTS[config_class] = Layout(tuple(rules), legacy_keys)


def layout_of(config) -> Layout:
    try:
        return LAYOUTS[type(config)]
    except KeyError:
        raise TypeError(f"no HF parameter table for {type(config).__name__}: import its family's params module") from None


def expand_rules(config) -> list[Entry]:
    """Every HF tensor of `config`, in table order (a stacked parameter's layers in a row)."""
    out = []
    for r in layout_of(config).rules:
        if r.hf == "lm_head.weight" and config.tie_word_embeddings:
            continue
        path = tuple(r.nnx.split("."))
        if not r.per:
            out.append(Entry(r.hf, path, r.transform))
            continue
        n = {"vision": config.vision.depth, "text": config.text.num_hidden_layers,
             "deepstack": len(getattr(config.vision, "deepstack_visual_indexes", ()))}[r.per]
        out.extend(Entry(r.hf.format(i=i), path, r.transform, i) for i in range(n))
    return out


def hf_to_nnx(x: np.ndarray, transform: str) -> np.ndarray:
    if transform == "id":
        return x
    if transform == "T":
        return x.T
    if transform == "patch":  # Conv3d weight [E, C, T, P, P] with stride = kernel == matmul
        return x.reshape(x.shape[0], -1).T
    raise ValueError(f"unknown transform {transform!r}")


def nnx_to_hf(x: np.ndarray, transform: str, config) -> np.ndarray:
    if transform == "id":
        return x
    if transform == "T":
        return x.T
    if transform == "patch":
        v = config.vision
        return x.T.reshape(v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    raise ValueError(f"unknown transform {transform!r}")


def hf_index(transform: str, index: tuple) -> tuple:
    """The HF-layout index of the region `index` of a tensor in NNX layout ("id" / "T" only)."""
    if transform == "id":
        return index
    if transform == "T":
        return tuple(reversed(index))
    raise ValueError(f"transform {transform!r} reads whole tensors")


def canonical_hf_key(key: str) -> str:
    """Map the pre-transformers-4.52 layout (`model.layers...`, `visual...`) to the current one
    (`model.language_model.layers...`, `model.visual...`)."""
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model.") and not key.startswith((_V, _T)):
        return _T + key[len("model."):]
    return key


def legacy_hf_key(key: str) -> str:
    """The inverse of `canonical_hf_key`: the layout `save_pretrained` writes (transformers 5.x
    converts back to the original Qwen release names on save) and every version reads."""
    if key.startswith(_V):
        return key[len("model."):]
    if key.startswith(_T):
        return "model." + key[len(_T):]
    return key


def param_at(tree: dict, path: tuple) -> Any:
    """The leaf at `path` of a nested parameter dict."""
    for p in path:
        tree = tree[p]
    return tree


def leaf_shape(entry: Entry, leaf: Any) -> tuple[int, ...]:
    """The NNX-layout shape of one HF tensor (a row of a stacked parameter)."""
    return tuple(leaf.shape[1:]) if entry.layer is not None else tuple(leaf.shape)
