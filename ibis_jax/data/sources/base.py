"""What every image/mask source yields, and the errors it raises.

A source is split in two so that synthesis can shard, resume and parallelise it:

- ``items()`` lists the units of work cheaply and deterministically (a PNG pair, a volume and
  target, a DICOM file): the list fixes which shard holds what, so a rerun finds the same shards;
- ``load(item)`` reads one unit and yields zero or more :class:`Sample` (a volume yields slices).
  It raises :class:`SourceError` naming the file and the problem for bad input; the caller decides
  whether that stops the run or is counted and skipped.

Sources are small frozen dataclasses of paths and options, so they pickle into worker processes.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image, UnidentifiedImageError

from ibis_jax.data.images import ImageError, check_mask, to_rgb_uint8

# Reasons a unit of work is skipped; stats.json counts skipped items under these names.
ERROR_REASONS = (
    "missing_file",
    "corrupt_image",
    "size_mismatch",
    "bad_mask",
    "nan_values",
    "missing_target",
    "unreadable_dicom",
    "too_large",
    "tool_error",
    "unexpected",
)


class SourceError(ValueError):
    """Bad input in one unit of work.

    Attributes:
      path: the offending file.
      reason: one of :data:`ERROR_REASONS` (a stable key for counting).
      detail: what is wrong and how to fix it.
    """

    def __init__(self, path: str | Path, reason: str, detail: str):
        super().__init__(f"{path}: {detail}")
        self.path = str(path)
        self.reason = reason
        self.detail = detail

    def __reduce__(self):  # keep the attributes across process boundaries
        return (SourceError, (self.path, self.reason, self.detail))


@dataclasses.dataclass(frozen=True)
class Sample:
    """One 2D image with one target mask, ready for an episode.

    Attributes:
      image: RGB ``uint8 [H, W, 3]`` (already windowed).
      mask: ``bool [H, W]``; may be empty when the target is absent (kept on purpose).
      target: the target's name in plain words ("liver", "white matter").
      modality: imaging modality ("CT", "MRI", "Microscopy", ...).
      sample_id: unique within the source and stable across runs.
      source: the source's name ("folder", "nifti", "dicom", "demo").
      provenance: JSON-serialisable facts about where the pixels came from (files, slice, window).
    """

    image: np.ndarray
    mask: np.ndarray
    target: str
    modality: str
    sample_id: str
    source: str
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Item:
    """A unit of work: ``item_id`` is stable across runs; ``spec`` is what ``load`` needs."""

    item_id: str
    spec: tuple[Any, ...]


class Source(Protocol):
    name: str

    def items(self) -> list[Item]: ...

    def load(self, item: Item) -> Iterator[Sample]: ...


# -- helpers shared by the sources ------------------------------------------------------------

def stable_seed(*parts: Any) -> int:
    """A 63-bit seed from any values, identical across processes and Python runs (unlike hash())."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def read_image_file(path: str | Path, *, max_pixels: int | None = None,
                    flag: str = "--max-pixels") -> np.ndarray:
    """Reads a PNG/JPEG/TIFF into a numpy array (any dtype/channels), or raises ``SourceError``.

    ``max_pixels``: refuse larger images (reason ``too_large``, naming ``flag``) from the size in
    the file's header, before decoding anything; ``None`` or 0: no limit of ours (PIL's own
    decompression-bomb check, about 179 MP, still applies)."""
    import warnings

    from ibis_jax.data.images import ImageError, check_pixels

    path = Path(path)
    if not path.is_file():
        raise SourceError(path, "missing_file", "file does not exist")
    try:
        with warnings.catch_warnings():  # the check of our own, with the flag to raise it, comes first
            if max_pixels:
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            handle = Image.open(path)
    except Image.DecompressionBombError as e:
        raise SourceError(path, "too_large", f"{e}; downscale or tile the image") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise SourceError(path, "corrupt_image", f"cannot decode image ({e}); re-export the file") from None
    try:
        with handle:
            try:
                check_pixels(handle.height, handle.width, where=str(path), max_pixels=max_pixels, flag=flag)
            except ImageError as e:
                raise SourceError(path, "too_large", str(e)[len(str(path)) + 2:]) from None
            handle.load()  # decode now, so a truncated file fails here and not later
            if handle.mode == "P":
                handle = handle.convert("RGB") if "transparency" not in handle.info else handle.convert("RGBA")
            array = np.array(handle)
    except SourceError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise SourceError(path, "corrupt_image", f"cannot decode image ({e}); re-export the file") from None
    return array


