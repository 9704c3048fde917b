"""Tools by the names the command lines take (``--tool SPEC``), in process or over the bridge.

This is the one place that knows every kind of tool, so it sits above both ``ibis_jax.tools``
(the protocol and the in-process tools) and the bridge client: ``ibis_jax.tools`` never imports
``tool_bridge``; synthesis, evaluation and the commands import :func:`make_tool` from here. The
client, the MedSAM2 video tool and ``module:factory`` plug-ins are imported only when named.
"""

from __future__ import annotations

from ibis_jax.tools.protocol import SegmentationTool

VOLUME_TOOLS = ("'auto' (the classical preset the target needs; default), 'classical' (3D random walker), "
                "'classical-tissue' (with the intensity prior, for tissue classes such as white matter), "
                "'medsam2-3d:CHECKPOINT' (sam2's video predictor, in process) or a tool server HOST:PORT "
                "(its volume backend)")


def bridge_addresses(spec: str) -> list[str] | None:
    """``HOST:PORT[,HOST:PORT...]`` (each optionally ``grpc://``-prefixed) as a list; ``None`` when
    ``spec`` is not a list of bridge addresses (e.g. ``module:factory``)."""
    addresses = [a.removeprefix("grpc://") for a in spec.split(",")]
    if ":" in spec and all(a.rsplit(":", 1)[-1].isdigit() for a in addresses):
        return addresses
    return None


def make_tool(spec: str, *, volumes: bool = False, slice_rule: str = "changed") -> SegmentationTool:
    """A tool by name, as the command lines take it.

    - ``auto``: the classical tool with its preset chosen per episode from the target
      (``ibis_jax/tools/auto.py``; the default of the commands);
    - ``classical``: the weight-free random-walker tool, in process, for objects with boundaries;
      ``classical-tissue``: the same with the seeds' colour model, for tissue-class targets;
    - ``HOST:PORT[,HOST:PORT...]`` (optionally ``grpc://``-prefixed): a ``tool_bridge`` server, or
      several for load balancing, through the replaying bridge client;
    - ``module:factory``: any zero-argument callable returning a ``SegmentationTool``.

    ``volumes``: a ``VolumeSegmentationTool`` for volume episodes instead (:data:`VOLUME_TOOLS`);
    a bridge volume tool brings back the tool's probability (``uint8``) only for the ``uncertain``
    ``slice_rule``, its one reader.
    """
    if spec == "auto":
        from ibis_jax.tools.auto import AutoTool

        return AutoTool()
    if volumes:
        return _volume_tool(spec, slice_rule)
    if spec in ("classical", "classical-tissue"):
        from ibis_jax.tools.classical import TISSUE, ClassicalTool, ClassicalToolConfig

        return ClassicalTool(TISSUE if spec == "classical-tissue" else ClassicalToolConfig())
    addresses = bridge_addresses(spec)
    if addresses:
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


def _volume_tool(spec: str, slice_rule: str):
    from ibis_jax.tools.volume import TISSUE_3D, ClassicalVolumeTool

    if spec == "classical":
        return ClassicalVolumeTool()
    if spec == "classical-tissue":
        return ClassicalVolumeTool(TISSUE_3D)
    if spec.startswith("medsam2-3d:"):
        from tool_bridge.backends.medsam2_video import MedSAM2VolumeTool

        return MedSAM2VolumeTool(spec.split(":", 1)[1])
    addresses = bridge_addresses(spec)
    if addresses:
        from tool_bridge.client import BridgeVolumeTool

        return BridgeVolumeTool(addresses, volume_probability="uint8" if slice_rule == "uncertain" else "none")
    raise ValueError(f"--tool {spec!r} for a volume: use {VOLUME_TOOLS}")
