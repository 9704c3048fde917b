import numpy as np
import pytest

from ibis_jax.metrics import dice, interactive_summary, iou, miou_at_k, noc, nof


def test_iou_and_dice_hand_computed():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2, :2] = True  # 4 px
    b[:2, 1:3] = True  # 4 px, overlap 2
    assert iou(a, b) == pytest.approx(2 / 6)
    assert dice(a, b) == pytest.approx(4 / 8)
    assert iou(a, a) == 1.0 and dice(a, a) == 1.0
    empty = np.zeros((4, 4), bool)
    assert iou(empty, empty) == 1.0 and dice(empty, empty) == 1.0
    assert iou(a, empty) == 0.0
    with pytest.raises(ValueError, match="shape"):
        iou(a, np.zeros((3, 4), bool))


def test_noc_nof_miou():
    curves = [[0.5, 0.86, 0.91], [0.95], [0.2, 0.3]]
    assert noc(curves[0], 0.85) == 2
    assert noc(curves[0], 0.90) == 3
    assert noc(curves[2], 0.85, max_clicks=20) == 20
    assert noc([0.1] * 5 + [0.95], 0.9, max_clicks=5) == 5  # reached only past the budget
    assert nof(curves, 0.90) == 1
    assert miou_at_k(curves, 1) == pytest.approx((0.5 + 0.95 + 0.2) / 3)
    assert miou_at_k(curves, 3) == pytest.approx((0.91 + 0.95 + 0.3) / 3)  # short curves keep last
    summary = interactive_summary(curves, max_clicks=20)
    assert summary["NoC@85"] == pytest.approx((2 + 1 + 20) / 3)
    assert summary["NoF@90"] == 1.0
    with pytest.raises(ValueError):
        miou_at_k(curves, 0)
