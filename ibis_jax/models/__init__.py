"""Flax NNX ports of the policy models (`qwen2_5_vl`, `qwen3_vl`) and the one place that picks a family.

Both families are called the same way (`qwen2_5_vl.vlm.VisionLanguageModel`); what differs is
found here, from a model directory (`config.json`'s `model_type`), a config, a model or a preset
name:

    fam = family("runs/sft/hf")          # or family(model_config), family(model), family("qwen3_vl")
    model = load_hf("runs/sft/hf")       # Qwen25VL or Qwen3VL
    processor = fam.processor("runs/sft/hf")
    cfg = preset_config("qwen3_vl_8b")   # or "tiny_qwen3_vl" with a tokenizer directory
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from typing import Any


@dataclasses.dataclass(frozen=True)
class Family:
    """One policy family: its package, the names of its config, model and processor classes, and
    its presets (`tiny`: the CPU-sized test model; `sizes`: the released models, each a
    constructor of that name on the config class)."""

    name: str  # config.json model_type
    package: str
    config_name: str
    model_name: str
    processor_name: str
    tiny: str
    sizes: tuple[str, ...]

    @property
    def module(self):
        return importlib.import_module(self.package)

    @property
    def config_class(self) -> type:
        return getattr(self.module, self.config_name)

    @property
    def model_class(self) -> type:
        return getattr(self.module, self.model_name)

    @property
    def processor_class(self) -> type:
        return getattr(importlib.import_module(self.package + ".processor"), self.processor_name)

    def write_processor_config(self, directory: str | os.PathLike) -> str:
        """Write the family's image settings (`preprocessor_config.json`) into `directory`."""
        return importlib.import_module(self.package + ".processor").write_processor_config(directory)

    def processor(self, directory: str | os.PathLike, **kwargs: Any):
        """The family's processor (tokenizer + image settings) of a local directory."""
        return self.processor_class(directory, **kwargs)

    def load_hf(self, directory: str | os.PathLike, *args: Any, **kwargs: Any):
        return self.module.load_hf(directory, *args, **kwargs)

    def save_hf(self, model: Any, directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        return self.module.save_hf(model, directory, *args, **kwargs)

    def save_hf_params(self, params: dict, config: Any, directory: str | os.PathLike, **kwargs: Any) -> None:
        """The streamed, multi-host export of a nested parameter dict (the family's `params.save_hf_params`)."""
        return importlib.import_module(self.package + ".params").save_hf_params(params, config, directory, **kwargs)


FAMILIES = {
    "qwen2_5_vl": Family("qwen2_5_vl", "ibis_jax.models.qwen2_5_vl", "Qwen25VLConfig", "Qwen25VL", "Qwen25VLProcessor",
                         tiny="tiny", sizes=("qwen2_5_vl_3b", "qwen2_5_vl_7b")),
    "qwen3_vl": Family("qwen3_vl", "ibis_jax.models.qwen3_vl", "Qwen3VLConfig", "Qwen3VL", "Qwen3VLProcessor",
                       tiny="tiny_qwen3_vl", sizes=("qwen3_vl_2b", "qwen3_vl_4b", "qwen3_vl_8b")),
}

# Preset name -> its family. The tiny presets take their special token ids and vocabulary from a
# tokenizer directory (`preset_config`).
PRESETS: dict[str, Family] = {name: fam for fam in FAMILIES.values() for name in (fam.tiny, *fam.sizes)}


def model_type(directory: str | os.PathLike) -> str:
    """The `model_type` of `directory/config.json` (or of that file), checked against `FAMILIES`."""
    from ibis_jax.fileio import read_json
    from ibis_jax.models.qwen2_5_vl.vlm_config import config_json_path

    path = config_json_path(directory)
    kind = read_json(path, "model config (config.json)").get("model_type")
    if kind not in FAMILIES:
        raise ValueError(f"{path}: model_type {kind!r} is not supported; use one of {', '.join(FAMILIES)}")
    return kind


def family(of: Any) -> Family:
    """The `Family` of a family name, a preset name, a model directory, a model config, a model
    (or their classes)."""
    if isinstance(of, Family):
        return of
    if isinstance(of, str) and of in FAMILIES:
        return FAMILIES[of]
    if isinstance(of, str) and of in PRESETS:
        return PRESETS[of]
    if isinstance(of, (str, os.PathLike)):
        return FAMILIES[model_type(of)]
    module = (of if isinstance(of, type) else type(of)).__module__
    for fam in FAMILIES.values():
        if module == fam.package or module.startswith(fam.package + "."):
            return fam
    raise TypeError(f"{type(of).__name__} is not a config or model of {', '.join(FAMILIES)}")


def preset_config(name: str, tokenizer_dir: str | os.PathLike | None = None, **overrides: Any) -> Any:
    """The model config of a preset (`PRESETS`). The tiny ones take their special token ids and a
    vocabulary that holds every token (at least 512, a multiple of 128) from `tokenizer_dir`."""
    if name not in PRESETS:
        raise ValueError(f"model preset {name!r}: use one of {', '.join(PRESETS)} (or give an HF directory)")
    fam = PRESETS[name]
    if name in fam.sizes:
        return getattr(fam.config_class, name)()
    from ibis_jax.models.qwen2_5_vl.tiny import special_token_ids, tokenizer_size

    if tokenizer_dir is None:
        ids: dict[str, int] = {"image_token_id": 500, "video_token_id": 501, "vision_start_token_id": 497,
                               "vision_end_token_id": 498}
        vocab = 512
    else:
        ids = special_token_ids(tokenizer_dir)
        vocab = max(512, -(-tokenizer_size(tokenizer_dir) // 128) * 128)
    vocab = overrides.pop("vocab_size", vocab)
    ids.update(overrides)
    return fam.config_class.tiny(vocab_size=vocab, **ids)


def model_config_from_hf(directory: str | os.PathLike) -> Any:
    """`Qwen25VLConfig` or `Qwen3VLConfig` of a Hugging Face model directory, by its model_type."""
    return family(directory).config_class.from_hf_config(directory)


def load_hf(directory: str | os.PathLike, *args: Any, **kwargs: Any):
    """`load_hf` of the family named by `directory/config.json` (same arguments: dtype, mesh,
    compute_dtype, sharding, remat, scan_layers, freeze_vision) -> `Qwen25VL` or `Qwen3VL`."""
    return family(directory).load_hf(directory, *args, **kwargs)


def save_hf(model: Any, directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
    """`save_hf` of `model`'s family (by its class)."""
    return family(model).save_hf(model, directory, *args, **kwargs)


def image_multiple(model_config: Any) -> int:
    """The side every square image must be a multiple of: patch size x merge size (28 for
    Qwen2.5-VL, 32 for Qwen3-VL)."""
    v = model_config.vision
    return v.patch_size * v.spatial_merge_size
