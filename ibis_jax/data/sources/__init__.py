"""Image/mask sources: each lists units of work (``items``) and loads them into ``Sample``s.

- :class:`FolderSource`: 2D PNG pairs (BiomedParseData layout or a CSV/JSON sidecar);
- :class:`NiftiSource`: NIfTI volumes + label maps, sliced, windowed;
- :class:`DicomSource`: DICOM slices (rescale slope/intercept, windowing) + mask PNGs;
- :class:`DemoSource`: MNI152 MRI (nilearn wheel), nuclei (stardist wheel), synthetic shapes.
"""

from ibis_jax.data.sources.base import (
    ERROR_REASONS,
    Item,
    Sample,
    Source,
    SourceError,
    parse_target_labels,
    stable_seed,
)
from ibis_jax.data.sources.demo import DemoSource
from ibis_jax.data.sources.dicom import DicomSource
from ibis_jax.data.sources.folder import FolderSource
from ibis_jax.data.sources.nifti import NiftiSource

SOURCES = {"folder": FolderSource, "nifti": NiftiSource, "dicom": DicomSource, "demo": DemoSource}

__all__ = [
    "ERROR_REASONS", "Item", "Sample", "Source", "SourceError", "parse_target_labels", "stable_seed",
    "DemoSource", "DicomSource", "FolderSource", "NiftiSource", "SOURCES",
]
