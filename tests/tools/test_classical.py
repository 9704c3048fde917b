import numpy as np
import pytest

from ibis_jax.agent.oracle import run_oracle
from ibis_jax.data.shapes import synthetic_shapes
from ibis_jax.tools import SegmentationTool, ToolError
from ibis_jax.tools.classical import ClassicalTool
from tool_bridge.factory import make_tool


def test_classical_tool_implements_the_protocol():
    assert isinstance(ClassicalTool(), SegmentationTool)
    assert isinstance(make_tool("classical"), ClassicalTool)
    with pytest.raises(ValueError, match="unknown tool"):
        make_tool("sam9")


def test_one_click_on_a_flat_object_segments_it():
    image = np.full((64, 64, 3), 40, np.uint8)
    image[20:44, 16:40] = 200
    gt = np.zeros((64, 64), bool)
    gt[20:44, 16:40] = True
    tool = ClassicalTool()
    tool.open("e", image)
    result = tool.segment("e", np.array([[28.0, 32.0]]), np.array([1]), None)
    assert result.mask.shape == (64, 64) and result.mask.dtype == bool
    assert (result.mask & gt).sum() / (result.mask | gt).sum() > 0.95
    assert 0.5 < result.score <= 1.0
    # A negative click inside the same flat object splits it between the two seeds.
    result = tool.segment("e", np.array([[22.0, 32.0], [34.0, 32.0]]), np.array([1, 0]), result.logits)
    assert not result.mask[32, 34] and result.mask[32, 22]
    assert 0.3 * gt.sum() < result.mask.sum() < 0.7 * gt.sum()
    tool.close("e")


def test_oracle_clicks_reach_useful_masks_on_shapes():
    tool = ClassicalTool()
    finals = [run_oracle(tool, s.image, s.mask, max_clicks=8).click_iou_curve[-1]
              for s in synthetic_shapes(4, size=96, seed=5)]
    assert np.mean(finals) > 0.75, finals


def test_bad_requests_are_clear_errors():
    tool = ClassicalTool()
    image = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(ToolError, match="unknown episode"):
        tool.segment("nope", np.array([[1.0, 1.0]]), np.array([1]), None)
    tool.open("e", image)
    with pytest.raises(ToolError, match="outside"):
        tool.segment("e", np.array([[16.0, 1.0]]), np.array([1]), None)
    with pytest.raises(ToolError, match="labels"):
        tool.segment("e", np.array([[1.0, 1.0]]), np.array([2]), None)
    with pytest.raises(ToolError, match="NaN"):
        tool.segment("e", np.array([[np.nan, 1.0]]), np.array([1]), None)
    with pytest.raises(ToolError, match="uint8"):
        tool.open("f", image.astype(np.uint16))
    with pytest.raises(ToolError, match="RGB"):
        tool.open("g", image[..., 0])
