"""The HTML report opened in headless Chromium: a screenshot shows the step cards and overlays."""

import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from data_helpers import write_png
from ibis_jax.agent.overlay import POSITIVE_MARKER
from ibis_jax.cli import main
from ibis_jax.data.shapes import synthetic_shapes

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
         "--hide-scrollbars"]


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get update && apt-get install -y chromium)")
def test_report_renders_steps_in_headless_chromium(tmp_path):
    sample = synthetic_shapes(1, size=48, seed=2)[0]
    image, gt = write_png(tmp_path / "img.png", sample.image), write_png(tmp_path / "gt.png", sample.mask.astype(np.uint8) * 255)
    out = tmp_path / "out"
    assert main(["segment", "--model", "oracle", "--image", str(image), "--gt", str(gt), "--max-steps", "3",
                 "--query", "Segment the shape.", "--out", str(out)]) == 0
    url = (out / "report.html").resolve().as_uri()
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, *FLAGS, "--window-size=1100,1300", f"--screenshot={shot}", url],
                   check=True, timeout=120, capture_output=True)
    dom = subprocess.run([CHROMIUM, *FLAGS, "--dump-dom", url], check=True, timeout=120, capture_output=True,
                         text=True).stdout
    assert 'id="step-1"' in dom and "Positive Point" in dom
    pixels = np.array(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape[:2] == (1300, 1100)
    # The step overlays drew: the blue positive-click marker and the green mask are on screen.
    marker = (np.abs(pixels - np.array(POSITIVE_MARKER)).sum(axis=2) < 30).sum()
    greenish = ((pixels[..., 1] > 150) & (pixels[..., 0] < 100) & (pixels[..., 2] < 100)).sum()
    assert marker > 50 and greenish > 500
    # Keep a copy for a human look when debugging.
    shutil.copy(shot, out / "screenshot.png")
