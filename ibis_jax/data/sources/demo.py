"""The demo source: real images with masks from installed wheels, plus procedural shapes.

Nothing is downloaded or committed; every file is read from an installed package (docs/design.md section 8):

- ``mri``: the MNI152 2009a T1 template from the nilearn wheel (197x233x189, 1 mm, skull
  stripped), with grey- and white-matter masks from its tissue probability maps thresholded at
  0.5 (the maps are stored as ``uint8`` 0..255, so ``>= 128``). Axial and coronal slices spread over
  the part of the brain where the tissue is large enough to click on; percentile windowing.
- ``nuclei``: the stardist wheel's 512x512 fluorescence nuclei image ``img2d.tif`` and its instance
  labels ``mask2d.tif`` (read with tifffile; stardist itself is never imported: it pulls
  TensorFlow), cut into tiles; the target is all nuclei of the tile.
- ``shapes``: the procedural generator of :mod:`ibis_jax.data.shapes`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ibis_jax.data.images import to_rgb_uint8
from ibis_jax.data.reasoning import location_words
from ibis_jax.data.shapes import make_shape_sample
from ibis_jax.data.sources.base import Item, Sample, SourceError, stable_seed
from ibis_jax.data.sources.nifti import load_volume, slice_volume
from ibis_jax.data.windowing import window_percentile

DEMO_PARTS = ("mri", "nuclei", "shapes")
MNI_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
MRI_TARGETS = {"white matter": "wm", "grey matter": "gm"}


def located_name(kind: str, mask: np.ndarray) -> str:
    """``kind`` prefixed with the 3x3 grid cell of ``mask``'s centroid: ``"upper-left blob"``,
    ``"top triangle"``, ``"central circle"``."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        raise ValueError(f"located_name: the {kind} mask is empty, so it has no location")
    cell = location_words(rows.mean(), cols.mean(), *mask.shape)
    return f"{'central' if cell == 'centre' else cell} {kind}"


def package_dir(package: str, hint: str) -> Path:
    """The install folder of ``package`` without importing it (stardist would import TensorFlow)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(package, "missing_file", f"package {package!r} is not installed; {hint}")
    return Path(list(spec.submodule_search_locations)[0])


def mni_path(kind: str) -> Path:
    folder = package_dir("nilearn", "pip install nilearn") / "datasets" / "data"
    return folder / MNI_FILES[kind]


@functools.lru_cache(maxsize=1)
def mni_volumes() -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The T1 volume windowed to ``uint8 [X, Y, Z]`` (RAS) and the tissue masks ``bool [X, Y, Z]``."""
    t1 = load_volume(mni_path("t1"))
    display = window_percentile(t1, 0.5, 99.5, nonzero=True, where=str(mni_path("t1")))
    masks = {k: load_volume(mni_path(k)) >= 128 for k in ("gm", "wm")}
    return display, masks


