"""COCO run-length encoding of binary masks, in pure numpy.

Masks are stored per step in trajectory records and sent over the tool bridge as COCO RLE so that
any COCO tool (pycocotools, the released IBISAgent data) reads them. The layout is COCO's: runs
over the mask in column-major (Fortran) order, starting with a run of zeros, and the ``counts``
compressed into an ASCII string (5 bits per character, delta-coded from the run two back).
"""

from __future__ import annotations

from typing import Any

import numpy as np


class RLEError(ValueError):
    """An RLE dict is malformed."""


def _runs(mask: np.ndarray) -> np.ndarray:
    """Run lengths of the column-major flattened mask, the first run counting zeros."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    if flat.size == 0:
        return np.zeros(0, dtype=np.int64)
    bounds = np.concatenate([[0], np.flatnonzero(flat[1:] != flat[:-1]) + 1, [flat.size]])
    runs = np.diff(bounds).astype(np.int64)
    return np.concatenate([[0], runs]) if flat[0] else runs


def _compress(counts: np.ndarray) -> str:
    chars = []
    for i, run in enumerate(counts.tolist()):
        value = run - counts[i - 2] if i > 2 else run
        more = True
        while more:
            c = value & 0x1F
            value >>= 5
            more = (value != -1) if (c & 0x10) else (value != 0)
            if more:
                c |= 0x20
            chars.append(chr(c + 48))
    return "".join(chars)


def _decompress(text: str) -> list[int]:
    counts: list[int] = []
    pos = 0
    while pos < len(text):
        value, shift, more = 0, 0, True
        while more:
            if pos >= len(text):
                raise RLEError("RLE counts string ends in the middle of a number")
            c = ord(text[pos]) - 48
            if c < 0 or c > 63:
                raise RLEError(f"RLE counts string has an invalid character {text[pos]!r}")
            value |= (c & 0x1F) << (5 * shift)
            more = bool(c & 0x20)
            pos += 1
            shift += 1
            if not more and (c & 0x10):
                value |= -1 << (5 * shift)
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """Encodes a ``bool [H, W]`` mask as ``{"size": [H, W], "counts": str}`` (COCO compressed)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise RLEError(f"encode_rle: expected a 2D mask, got shape {mask.shape}")
    runs = _runs(mask.astype(bool))
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": _compress(runs)}


def decode_rle(rle: dict[str, Any]) -> np.ndarray:
    """Decodes COCO RLE (compressed string or uncompressed list counts) to ``bool [H, W]``."""
    try:
        height, width = (int(v) for v in rle["size"])
        counts = rle["counts"]
    except (KeyError, TypeError, ValueError) as e:
        raise RLEError(f"RLE must be a dict with 'size' [H, W] and 'counts': {e}") from None
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    runs = _decompress(counts) if isinstance(counts, str) else [int(c) for c in counts]
    if any(r < 0 for r in runs) or sum(runs) != height * width:
        raise RLEError(
            f"RLE counts sum to {sum(runs)} but size {height}x{width} needs {height * width}"
        )
    values = np.zeros(len(runs), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, runs)
    return flat.reshape((height, width), order="F")
