"""Qwen3-VL input processing: Qwen2.5-VL's numpy processor with Qwen3-VL's image settings.

Qwen3-VL uses the Qwen2-VL image processor unchanged except for its settings: 16 px patches
(so sizes are multiples of 32 and an H x W image gives (H/32) x (W/32) visual tokens), mean and
std 0.5, pixel bounds [65536, 16777216] (`preprocessor_config.json` of the releases). The
processor reads them from the model directory; `DEFAULTS` apply where the file has none.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ibis_jax.models.qwen2_5_vl.processor import Qwen25VLProcessor
from ibis_jax.models.qwen2_5_vl.processor import prepare_image as _prepare_image

MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
PATCH_SIZE = 16
MERGE_SIZE = 2

# The released Qwen3-VL preprocessor_config.json (image part; video settings are not used here).
PREPROCESSOR_CONFIG: dict[str, Any] = {
    "image_processor_type": "Qwen2VLImageProcessorFast",
    "processor_class": "Qwen3VLProcessor",
    "do_resize": True,
    "do_rescale": True,
    "do_normalize": True,
    "do_convert_rgb": True,
    "rescale_factor": 1 / 255,
    "image_mean": list(MEAN),
    "image_std": list(STD),
    "resample": 3,
    "patch_size": PATCH_SIZE,
    "temporal_patch_size": 2,
    "merge_size": MERGE_SIZE,
    "size": {"shortest_edge": 65536, "longest_edge": 16777216},
}


class Qwen3VLProcessor(Qwen25VLProcessor):
    """Tokenizer (from a LOCAL directory) + numpy image processor with Qwen3-VL's settings; the
    same calls as `Qwen25VLProcessor` (`apply_chat_template`, `__call__`, `images`)."""

    DEFAULTS: dict[str, Any] = dict(min_pixels=65536, max_pixels=16777216, patch_size=PATCH_SIZE,
                                    image_mean=MEAN, image_std=STD)


def prepare_image(image: np.ndarray, image_size: int) -> np.ndarray:
    """RGB uint8 [H, W, 3] -> [image_size, image_size, 3] (bicubic), image_size a multiple of 32."""
    return _prepare_image(image, image_size, multiple=PATCH_SIZE * MERGE_SIZE)


def image_tokens(image_size: int) -> int:
    """Visual tokens of one prepared square image: (image_size / 32)^2."""
    return (image_size // (PATCH_SIZE * MERGE_SIZE)) ** 2


def write_processor_config(directory: str | os.PathLike) -> str:
    """Turn a tokenizer directory (`qwen2_5_vl.tiny.make_tokenizer_dir`) into a Qwen3-VL processor
    directory: the released image settings (`processor.PREPROCESSOR_CONFIG`) and the video
    processor entry transformers' `AutoProcessor` needs to build a `Qwen3VLProcessor`."""
    import json

    directory = os.fspath(directory)
    with open(os.path.join(directory, "preprocessor_config.json"), "w") as f:
        json.dump(PREPROCESSOR_CONFIG, f, indent=2)
    with open(os.path.join(directory, "video_preprocessor_config.json"), "w") as f:
        json.dump({"video_processor_type": "Qwen3VLVideoProcessor", "processor_class": "Qwen3VLProcessor",
                   "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2}, f, indent=2)
    return directory
