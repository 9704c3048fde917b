"""Segmentation backends the bridge serves: ``medsam2`` (sam2 + torch) and ``classical``."""

from __future__ import annotations

from tool_bridge.backends.base import Backend, DecodeRequest, Encoded, InProcessTool

BACKENDS = ("medsam2", "classical")


def make_backend(
    name: str,
    *,
    checkpoint: str | None = None,
    model: str = "medsam2",
    device: str = "cpu",
    num_threads: int = 0,
    fuse_decoder: bool = False,
) -> Backend:
    """Builds a backend by name; torch and sam2 are imported only for ``medsam2``."""
    from ibis_jax.tools.protocol import ToolError

    if name == "medsam2":
        if not checkpoint:
            raise ToolError("--backend medsam2 needs --checkpoint PATH (e.g. MedSAM2_latest.pt)")
        from tool_bridge.backends.medsam2 import MedSAM2Backend

        return MedSAM2Backend(
            checkpoint, model=model, device=device, num_threads=num_threads, fuse_decoder=fuse_decoder
        )
    if name == "classical":
        from tool_bridge.backends.classical import ClassicalBackend

        return ClassicalBackend()
    raise ToolError(f"--backend {name!r} is unknown; choose one of {list(BACKENDS)}")


def make_in_process_tool(name: str, **kwargs) -> InProcessTool:
    """An in-process ``SegmentationTool`` over ``make_backend(name, **kwargs)``."""
    return InProcessTool(make_backend(name, **kwargs))


__all__ = ["BACKENDS", "Backend", "DecodeRequest", "Encoded", "InProcessTool", "make_backend", "make_in_process_tool"]
