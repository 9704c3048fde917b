"""Volume tools behind the server: any ``VolumeSegmentationTool`` under server-side handles.

The server keeps one handle per volume episode: ``open`` hands the volume to the tool once,
``segment`` runs all clicks so far with the previous step's state (the tool's ``logits``, kept by
the server), ``close`` frees it. ``nbytes`` is what the episode holds in the tool, for the
server's byte-capped cache (MedSAM2 3D: the frames plus every frame's cached features, which grow
as propagation reaches more slices, so it is measured again after each step).

Volume backends by name (``make_volume_backend``): ``classical`` (the 3D random walker with the
header's spacing), ``classical-tissue`` (with the intensity prior) and ``medsam2`` (sam2's video
predictor, ``backends/medsam2_video.py``). All calls come from the server's one model thread.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from ibis_jax.tools.protocol import ToolError
from ibis_jax.tools.volume import VolumeSegmentResult, VolumeSegmentationTool

VOLUME_BACKENDS = ("classical", "classical-tissue", "medsam2")


def _held_bytes(obj: Any, seen: set[int] | None = None) -> int:
    """Bytes of the numpy arrays and torch tensors reachable through dicts, lists and tuples
    (each storage counted once)."""
    seen = set() if seen is None else seen
    if isinstance(obj, np.ndarray):
        key = obj.__array_interface__["data"][0]
        if key in seen:
            return 0
        seen.add(key)
        return obj.nbytes
    if hasattr(obj, "untyped_storage") and hasattr(obj, "element_size"):  # a torch tensor
        storage = obj.untyped_storage()
        key = storage.data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return storage.nbytes()
    if isinstance(obj, dict):
        return sum(_held_bytes(value, seen) for value in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_held_bytes(value, seen) for value in obj)
    return 0


class VolumeBackend:
    """Wraps a ``VolumeSegmentationTool`` (not thread safe: the server's model thread calls it)."""

    def __init__(self, tool: VolumeSegmentationTool, name: str, *, checkpoint_sha256: str = "",
                 device: str = "cpu") -> None:
        self.tool = tool
        self.name = name
        self.checkpoint_sha256 = checkpoint_sha256
        self.device = device
        self._ids = itertools.count()

    def open(self, volume: np.ndarray, spacing: tuple[float, float, float]) -> str:
        handle = f"{self.name}-{next(self._ids)}"
        self.tool.open(handle, volume, spacing)
        return handle

    def segment(self, handle: str, points: np.ndarray, labels: np.ndarray,
                prev_logits: np.ndarray | None) -> VolumeSegmentResult:
        return self.tool.segment(handle, points, labels, prev_logits)

    def close(self, handle: str) -> None:
        self.tool.close(handle)

    def nbytes(self, handle: str) -> int:
        """Memory the tool holds for the episode (the tools' per-episode dicts, measured)."""
        for attribute in ("_volumes", "_states"):  # ClassicalVolumeTool, MedSAM2VolumeTool
            held = getattr(self.tool, attribute, None)
            if isinstance(held, dict) and handle in held:
                return _held_bytes(held[handle])
        return 0


def make_volume_backend(name: str, *, checkpoint: str | None = None, model: str = "medsam2",
                        device: str = "cpu") -> VolumeBackend:
    """A volume backend by name; torch and sam2 are imported only for ``medsam2``."""
    if name in ("classical", "classical-tissue"):
        from ibis_jax.tools.volume import TISSUE_3D, ClassicalVolumeTool, ClassicalVolumeToolConfig

        config = TISSUE_3D if name == "classical-tissue" else ClassicalVolumeToolConfig()
        return VolumeBackend(ClassicalVolumeTool(config), f"{name}-3d")
    if name == "medsam2":
        if not checkpoint:
            raise ToolError("the medsam2 volume backend needs --checkpoint PATH (e.g. MedSAM2_latest.pt)")
        from tool_bridge.backends.medsam2 import file_sha256, require_sam2

        require_sam2()
        from tool_bridge.backends.medsam2_video import MedSAM2VolumeTool

        tool = MedSAM2VolumeTool(checkpoint, model=model, device=device)
        return VolumeBackend(tool, f"{model}-3d", checkpoint_sha256=file_sha256(checkpoint), device=device)
    raise ToolError(f"--volume-backend {name!r} is unknown; choose one of {list(VOLUME_BACKENDS)} or none")
