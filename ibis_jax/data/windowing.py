"""Intensity windowing: raw scanner values -> ``uint8`` display values, before any tool sees them.

Segmenters and the policy see RGB ``uint8`` images (docs/design.md section 7), so every medical source maps
its raw values to 0..255 here, once, with a rule that is written into each record's provenance:

- **CT level/width** (Hounsfield units): clip to ``[L - W/2, L + W/2]`` and scale linearly to
  0..255: ``round((v - (L - W/2)) * 255 / W)``, rounding halves up. Presets are the usual
  radiology windows.
- **MR percentile**: clip to the ``[p_low, p_high]`` percentiles of the finite (optionally
  non-zero) values and scale linearly; MR intensities have no physical unit, so only their
  distribution can set the contrast.
- **min-max**: scale the whole range (for data that is already a display image).

A window spec string (CLI ``--window``) is one of: a preset name (``abdomen``), ``L,W``
(``40,400``), ``percentile`` or ``percentile:LOW,HIGH`` (``percentile:1,99``), ``minmax``, or
``dicom`` (use the file's own WindowCenter/WindowWidth; DICOM source only).
"""

from __future__ import annotations

import dataclasses

import numpy as np

# (level, width) in Hounsfield units; common radiology reading windows.
CT_PRESETS: dict[str, tuple[float, float]] = {
    "abdomen": (40.0, 400.0),
    "soft_tissue": (50.0, 350.0),
    "mediastinum": (50.0, 350.0),
    "liver": (30.0, 150.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "subdural": (75.0, 215.0),
    "stroke": (40.0, 40.0),
}

DEFAULT_PERCENTILES = (0.5, 99.5)


class WindowError(ValueError):
    """A window spec or an input volume cannot be windowed."""


def _finite_or_raise(values: np.ndarray, where: str) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    bad = int(np.count_nonzero(~np.isfinite(values)))
    if bad:
        raise WindowError(
            f"{where}: {bad} of {values.size} values are NaN or infinite; fill them (e.g. with the "
            "background value) before windowing"
        )
    return values


def _round_to_uint8(scaled: np.ndarray) -> np.ndarray:
    # Round half up (127.5 -> 128), the rule a hand computation uses; multiply before dividing so
    # exact halves stay exact in floating point.
    return np.clip(np.floor(scaled + 0.5), 0, 255).astype(np.uint8)


def window_level_width(values: np.ndarray, level: float, width: float, *, where: str = "image") -> np.ndarray:
    """CT windowing: ``values`` (any shape, e.g. HU ``[H, W]``) -> ``uint8`` of the same shape.

    ``round((clip(v, L - W/2, L + W/2) - (L - W/2)) * 255 / W)``, halves up; ``width`` > 0.
    """
    if not (np.isfinite(level) and np.isfinite(width) and width > 0):
        raise WindowError(f"{where}: window level {level} / width {width} invalid; width must be > 0")
    values = _finite_or_raise(values, where)
    low = level - width / 2.0
    scaled = (np.clip(values, low, low + width) - low) * 255.0 / width
    return _round_to_uint8(scaled)


def window_percentile(
    values: np.ndarray,
    low: float = DEFAULT_PERCENTILES[0],
    high: float = DEFAULT_PERCENTILES[1],
    *,
    nonzero: bool = False,
    where: str = "image",
) -> np.ndarray:
    """MR normalisation: clip to the ``[low, high]`` percentiles, scale to ``uint8`` 0..255.

    With ``nonzero=True`` the percentiles are taken over non-zero values only (skull-stripped or
    zero-padded volumes would otherwise put the low percentile at 0). A constant image maps to 0.
    """
    if not 0.0 <= low < high <= 100.0:
        raise WindowError(f"{where}: percentiles must satisfy 0 <= low < high <= 100, got {low}, {high}")
    values = _finite_or_raise(values, where)
    pool = values[values != 0] if nonzero else values.ravel()
    if pool.size == 0:
        return np.zeros(values.shape, dtype=np.uint8)
    lo, hi = np.percentile(pool, [low, high])
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    return _round_to_uint8((np.clip(values, lo, hi) - lo) * 255.0 / (hi - lo))


def window_minmax(values: np.ndarray, *, where: str = "image") -> np.ndarray:
    """Scales the full value range to 0..255 (a constant image maps to 0)."""
    values = _finite_or_raise(values, where)
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    return _round_to_uint8((values - lo) * 255.0 / (hi - lo))


@dataclasses.dataclass(frozen=True)
class Window:
    """A parsed window rule. ``kind`` is ``level_width``, ``percentile``, ``minmax`` or ``dicom``."""

    kind: str
    level: float | None = None
    width: float | None = None
    low: float = DEFAULT_PERCENTILES[0]
    high: float = DEFAULT_PERCENTILES[1]
    name: str | None = None  # the preset name, for provenance

    def apply(self, values: np.ndarray, *, where: str = "image", nonzero: bool = False) -> np.ndarray:
        """Raw values (any shape) -> ``uint8`` of the same shape."""
        if self.kind == "level_width":
            return window_level_width(values, self.level, self.width, where=where)
        if self.kind == "percentile":
            return window_percentile(values, self.low, self.high, nonzero=nonzero, where=where)
        if self.kind == "minmax":
            return window_minmax(values, where=where)
        raise WindowError(
            f"{where}: window {self.describe()!r} needs per-file values (DICOM WindowCenter/Width); "
            "resolve it with Window.level_width first"
        )

    def describe(self) -> str:
        """The spec string that parses back to this window (written into provenance)."""
        if self.kind == "level_width":
            return self.name or f"{self.level:g},{self.width:g}"
        if self.kind == "percentile":
            return f"percentile:{self.low:g},{self.high:g}"
        return self.kind

    @staticmethod
    def level_width(level: float, width: float, name: str | None = None) -> "Window":
        return Window("level_width", float(level), float(width), name=name)


def parse_window(spec: str) -> Window:
    """Parses a window spec (see the module docstring) into a :class:`Window`."""
    text = spec.strip().lower()
    if text in CT_PRESETS:
        level, width = CT_PRESETS[text]
        return Window.level_width(level, width, name=text)
    if text in ("minmax", "dicom"):
        return Window(text)
    if text.startswith("percentile"):
        rest = text[len("percentile"):].lstrip(":")
        if not rest:
            return Window("percentile")
        try:
            low, high = (float(v) for v in rest.split(","))
        except ValueError:
            raise WindowError(f"window {spec!r}: write percentile:LOW,HIGH, e.g. percentile:0.5,99.5") from None
        if not 0.0 <= low < high <= 100.0:
            raise WindowError(f"window {spec!r}: percentiles must satisfy 0 <= LOW < HIGH <= 100")
        return Window("percentile", low=low, high=high)
    try:
        level, width = (float(v) for v in text.split(","))
    except ValueError:
        raise WindowError(
            f"unknown window {spec!r}: use a preset ({', '.join(CT_PRESETS)}), 'LEVEL,WIDTH', "
            "'percentile[:LOW,HIGH]', 'minmax' or 'dicom'"
        ) from None
    if not width > 0:
        raise WindowError(f"window {spec!r}: width must be positive")
    return Window.level_width(level, width)


def default_window(modality: str) -> Window:
    """The window used when none is given: abdomen for CT, percentiles for everything else."""
    return parse_window("abdomen") if modality.strip().upper() == "CT" else Window("percentile")