def image_to_rgb(array: np.ndarray, path: str | Path, window=None) -> np.ndarray:
    """Any 2D image array -> RGB ``uint8 [H, W, 3]``; a ``Window`` is applied to grayscale data."""
    try:
        if window is not None and array.ndim == 2 and array.dtype != np.uint8:
            array = window.apply(array, where=str(path))
        return to_rgb_uint8(array, where=str(path))
    except (ImageError, ValueError) as e:
        raise SourceError(path, "nan_values" if "NaN" in str(e) else "corrupt_image", str(e).split(": ", 1)[-1]) from None


def mask_from_array(
    array: np.ndarray, image_shape: tuple[int, ...], path: str | Path, label: int | None = None
) -> np.ndarray:
    """A mask file's array -> ``bool [H, W]``, checked against its image.

    ``label`` selects one value of a label map; otherwise the file must be binary ({0,1}/{0,255}).
    An RGB mask whose channels agree is read as grayscale.
    """
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[2] in (3, 4):
        rgb = array[..., :3]
        if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
            raise SourceError(path, "bad_mask", "colour mask: save the mask as one grayscale channel")
        array = rgb[..., 0]
    if array.ndim == 2 and tuple(array.shape) != tuple(image_shape[:2]):
        raise SourceError(
            path,
            "size_mismatch",
            f"mask is {array.shape[0]}x{array.shape[1]} (HxW) but its image is "
            f"{image_shape[0]}x{image_shape[1]}; resize the mask (nearest neighbour) to the image",
        )
    if label is not None:
        if not np.any(array == label):
            found = np.unique(array)[:10].tolist()
            raise SourceError(path, "missing_target", f"label {label} does not occur (labels present: {found})")
        array = array == label
    try:
        return check_mask(array, image_shape, where=str(path))
    except ImageError as e:
        raise SourceError(path, "bad_mask", str(e).split(": ", 1)[-1]) from None


def sample_with_mask_file(source: str, item: Item, image: np.ndarray, mask_path: str, label: int | None,
                          target: str, modality: str, provenance: dict[str, Any]) -> Sample:
    """A 2D sample whose mask is the file ``mask_path`` (``label``: the value that marks the target
    in a label map, ``None``: a binary mask), checked against ``image``; ``provenance`` gets the
    label when there is one."""
    mask = mask_from_array(read_image_file(mask_path), image.shape, mask_path, label)
    return Sample(image=image, mask=mask, target=target, modality=modality, sample_id=item.item_id, source=source,
                  provenance={**provenance, **({"label": label} if label is not None else {})})


def parse_target_labels(specs: tuple[str, ...] | list[str] | None) -> tuple[tuple[str, int], ...]:
    """``["liver=1", "tumor=2"]`` -> ``(("liver", 1), ("tumor", 2))``; names may contain spaces."""
    out = []
    for spec in specs or ():
        name, sep, value = str(spec).rpartition("=")
        if not sep or not name.strip():
            raise ValueError(f"target {spec!r}: write NAME=LABEL, e.g. liver=1")
        try:
            out.append((name.strip().replace("_", " "), int(value)))
        except ValueError:
            raise ValueError(f"target {spec!r}: the label after '=' must be an integer") from None
    return tuple(out)
