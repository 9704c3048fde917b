import numpy as np
import pytest

from ibis_jax.data.images import ImageError, check_mask, to_rgb_uint8
from ibis_jax.data.rle import RLEError, decode_rle, encode_rle


def test_rle_round_trip_random_masks():
    rng = np.random.default_rng(0)
    for _ in range(100):
        mask = rng.random((rng.integers(1, 40), rng.integers(1, 40))) < rng.random()
        assert np.array_equal(decode_rle(encode_rle(mask)), mask)


def test_rle_matches_pycocotools():
    coco = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(1)
    for _ in range(50):
        mask = rng.random((rng.integers(1, 50), rng.integers(1, 50))) < 0.4
        ours = encode_rle(mask)
        theirs = coco.encode(np.asfortranarray(mask.astype(np.uint8)))
        assert ours["counts"] == theirs["counts"].decode()
        assert np.array_equal(decode_rle(theirs), mask)


def test_rle_known_values_and_errors():
    assert encode_rle(np.ones((3, 3), bool)) == {"size": [3, 3], "counts": "09"}
    assert decode_rle({"size": [2, 2], "counts": [1, 2, 1]}).tolist() == [[False, True], [True, False]]
    with pytest.raises(RLEError, match="sum"):
        decode_rle({"size": [2, 2], "counts": [1, 2]})
    with pytest.raises(RLEError):
        decode_rle({"counts": "09"})


def test_to_rgb_uint8_rules():
    gray16 = np.array([[0, 1000], [2000, 4000]], dtype=np.uint16)
    out = to_rgb_uint8(gray16)
    assert out.shape == (2, 2, 3) and out.dtype == np.uint8
    assert out[..., 0].tolist() == [[0, 64], [128, 255]]
    unit = np.array([[0.0, 0.5], [1.0, 0.25]])
    assert to_rgb_uint8(unit)[..., 1].tolist() == [[0, 128], [255, 64]]
    rgba = np.zeros((3, 3, 4), np.uint8)
    assert to_rgb_uint8(rgba).shape == (3, 3, 3)
    with pytest.raises(ImageError, match="NaN"):
        to_rgb_uint8(np.array([[np.nan, 1.0], [0.0, 1.0]]))
    with pytest.raises(ImageError, match="shape"):
        to_rgb_uint8(np.zeros((2, 2, 2, 2)))


def test_check_mask_rules():
    image_shape = (4, 5, 3)
    assert check_mask(np.full((4, 5), 255, np.uint8), image_shape).all()
    assert check_mask(np.zeros((4, 5, 1), np.uint8), image_shape).shape == (4, 5)
    with pytest.raises(ImageError, match="differs from image shape"):
        check_mask(np.zeros((5, 4), bool), image_shape)
    with pytest.raises(ImageError, match="not binary"):
        check_mask(np.array([[0, 1, 2, 0, 0]] * 4), image_shape)
    with pytest.raises(ImageError, match="empty"):
        check_mask(np.zeros((4, 5), bool), image_shape, allow_empty=False)
    with pytest.raises(ImageError, match="NaN"):
        check_mask(np.full((4, 5), np.nan), image_shape)
