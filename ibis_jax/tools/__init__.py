"""Segmentation tools: the protocol every tool implements and the weight-free classical tool."""

from ibis_jax.tools.protocol import SegmentationTool, SegmentResult, ToolError, tool_session

__all__ = ["SegmentResult", "SegmentationTool", "ToolError", "tool_session"]


def bridge_addresses(spec: str) -> list[str] | None:
    """``HOST:PORT[,HOST:PORT...]`` (each optionally ``grpc://``-prefixed) as a list; ``None`` when
    ``spec`` is not a list of bridge addresses (e.g. ``module:factory``)."""
    addresses = [a.removeprefix("grpc://") for a in spec.split(",")]
    if ":" in spec and all(a.rsplit(":", 1)[-1].isdigit() for a in addresses):
        return addresses
    return None


def make_tool(spec: str) -> SegmentationTool:
    """A tool by name, as the command lines take it.

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
