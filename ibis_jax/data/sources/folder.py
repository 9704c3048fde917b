"""2D image + mask files on disk, in the BiomedParseData layout or described by a sidecar index.

BiomedParseData layout (the default)::

    ROOT/train/        amos_0001_52_CT_abdomen.png            <- image: <name>_<modality>_<site>
    ROOT/train_mask/   amos_0001_52_CT_abdomen_liver.png      <- one mask per target:
                       amos_0001_52_CT_abdomen_left+kidney.png   <image stem>_<target>, '+' = space

The modality is read from the image name when one of its ``_`` parts is a known modality
(``CT``, ``MRI``, ``X-Ray``, ...); ``modality=`` overrides it. A mask named exactly like its image
is a single-target mask named by ``default_target``.

Sidecar index (``index=``): a CSV with a header or a JSON list of objects, with keys ``image``,
``mask``, ``target`` and optionally ``modality``, ``id``, ``label`` (select one value of a label
map). Paths are relative to the index file's folder.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

from ibis_jax.data.sources.base import (
    Item,
    Sample,
    SourceError,
    image_to_rgb,
    read_image_file,
    sample_with_mask_file,
)
from ibis_jax.data.windowing import parse_window

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")

# BiomedParseData's nine modality names (and common spellings) -> the name we record.
KNOWN_MODALITIES = {
    "ct": "CT",
    "mri": "MRI",
    "mr": "MRI",
    "x-ray": "X-Ray",
    "xray": "X-Ray",
    "ultrasound": "Ultrasound",
    "us": "Ultrasound",
    "pathology": "Pathology",
    "fundus": "Fundus",
    "dermoscopy": "Dermoscopy",
    "endoscope": "Endoscopy",
    "endoscopy": "Endoscopy",
    "oct": "OCT",
    "microscopy": "Microscopy",
}


def modality_from_name(stem: str) -> str | None:
    """The modality named by one of the ``_``-separated parts of a file stem, last one first."""
    for part in reversed(stem.split("_")):
        found = KNOWN_MODALITIES.get(part.lower())
        if found:
            return found
    return None


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


@dataclasses.dataclass(frozen=True)
class FolderSource:
    """Image/mask PNG pairs. See the module docstring for the layouts.

    Attributes:
      root: dataset folder (holds ``<split>/`` and ``<split>_mask/``, or the index's paths).
      split: ``train`` / ``test`` sub-folder names in the BiomedParseData layout.
      images, masks: explicit image and mask folders (override ``root``/``split``).
      index: a CSV or JSON sidecar listing the pairs (overrides the name-based pairing).
      modality: overrides the modality read from names.
      targets: keep only these target names (empty: all).
      default_target: the target name of a mask named exactly like its image.
      window: a window spec for 16-bit/float grayscale images (``ibis_jax.data.windowing``).
    """

    root: str | None = None
    split: str = "train"
    images: str | None = None
    masks: str | None = None
    index: str | None = None
    modality: str | None = None
    targets: tuple[str, ...] = ()
    default_target: str = "target"
    window: str | None = None
    name: str = "folder"

    def _keep(self, target: str) -> bool:
        return not self.targets or target in self.targets

    def items(self) -> list[Item]:
        if self.index:
            return self._items_from_index(Path(self.index))
        image_dir = Path(self.images) if self.images else Path(self.root or ".") / self.split
        mask_dir = Path(self.masks) if self.masks else Path(self.root or ".") / f"{self.split}_mask"
        for folder, what in ((image_dir, "image"), (mask_dir, "mask")):
            if not folder.is_dir():
                raise SourceError(folder, "missing_file", f"{what} folder does not exist; pass --root or --{what}s")
        images = {p.stem: p for p in _image_files(image_dir)}
        # Longest stem first, so "a_CT_x_2" is not taken for the image "a_CT_x" when both exist.
        stems = sorted(images, key=len, reverse=True)
        items = []
        for mask_path in _image_files(mask_dir):
            mask_stem = mask_path.stem
            if mask_stem in images:
                stem, target = mask_stem, self.default_target
            else:
                stem = next((s for s in stems if mask_stem.startswith(s + "_")), None)
                target = mask_stem[len(stem) + 1:].replace("+", " ").replace("_", " ") if stem else ""
            if not self._keep(target) and stem is not None:
                continue
            image_path = images[stem] if stem else mask_path.with_name("<no matching image>")
            modality = self.modality or modality_from_name(stem or mask_stem) or "unknown"
            items.append(Item(mask_stem, (str(image_path), str(mask_path), target, modality, None)))
        return items

    def _items_from_index(self, index: Path) -> list[Item]:
        if not index.is_file():
            raise SourceError(index, "missing_file", "index file does not exist")
        try:
            if index.suffix.lower() == ".json":
                rows = json.loads(index.read_text())
                if isinstance(rows, dict):
                    rows = rows.get("samples", rows.get("items"))
                if not isinstance(rows, list):
                    raise ValueError("expected a JSON list of {image, mask, target, ...} objects")
            else:
                with index.open(newline="") as handle:
                    rows = list(csv.DictReader(handle))
        except (ValueError, csv.Error, UnicodeDecodeError) as e:
            raise SourceError(index, "corrupt_image", f"cannot read the index: {e}") from None
        items = []
        for number, row in enumerate(rows):
            missing = [k for k in ("image", "mask", "target") if not row.get(k)]
            if missing:
                raise SourceError(index, "missing_file", f"row {number} lacks {missing}; each row needs image, mask, target")
            target = str(row["target"]).strip()
            if not self._keep(target):
                continue
            image_path = index.parent / str(row["image"])
            mask_path = index.parent / str(row["mask"])
            modality = self.modality or row.get("modality") or modality_from_name(image_path.stem) or "unknown"
            label = row.get("label")
            label = int(label) if label not in (None, "") else None
            item_id = str(row.get("id") or f"{mask_path.stem}")
            items.append(Item(item_id, (str(image_path), str(mask_path), target, str(modality), label)))
        return items

    def load(self, item: Item) -> Iterator[Sample]:
        image_path, mask_path, target, modality, label = item.spec
        if not target:
            raise SourceError(mask_path, "missing_file", "no image in the image folder matches this mask's name")
        window = parse_window(self.window) if self.window else None
        image = image_to_rgb(read_image_file(image_path), image_path, window)
        yield sample_with_mask_file(self.name, item, image, mask_path, label, target, modality,
                                    {"image": image_path, "mask": mask_path})
