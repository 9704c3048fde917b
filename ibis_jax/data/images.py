"""Normalising images and masks at the boundary, before anything else touches them.

Every tool and renderer in the project takes RGB ``uint8 [H, W, 3]`` images and ``bool [H, W]``
masks. These functions turn what users bring (grayscale, 16-bit, float, RGBA, 0/255 masks) into
that form, or raise an error naming the input and the fix.
"""

from __future__ import annotations

import numpy as np


class ImageError(ValueError):
    """An image or mask cannot be used as given."""


# The input pixel limit of the commands that take user images (``segment --max-pixels``). 50 MP
# holds every single-frame medical image in common use with room to spare (CT/MR slices 0.26 MP,
# chest radiographs ~9 MP, full-field mammograms ~14-24 MP, 5000 x 5000 microscopy tiles 25 MP)
# while refusing what is almost surely a mistake or a decompression bomb (a 12000 x 12000 PNG is
# 144 MP; whole-slide pathology needs tiling first). The agent never sees more than a few hundred
# pixels a side anyway; the limit bounds what the overlays and reports of an episode hold in
# memory (each step keeps a full-size RGB overlay: an 8000 x 8000 input took 3.3 GB).
DEFAULT_MAX_PIXELS = 50_000_000


def check_pixels(height: int, width: int, *, where: str, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 flag: str = "--max-pixels") -> None:
    """Raises ``ImageError`` naming ``where``, the size and ``flag`` when ``height * width`` is over
    ``max_pixels`` (``None`` or 0: no limit). Cheap: call it with the size from a file's header."""
    if max_pixels and height * width > max_pixels:
        raise ImageError(
            f"{where}: {width} x {height} px = {height * width / 1e6:.3g} megapixels is over the input "
            f"limit of {max_pixels / 1e6:g} megapixels; raise it with {flag} N (0: no limit) or "
            "downscale the image"
        )


def to_rgb_uint8(image: np.ndarray, *, where: str = "image") -> np.ndarray:
    """Converts an image to RGB ``uint8 [H, W, 3]``.

    Rules: ``uint8`` values are kept; ``bool`` maps to 0/255; floats already in ``[0, 1]`` are
    scaled by 255; any other integer or float image (16-bit, CT in HU, ...) is min-max scaled to
    0..255 over the whole image. Medical intensities should be windowed first
    (``ibis_jax.data.windowing``) so this min-max fallback never decides the contrast. Grayscale
    ``[H, W]`` / ``[H, W, 1]`` is repeated to three channels; an alpha channel is dropped.
    """
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] in (1, 3, 4):
        image = image[..., :3] if image.shape[2] >= 3 else image[..., 0]
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ImageError(
            f"{where}: expected [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got shape {image.shape}"
        )
    if image.shape[0] < 2 or image.shape[1] < 2:
        raise ImageError(f"{where}: image of shape {image.shape} is too small (at least 2x2)")
    if image.dtype == np.uint8:
        return np.ascontiguousarray(image)
    if image.dtype == bool:
        return image.astype(np.uint8) * 255
    if not np.issubdtype(image.dtype, np.number):
        raise ImageError(f"{where}: unsupported dtype {image.dtype}")
    values = image.astype(np.float64)
    if not np.all(np.isfinite(values)):
        raise ImageError(f"{where}: image contains NaN or infinite values; fill or mask them first")
    low, high = float(values.min()), float(values.max())
    if np.issubdtype(image.dtype, np.floating) and low >= 0.0 and high <= 1.0:
        scaled = values * 255.0
    elif high > low:
        scaled = (values - low) * (255.0 / (high - low))
    else:
        scaled = np.zeros_like(values)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def check_mask(
    mask: np.ndarray,
    image_shape: tuple[int, ...],
    *,
    where: str = "mask",
    allow_empty: bool = True,
) -> np.ndarray:
    """Validates a binary mask against its image and returns it as ``bool [H, W]``.

    Accepted: ``bool``, or integers/floats whose only values are {0, 1} or {0, 255}; a trailing
    singleton channel is dropped. A label map with other values is refused: select the target
    label first (``mask == label``).
    """
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[2] == 1:
        mask = mask[..., 0]
    if mask.ndim != 2:
        raise ImageError(f"{where}: expected a 2D mask, got shape {mask.shape}")
    if tuple(mask.shape) != tuple(image_shape[:2]):
        raise ImageError(
            f"{where}: mask shape {mask.shape} differs from image shape {tuple(image_shape[:2])}; "
            "resize the mask with nearest-neighbour interpolation to the image size"
        )
    if mask.dtype != bool:
        if np.issubdtype(mask.dtype, np.floating) and not np.all(np.isfinite(mask)):
            raise ImageError(f"{where}: mask contains NaN or infinite values")
        values = np.unique(mask)
        if not (set(values.tolist()) <= {0, 1} or set(values.tolist()) <= {0, 255}):
            shown = values[:8].tolist()
            raise ImageError(
                f"{where}: mask is not binary (values {shown}{'...' if values.size > 8 else ''}); "
                "threshold it or select one label (mask == label)"
            )
        mask = mask > 0
    if not allow_empty and not mask.any():
        raise ImageError(f"{where}: mask is empty; the target is absent from this image")
    return mask
