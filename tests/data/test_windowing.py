import numpy as np
import pytest

from ibis_jax.data.windowing import (
    CT_PRESETS,
    WindowError,
    default_window,
    parse_window,
    window_level_width,
    window_minmax,
    window_percentile,
)


def test_level_width_hand_computed():
    # abdomen L=40 W=400 -> [-160, 240]; v -> round((v + 160) / 400 * 255)
    hu = np.array([-1000, -160, -60, 40, 100, 240, 3000], dtype=np.float64)
    out = window_level_width(hu, 40, 400)
    # -60: 100/400*255 = 63.75 -> 64; 40: 127.5 -> 128 (rint, half to even); 100: 165.75 -> 166
    assert out.tolist() == [0, 0, 64, 128, 166, 255, 255]
    assert out.dtype == np.uint8


def test_presets_by_name():
    hu = np.array([-1350.0, -600.0, 150.0])  # lung L=-600 W=1500 -> [-1350, 150]
    assert parse_window("lung").apply(hu).tolist() == [0, 128, 255]  # 127.5 -> 128
    bone = parse_window("bone")  # L=400 W=1800 -> [-500, 1300]
    assert bone.apply(np.array([-500.0, 400.0, 850.0])).tolist() == [0, 128, 191]  # 191.25 -> 191
    assert parse_window("brain").apply(np.array([0.0, 40.0, 80.0])).tolist() == [0, 128, 255]
    assert set(CT_PRESETS) >= {"abdomen", "lung", "bone", "brain", "soft_tissue", "liver"}


def test_percentile_hand_computed():
    values = np.arange(101, dtype=np.float64)  # percentiles equal the values
    out = window_percentile(values, 10, 90)
    # clip to [10, 90], scale by 255/80: 50 -> 127.5 -> 128; 30 -> 63.75 -> 64
    assert out[0] == 0 and out[10] == 0 and out[90] == 255 and out[100] == 255
    assert out[50] == 128 and out[30] == 64


def test_percentile_nonzero_ignores_background():
    values = np.concatenate([np.zeros(900), np.linspace(100, 200, 101)])
    out = window_percentile(values, 0, 100, nonzero=True)
    # low percentile over non-zero values is 100, so the background clips to 0 and 150 -> 127.5 -> 128
    assert out[0] == 0 and out[900 + 50] == 128 and out[-1] == 255


def test_minmax_and_constant():
    assert window_minmax(np.array([10.0, 20.0, 30.0])).tolist() == [0, 128, 255]
    assert window_percentile(np.full(5, 7.0)).tolist() == [0] * 5


def test_parse_specs_and_errors():
    w = parse_window("40,400")
    assert (w.kind, w.level, w.width) == ("level_width", 40.0, 400.0)
    assert parse_window("percentile:1,99").describe() == "percentile:1,99"
    assert parse_window("abdomen").describe() == "abdomen"
    assert default_window("CT").name == "abdomen" and default_window("MRI").kind == "percentile"
    for bad in ("nonsense", "40,-1", "percentile:99,1"):
        with pytest.raises(WindowError):
            parse_window(bad)
    with pytest.raises(WindowError, match="NaN"):
        window_level_width(np.array([1.0, np.nan]), 40, 400, where="vol.nii.gz")
