import numpy as np
import pytest

from ibis_jax.data.clicks import SimulatedClick, next_click


def _square(size, top, left, side):
    m = np.zeros((size, size), dtype=bool)
    m[top:top + side, left:left + side] = True
    return m


def test_ritm_first_click_is_deepest_interior_point():
    gt = _square(11, 2, 3, 5)  # rows 2..6, cols 3..7: centre (4, 5)
    assert next_click(gt, np.zeros_like(gt)) == SimulatedClick(4, 5, True)


def test_ritm_border_counts_as_boundary():
    # Object touching the left border: without padding the deepest point would sit on the border.
    gt = np.zeros((5, 9), dtype=bool)
    gt[:, :6] = True  # 5 rows x 6 cols, touching top, bottom and left borders
    click = next_click(gt, np.zeros_like(gt), rule="ritm")
    # With the border as boundary, distance at (2, c) is min(3, c+1, 6-c) -> max 3 at c=2 (first).
    assert click == SimulatedClick(2, 2, True)


def test_ibis_rule_has_no_border_padding():
    gt = np.zeros((5, 9), dtype=bool)
    gt[:, :6] = True
    click = next_click(gt, np.zeros_like(gt), rule="ibis")
    # No padding: the border is not a boundary, the deepest pixels are those farthest from col 6.
    assert click.positive and click.col == 0


def test_ritm_tie_goes_negative_and_ibis_tie_goes_positive():
    gt = np.zeros((9, 20), dtype=bool)
    pred = np.zeros((9, 20), dtype=bool)
    gt[2:5, 2:5] = True  # 3x3 missed region: max dist 2
    pred[2:5, 12:15] = True  # 3x3 false-positive region: max dist 2
    ritm = next_click(gt, pred, rule="ritm")
    ibis = next_click(gt, pred, rule="ibis")
    assert ritm == SimulatedClick(3, 13, False)
    assert ibis.positive and (ibis.row, ibis.col) == (3, 3)


def test_ritm_larger_error_wins():
    gt = np.zeros((12, 24), dtype=bool)
    pred = np.zeros((12, 24), dtype=bool)
    gt[1:6, 1:6] = True  # 5x5 FN: dist 3
    pred[1:4, 12:15] = True  # 3x3 FP: dist 2
    assert next_click(gt, pred).positive


def test_ritm_never_clicks_a_pixel_twice():
    gt = _square(9, 2, 2, 5)
    clicked = np.zeros_like(gt)
    seen = set()
    for _ in range(10):
        click = next_click(gt, np.zeros_like(gt), clicked=clicked)
        assert (click.row, click.col) not in seen
        seen.add((click.row, click.col))
        clicked[click.row, click.col] = True
    # The centre first, then the next-deepest pixels in row-major order.
    assert list(seen)[0] == (4, 4) or (4, 4) in seen


def test_nothing_to_click_returns_none():
    gt = _square(8, 1, 1, 4)
    assert next_click(gt, gt.copy()) is None
    assert next_click(gt, gt.copy(), rule="ibis") is None
    only = np.zeros_like(gt)
    only[3, 3] = True
    clicked = only.copy()
    assert next_click(only, np.zeros_like(gt), clicked=clicked) is None


def test_bad_arguments():
    gt = _square(8, 1, 1, 4)
    with pytest.raises(ValueError, match="rule"):
        next_click(gt, gt, rule="random")
    with pytest.raises(ValueError, match="shape"):
        next_click(gt, np.zeros((4, 4), bool))
