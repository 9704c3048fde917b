"""Segmentation tools: the protocol every tool implements and the weight-free classical tool."""

from ibis_jax.tools.protocol import SegmentationTool, SegmentResult, ToolError, tool_session

__all__ = ["SegmentResult", "SegmentationTool", "ToolError", "tool_session"]


def make_tool(spec: str, *, volumes: bool = False) -> SegmentationTool:
    """A tool by name, as the command lines take it (``volumes``: a ``VolumeSegmentationTool`` for
    volume episodes: ``auto`` and ``classical[-tissue]`` in 3D, or ``medsam2-3d:CHECKPOINT``).

    - ``auto``: the classical tool with its preset chosen per episode from the target
      (``tools/auto.py``; the default of the commands);
    - ``classical``: the weight-free random-walker tool, in process, for objects with boundaries;
      ``classical-tissue``: the same with the seeds' colour model, for tissue-class targets;
    - ``HOST:PORT[,HOST:PORT...]`` (optionally ``grpc://``-prefixed): a ``tool_bridge`` server, or
      several for load balancing, through the replaying bridge client;
    - ``module:factory``: any zero-argument callable returning a ``SegmentationTool``.
    """
    if spec == "auto":
        from ibis_jax.tools.auto import AutoTool

        return AutoTool()
    if volumes:
        return _volume_tool(spec)
    if spec in ("classical", "classical-tissue"):
        from ibis_jax.tools.classical import TISSUE, ClassicalTool, ClassicalToolConfig

        return ClassicalTool(TISSUE if spec == "classical-tissue" else ClassicalToolConfig())
    addresses = [a.removeprefix("grpc://") for a in spec.split(",")]
    if all(a.rsplit(":", 1)[-1].isdigit() for a in addresses) and ":" in spec:
        from tool_bridge.client import BridgeClient

        return BridgeClient(addresses)
    if ":" in spec:
        from ibis_jax.plugins import load_object

        try:
            factory = load_object(spec, what="--tool")
        except (ImportError, AttributeError, FileNotFoundError) as e:
            raise ValueError(f"{e}; give 'auto', 'classical', a bridge address HOST:PORT, or an importable "
                             "module:factory") from None
        return factory()
    raise ValueError(
        f"unknown tool {spec!r}: use 'auto', 'classical', 'classical-tissue', a bridge address HOST:PORT, or 'module:factory'"
    )


VOLUME_TOOLS = ("'auto' (the classical preset the target needs; default), 'classical' (3D random walker), "
                "'classical-tissue' (with the intensity prior, for tissue classes such as white matter) or "
                "'medsam2-3d:CHECKPOINT' (sam2's video predictor, in process)")


def _volume_tool(spec: str):
    from ibis_jax.tools.volume import TISSUE_3D, ClassicalVolumeTool

    if spec == "classical":
        return ClassicalVolumeTool()
    if spec == "classical-tissue":
        return ClassicalVolumeTool(TISSUE_3D)
    if spec.startswith("medsam2-3d:"):
        from tool_bridge.backends.medsam2_video import MedSAM2VolumeTool

        return MedSAM2VolumeTool(spec.split(":", 1)[1])
    raise ValueError(f"--tool {spec!r} for a volume: use {VOLUME_TOOLS}")
