"""Segmentation tools: the protocol every tool implements and the weight-free classical tool."""

from ibis_jax.tools.protocol import SegmentationTool, SegmentResult, ToolError, tool_session

__all__ = ["SegmentResult", "SegmentationTool", "ToolError", "tool_session"]
