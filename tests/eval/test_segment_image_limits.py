"""segment on extreme images: any aspect ratio gives bounded report/GIF panels (a 2 x 5000 px
input used to end in an OverflowError from a 640,000 px wide GIF frame), and an input over the
pixel limit is refused from its header with one line naming the file, its size and the flag."""

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from data_helpers import write_png
from ibis_jax.cli import main
from ibis_jax.data.images import ImageError, check_pixels
from ibis_jax.data.sources.base import SourceError, read_image_file
from ibis_jax.report.pictures import MAX_PANEL_ASPECT, MIN_PANEL_WIDTH, labelled_panel


def _header_only_png(path, width, height):
    """A PNG whose header says ``width x height`` (RGB) with almost no pixel data: opening it is
    cheap, decoding it would fail, so a refusal naming the size proves nothing was decoded."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 32))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("shape", [(2, 5000), (5000, 2), (3, 3), (100, 401)])
def test_panels_are_bounded_for_any_aspect_ratio(shape):
    panel = labelled_panel(np.full((*shape, 3), 128, np.uint8), "t=1", 256)
    assert panel.shape[0] == 256 + 18 and panel.dtype == np.uint8
    assert min(MIN_PANEL_WIDTH, 4 * 256) <= panel.shape[1] <= MAX_PANEL_ASPECT * 256
    if shape == (100, 401):  # just over 4:1: the width is the cap, the picture letterboxed
        assert panel.shape[1] == 1024 and (panel[18:, :, 0] == 0).any()
    plain = labelled_panel(np.full((64, 48, 3), 9, np.uint8), "x", 192)  # ordinary images: as before
    assert plain.shape == (210, 144, 3) and (plain[18:] == 9).all()


@pytest.mark.parametrize("shape", [(2, 5000), (5000, 2)])
def test_segment_writes_a_bounded_gif_and_report_for_a_thin_image(tmp_path, shape):
    image = np.zeros((*shape, 3), np.uint8)
    gt = np.zeros(shape, np.uint8)
    rows, cols = shape
    image[: max(1, rows // 2), : max(1, cols // 2)] = 220  # a bright block, its mask the target
    gt[: max(1, rows // 2), : max(1, cols // 2)] = 255
    out = tmp_path / "out"
    code = main(["segment", "--tool", "classical", "--max-steps", "2", "--model", "oracle",
                 "--image", str(write_png(tmp_path / "thin.png", image)), "--gt", str(write_png(tmp_path / "gt.png", gt)),
                 "--query", "Segment the block.", "--out", str(out)])
    assert code == 0
    with Image.open(out / "episode.gif") as gif:
        assert gif.size[0] <= 4 * 256 and gif.size[1] == 256 + 18
    assert np.array(Image.open(out / "mask.png")).shape == shape
    assert (out / "report.html").stat().st_size < 2_000_000


def test_an_input_over_the_pixel_limit_is_refused_from_its_header(tmp_path, capsys):
    huge = _header_only_png(tmp_path / "huge.png", 12000, 12000)
    with pytest.raises(SourceError) as error:
        read_image_file(huge, max_pixels=50_000_000)
    assert error.value.reason == "too_large"
    assert "12000 x 12000 px = 144 megapixels" in str(error.value) and "--max-pixels" in str(error.value)
    out = tmp_path / "out"
    code = main(["segment", "--tool", "classical", "--model", "oracle", "--image", str(huge),
                 "--gt", str(huge), "--query", "Segment it.", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "\n" not in err and "Traceback" not in err
    assert str(huge) in err and "144 megapixels" in err and "over the input limit of 50 megapixels" in err
    assert "--max-pixels" in err
    assert not out.exists()


def test_the_pixel_limit_is_configurable(tmp_path, capsys):
    small = write_png(tmp_path / "small.png", np.full((40, 50, 3), 100, np.uint8))
    gt = np.zeros((40, 50), np.uint8)
    gt[10:25, 12:30] = 255
    args = ["segment", "--tool", "classical", "--model", "oracle", "--max-steps", "1", "--image", str(small),
            "--gt", str(write_png(tmp_path / "gt.png", gt)),
            "--query", "Segment it.", "--out", str(tmp_path / "out")]
    assert main([*args, "--max-pixels", "1000"]) == 1
    assert "50 x 40 px = 0.002 megapixels is over the input limit of 0.001 megapixels" in capsys.readouterr().err
    assert main([*args, "--max-pixels", "0"]) == 0  # 0: no limit
    with pytest.raises(ImageError, match=r"where: 3 x 2 px .* raise it with --flag"):
        check_pixels(2, 3, where="where", max_pixels=5, flag="--flag")
    check_pixels(2, 3, where="where", max_pixels=None)
