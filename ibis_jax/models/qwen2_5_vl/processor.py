"""Qwen2-VL / Qwen2.5-VL input processing in numpy (no torch at run time).

- `smart_resize`, `preprocess_images`: the image processor (resize to multiples of 28 within
  [min_pixels, max_pixels], rescale, CLIP normalisation, 14 px patches duplicated over the
  temporal patch of 2, laid out in 2x2 merge blocks) -> `pixel_values` [patches, 1176] and
  `image_grid_thw` [images, 3], as transformers' `Qwen2VLImageProcessor` produces.
- `Qwen25VLProcessor`: a local tokenizer directory + the chat template; expands every
  `<|image_pad|>` to one token per merged patch and returns numpy model inputs.
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import numpy as np

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_PAD = "<|image_pad|>"


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280
) -> tuple[int, int]:
    """Target (height, width): multiples of `factor`, area within [min_pixels, max_pixels], aspect
    ratio kept as closely as possible (Qwen2-VL's rule)."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image {height}x{width}: aspect ratio must be below 200")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _to_rgb_uint8(image: Any) -> np.ndarray:
    """PIL image or array [H, W], [H, W, 1|3|4] -> uint8 [H, W, 3]."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"image array must be uint8 [H, W, 3], got dtype {arr.dtype}: scale to 0..255 first")
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, -1)
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image array must be [H, W] or [H, W, 1|3|4], got {arr.shape}")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, -1)
    return arr[..., :3]


def patchify(
    image: np.ndarray, patch_size: int = 14, merge_size: int = 2, temporal_patch_size: int = 2
) -> np.ndarray:
    """image [C, H, W] float32 -> patches [(H/P)*(W/P), C*T*P*P], rows ordered by 2x2 merge block
    (block row, block col, row in block, col in block), each row (C, T, P, P) with the frame
    repeated T times."""
    c, h, w = image.shape
    gh, gw = h // patch_size, w // patch_size
    x = image.reshape(c, gh // merge_size, merge_size, patch_size, gw // merge_size, merge_size, patch_size)
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # (bh, bw, mh, mw, C, P, P)
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], temporal_patch_size, *x.shape[5:]))
    return np.ascontiguousarray(x).reshape(gh * gw, c * temporal_patch_size * patch_size * patch_size)


def preprocess_images(
    images: Sequence[Any],
    *,
    min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 1280,
    patch_size: int = 14,
    temporal_patch_size: int = 2,
    merge_size: int = 2,
    image_mean: Sequence[float] = CLIP_MEAN,
    image_std: Sequence[float] = CLIP_STD,
) -> tuple[np.ndarray, np.ndarray]:
    """Images (PIL or uint8 [H, W, 3]) -> pixel_values [sum patches, 3*T*P*P] float32 and
    image_grid_thw [images, 3] int64. Resizing uses PIL bicubic (transformers' PIL backend;
    its torchvision backend differs by interpolation rounding only when a resize happens)."""
    from PIL import Image

    all_patches, grids = [], []
    mean = np.asarray(image_mean, np.float32)[:, None, None]
    std = np.asarray(image_std, np.float32)[:, None, None]
    for image in images:
        rgb = _to_rgb_uint8(image)
        h, w = rgb.shape[:2]
        rh, rw = smart_resize(h, w, patch_size * merge_size, min_pixels, max_pixels)
        if (rh, rw) != (h, w):
            rgb = np.asarray(Image.fromarray(rgb).resize((rw, rh), resample=Image.Resampling.BICUBIC))
        x = rgb.transpose(2, 0, 1).astype(np.float32) * np.float32(1 / 255)
        x = (x - mean) / std
        all_patches.append(patchify(x, patch_size, merge_size, temporal_patch_size))
        grids.append([1, rh // patch_size, rw // patch_size])
    return np.concatenate(all_patches).astype(np.float32), np.asarray(grids, np.int64)


def preprocess_prepared(images: Sequence[np.ndarray], **image_kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
    """`preprocess_images` of images already made square by `prepare_image` (the agent's encoder):
    normalised and patched at their own size, never resized by the pixel bounds (Qwen3-VL's
    released minimum of 65,536 pixels would otherwise enlarge a 128 px image and break its token
    count). image_kwargs: a processor's `image_kwargs` (its bounds are ignored)."""
    return preprocess_images(images, **{**image_kwargs, "min_pixels": 1, "max_pixels": 1 << 62})


def prepare_image(image: np.ndarray, image_size: int, multiple: int = 28) -> np.ndarray:
    """RGB uint8 [H, W, 3] -> [image_size, image_size, 3] (bicubic): the one image preparation of
    training and inference. Square, so normalised click coordinates keep their meaning and every
    image has the same patch grid; ``image_size`` is a multiple of 28 (14 px patches, 2x2 merge;
    `multiple` 32 for Qwen3-VL's 16 px patches)."""
    from PIL import Image

    if image_size % multiple:
        raise ValueError(f"image_size {image_size} must be a multiple of {multiple} "
                         f"({multiple // 2} px patches, 2x2 merge)")
    image = np.asarray(image, np.uint8)
    if image.shape[:2] == (image_size, image_size):
        return image
    return np.asarray(Image.fromarray(image).resize((image_size, image_size), Image.BICUBIC))


def image_tokens(image_size: int, patch_size: int = 14, merge_size: int = 2) -> int:
    """Visual tokens of one prepared image: (image_size / 28)^2 (Qwen3-VL's 16 px patches: / 32)."""
    return (image_size // (patch_size * merge_size)) ** 2


def check_image_tokens(input_ids: np.ndarray, image_token_id: int, image_grid_thw: np.ndarray | None,
                       merge_size: int, where: str) -> None:
    """Raise unless the prompts' image tokens are as many as their images' visual tokens. The
    model scatters visual features over the image tokens in order without counting them, so a
    mismatch (an image encoded at another size than its prompt's <|image_pad|> run) would give
    every later image wrong features instead of an error."""
    n_tok = int((np.asarray(input_ids) == image_token_id).sum())
    n_feat = 0 if image_grid_thw is None else int(np.asarray(image_grid_thw).prod(-1).sum()) // merge_size**2
    if n_tok != n_feat:
        raise ValueError(f"{where}: the prompts hold {n_tok} image tokens but the images give {n_feat} visual "
                         "tokens: encode each image at the size its prompt's <|image_pad|> run was made for "
                         "(prepare_image at the policy's image_size, then processor.prepared_images)")


def write_processor_config(directory: str | os.PathLike, *, min_pixels: int = 56 * 56,
                           max_pixels: int = 28 * 28 * 1280) -> str:
    """Write Qwen2.5-VL's image settings as `directory/preprocessor_config.json` (what the
    processor of a model directory reads; a tokenizer directory becomes a processor directory)."""
    import json

    config = {
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
        "do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True,
        "rescale_factor": 1 / 255, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "resample": 3,
        "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2, "min_pixels": min_pixels,
        "max_pixels": max_pixels, "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
    }
    with open(os.path.join(os.fspath(directory), "preprocessor_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return os.fspath(directory)


def eos_token_ids(tokenizer: Any, text_config: Any) -> tuple[int, ...]:
    """The ids that end a turn: the tokenizer's eos and the model config's ``eos_token_id``(s)."""
    eos: set[int] = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        eos.add(int(tokenizer.eos_token_id))
    cfg_eos = getattr(text_config, "eos_token_id", None)
    if cfg_eos is not None:
        eos |= set([cfg_eos] if isinstance(cfg_eos, int) else cfg_eos)
    return tuple(sorted(eos))


def _images_in(messages: Sequence[dict]) -> list[Any]:
    found = []
    for m in messages:
        if isinstance(m.get("content"), list):
            for part in m["content"]:
                if part.get("type") == "image" or "image" in part:
                    if part.get("image") is None:
                        raise ValueError("message image part has no 'image' (PIL image or uint8 array)")
                    found.append(part["image"])
    return found


class Qwen25VLProcessor:
    """Tokenizer (from a LOCAL directory) + numpy image processor with the directory's settings
    (`DEFAULTS` where `preprocessor_config.json` has none)."""

    # The Qwen2-VL image processor defaults (Qwen3-VL's subclass changes them).
    DEFAULTS: dict[str, Any] = dict(min_pixels=56 * 56, max_pixels=28 * 28 * 1280, patch_size=14,
                                    image_mean=CLIP_MEAN, image_std=CLIP_STD)

    def __init__(self, directory: str | os.PathLike, padding_side: str | None = None):
        from transformers import AutoTokenizer

        directory = os.fspath(directory)
        self.tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        if padding_side is not None:
            self.tokenizer.padding_side = padding_side
        cfg: dict[str, Any] = {}
        path = os.path.join(directory, "preprocessor_config.json")
        if os.path.exists(path):
            from ibis_jax.fileio import read_json

            cfg = read_json(path, "preprocessor config")
        size = cfg.get("size") or {}
        d = self.DEFAULTS
        self.image_kwargs = dict(
            min_pixels=int(size.get("shortest_edge", cfg.get("min_pixels", d["min_pixels"]))),
            max_pixels=int(size.get("longest_edge", cfg.get("max_pixels", d["max_pixels"]))),
            patch_size=int(cfg.get("patch_size", d["patch_size"])),
            temporal_patch_size=int(cfg.get("temporal_patch_size", 2)),
            merge_size=int(cfg.get("merge_size", 2)),
            image_mean=tuple(cfg.get("image_mean", d["image_mean"])),
            image_std=tuple(cfg.get("image_std", d["image_std"])),
        )
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_PAD)

    def images(self, images: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
        """See `preprocess_images`."""
        return preprocess_images(images, **self.image_kwargs)

    def prepared_images(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """See `preprocess_prepared`."""
        return preprocess_prepared(images, **self.image_kwargs)

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        """The chat template applied to `messages`, one `<|image_pad|>` per image."""
        return self.tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def expand_image_pads(self, text: str, image_grid_thw: np.ndarray) -> str:
        """Replace the k-th `<|image_pad|>` by t*h*w/merge^2 copies (one per visual token)."""
        parts = text.split(IMAGE_PAD)
        if len(parts) - 1 != len(image_grid_thw):
            raise ValueError(f"text has {len(parts) - 1} {IMAGE_PAD} but {len(image_grid_thw)} images were given")
        m2 = self.image_kwargs["merge_size"] ** 2
        out = [parts[0]]
        for grid, rest in zip(image_grid_thw, parts[1:]):
            out.append(IMAGE_PAD * int(np.prod(grid) // m2) + rest)
        return "".join(out)

    def __call__(
        self, text: str | Sequence[str], images: Sequence[Any] | None = None
    ) -> dict[str, np.ndarray]:
        """Tokenize already-rendered text(s); images in order of their `<|image_pad|>` across the
        batch. Returns input_ids / attention_mask [B, S] int32 (padded per tokenizer.padding_side),
        mm_token_type_ids [B, S] (1 at image tokens), and pixel_values / image_grid_thw if any."""
        texts = [text] if isinstance(text, str) else list(text)
        out: dict[str, np.ndarray] = {}
        if images:
            pixel_values, grid = self.images(images)
            counts = [t.count(IMAGE_PAD) for t in texts]
            starts = np.cumsum([0] + counts)
            texts = [self.expand_image_pads(t, grid[starts[i]:starts[i + 1]]) for i, t in enumerate(texts)]
            out.update(pixel_values=pixel_values, image_grid_thw=grid)
        elif any(IMAGE_PAD in t for t in texts):
            raise ValueError(f"text contains {IMAGE_PAD} but no images were given")
        enc = self.tokenizer(texts, padding=True, return_tensors="np", add_special_tokens=False)
        ids = enc["input_ids"].astype(np.int32)
        out["input_ids"] = ids
        out["attention_mask"] = enc["attention_mask"].astype(np.int32)
        out["mm_token_type_ids"] = (ids == self.image_token_id).astype(np.int32)
        return out

    def apply_chat_template(
        self, conversations: Sequence[dict] | Sequence[Sequence[dict]], add_generation_prompt: bool = False
    ) -> dict[str, np.ndarray]:
        """One conversation (list of messages) or a batch of them -> model inputs as `__call__`.
        Images are taken from `{"type": "image", "image": ...}` content parts."""
        convs = [conversations] if conversations and isinstance(conversations[0], dict) else list(conversations)
        texts = [self.render(c, add_generation_prompt) for c in convs]
        images = [im for c in convs for im in _images_in(c)]
        return self(texts, images or None)
