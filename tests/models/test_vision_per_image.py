"""Equal images encoded as a batch (`vision_layout(per_image=True)`: each chip its own images, a
few at a time) give exactly the packed tower's features."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ibis_jax.models.qwen2_5_vl import Qwen25VL, Qwen25VLConfig, vision_layout


@pytest.mark.parametrize("at_once", [8, 2])
def test_per_image_layout_equals_packed(at_once):
    cfg = Qwen25VLConfig.tiny()
    model = Qwen25VL(cfg, rngs=nnx.Rngs(0))
    model.visual.IMAGES_AT_ONCE = at_once  # 2: three sequential groups of two images
    grid = np.array([[1, 8, 8]] * 6)
    pv = jnp.asarray(np.random.default_rng(0).standard_normal((6 * 64, cfg.vision.patch_dim)), jnp.float32)
    packed = model.image_features(pv, vision_layout(grid, cfg.vision))[0]
    per_image = model.image_features(pv, vision_layout(grid, cfg.vision, per_image=True))[0]
    np.testing.assert_array_equal(np.asarray(per_image), np.asarray(packed))
    # mixed sizes fall back to the packed layout
    mixed = vision_layout(np.array([[1, 8, 8], [1, 4, 8]]), cfg.vision, per_image=True)
    assert mixed.rope_hw.ndim == 2