@functools.lru_cache(maxsize=1)
def nuclei_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The stardist nuclei image windowed to ``uint8 [512, 512]`` and its label map ``[512, 512]``."""
    import tifffile

    folder = package_dir("stardist", "pip install --no-deps stardist==0.9.2 csbdeep==0.8.2") / "data" / "images"
    paths = [folder / "img2d.tif", folder / "mask2d.tif"]
    for path in paths:
        if not path.is_file():
            raise SourceError(path, "missing_file", "the stardist wheel should ship this file; reinstall stardist")
    image, labels = (tifffile.imread(str(p)) for p in paths)
    return window_percentile(image, 0.5, 99.8, where=str(paths[0])), labels


def _spread(candidates: np.ndarray, count: int) -> list[int]:
    """``count`` evenly spaced entries of ``candidates`` (all of them if fewer)."""
    if len(candidates) <= count:
        return candidates.tolist()
    picks = np.linspace(0, len(candidates) - 1, count).round().astype(int)
    return candidates[picks].tolist()


@dataclasses.dataclass(frozen=True)
class DemoSource:
    """Real MRI and microscopy samples plus synthetic shapes. See the module docstring.

    Attributes:
      parts: which of ``mri``, ``nuclei``, ``shapes`` to include.
      mri_slices: slices per (target, plane) for the two planes axial and coronal.
      nuclei_tile: tile side in pixels (512 must be divisible by it); nuclei_tiles: how many of
        the tiles to use (spread evenly over the image).
      num_shapes: synthetic-shapes samples; ``shapes_size`` their side; ``shapes_per_image`` the
        (min, max) number of shapes in one image, the target included ((1, 1): no distractors);
        ``position_tint`` the grey levels of the colour ramps that write each pixel's position
        into its colour (0: none; see :func:`ibis_jax.data.shapes.make_shape_sample`);
        ``located_targets`` names each target with the 3x3 grid cell of its centroid ("upper-left
        blob", "central circle"), the way anatomy is named by side ("left kidney"): where to click
        is then in the query, for a policy that cannot see it (the GRPO control experiment).
    """

    parts: tuple[str, ...] = DEMO_PARTS
    mri_slices: int = 3
    nuclei_tile: int = 128
    nuclei_tiles: int = 16
    num_shapes: int = 16
    shapes_size: int = 128
    shapes_per_image: tuple[int, int] = (2, 4)
    position_tint: float = 0.0
    located_targets: bool = False
    seed: int = 0
    name: str = "demo"

    def items(self) -> list[Item]:
        unknown = set(self.parts) - set(DEMO_PARTS)
        if unknown:
            raise ValueError(f"unknown demo parts {sorted(unknown)}; choose from {DEMO_PARTS}")
        if "nuclei" in self.parts:  # an optional package: checked before any work starts
            package_dir("stardist", "install its wheel without dependencies: "
                        "pip install --no-deps stardist==0.9.2 csbdeep==0.8.2 (scripts/install.sh does)")
        items: list[Item] = []
        if "mri" in self.parts:
            _, masks = mni_volumes()
            for target, key in MRI_TARGETS.items():
                for plane, axis in (("axial", 2), ("coronal", 1)):
                    others = tuple(a for a in range(3) if a != axis)
                    areas = masks[key].sum(axis=others)
                    # Slices where the tissue is at least 40% of its largest cross-section.
                    good = np.flatnonzero(areas >= 0.4 * areas.max())
                    for index in _spread(good, self.mri_slices):
                        item_id = f"mri/{key}/{plane}{index:03d}"
                        items.append(Item(item_id, ("mri", target, key, axis, int(index), plane)))
        if "nuclei" in self.parts:
            if 512 % self.nuclei_tile:
                raise ValueError(f"nuclei_tile={self.nuclei_tile}: 512 must be divisible by it")
            count = 512 // self.nuclei_tile
            for tile in _spread(np.arange(count * count), self.nuclei_tiles):
                row, col = divmod(int(tile), count)
                items.append(Item(f"nuclei/r{row}c{col}", ("nuclei", row, col)))
        if "shapes" in self.parts:
            for i in range(self.num_shapes):
                items.append(Item(f"shapes/{i:04d}", ("shapes", i)))
        return items

    def load(self, item: Item) -> Iterator[Sample]:
        kind = item.spec[0]
        if kind == "mri":
            _, target, key, axis, index, plane = item.spec
            display, masks = mni_volumes()
            image = to_rgb_uint8(slice_volume(display, axis, index))
            mask = np.ascontiguousarray(slice_volume(masks[key], axis, index))
            yield Sample(image, mask, target, "MRI", item.item_id, self.name, {
                "package": "nilearn", "image": MNI_FILES["t1"], "mask": MNI_FILES[key],
                "mask_rule": "probability >= 0.5", "axis": plane, "slice": index,
                "window": "percentile:0.5,99.5 (non-zero voxels)",
            })
        elif kind == "nuclei":
            _, row, col = item.spec
            image, labels = nuclei_arrays()
            t = self.nuclei_tile
            window = (slice(row * t, (row + 1) * t), slice(col * t, (col + 1) * t))
            mask = labels[window] > 0
            yield Sample(to_rgb_uint8(image[window]), mask, "cell nuclei", "Microscopy", item.item_id, self.name, {
                "package": "stardist", "image": "data/images/img2d.tif", "mask": "data/images/mask2d.tif",
                "tile": [row * t, col * t, t], "window": "percentile:0.5,99.8",
            })
        elif kind == "shapes":
            _, i = item.spec
            rng = np.random.default_rng(stable_seed(self.seed, "shapes", i))
            shape = make_shape_sample(self.shapes_size, rng, i, self.shapes_per_image, self.position_tint)
            target = located_name(shape.target, shape.mask) if self.located_targets else shape.target
            yield Sample(shape.image, shape.mask, target, "Synthetic", item.item_id, self.name, {
                "generator": "ibis_jax.data.shapes", "seed": self.seed, "index": i,
            })
        else:
            raise ValueError(f"unknown demo item {item}")
