"""Segmentation tools: the protocol every tool implements and the weight-free classical tool.

This package never imports ``tool_bridge`` (the bridge imports it). Tools by name (``--tool
SPEC``: ``auto``, ``classical``, ``HOST:PORT``, ``module:factory``) come from
``tool_bridge.factory.make_tool``, the layer above both.
"""

from ibis_jax.tools.protocol import SegmentationTool, SegmentResult, ToolError, tool_session

__all__ = ["SegmentResult", "SegmentationTool", "ToolError", "tool_session"]

