"""Segmentation tools: the protocol every tool implements and the weight-free classical tool.

This package never imports ``tool_bridge`` (the bridge imports it). Tools by name (``--tool
SPEC``: ``auto``, ``classical``, ``HOST:PORT``, ``module:factory``) come from
``tool_bridge.factory.make_tool``, the layer above both.
"""

from ibis_jax.tools.protocol import SegmentationTool, SegmentResult, ToolError, tool_session

__all__ = ["SegmentResult", "SegmentationTool", "ToolError", "tool_session"]


def __getattr__(name: str):
    # Transitional, for ibis_jax/commands/grpo.py only (being rewritten elsewhere; it still says
    # ``from ibis_jax.tools import make_tool``). Delete once it imports tool_bridge.factory.
    if name == "make_tool":
        from tool_bridge.factory import make_tool

        return make_tool
    raise AttributeError(f"module 'ibis_jax.tools' has no attribute {name!r}")
