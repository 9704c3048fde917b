"""The medsam2 backend: the 512-px build recipe, strict checkpoint loading, exactness vs sam2."""

from __future__ import annotations

import numpy as np
import pytest

from bridge_helpers import make_clicks, make_images
from ibis_jax.tools.protocol import ToolError

torch = pytest.importorskip("torch")
pytest.importorskip("sam2")

from sam2.build_sam import build_sam2  # noqa: E402
from sam2.sam2_image_predictor import SAM2ImagePredictor  # noqa: E402

from tool_bridge.backends.base import DecodeRequest, InProcessTool  # noqa: E402
from tool_bridge.backends.medsam2 import MEDSAM2, MedSAM2Backend, build_model  # noqa: E402


def reference_episode(checkpoint, image, clicks):
    """The docs/design.md section 1 tool call, written against sam2 directly (sam2's own checkpoint loader)."""
    model = build_sam2(MEDSAM2.config_file, checkpoint, device="cpu",
                       hydra_overrides_extra=list(MEDSAM2.overrides))
    predictor = SAM2ImagePredictor(model)
    predictor._bb_feat_sizes = [(128, 128), (64, 64), (32, 32)]
    predictor.set_image(image)
    points, labels, prev, out = [], [], None, []
    for point, label in clicks:
        points.append(point)
        labels.append(label)
        masks, scores, low_res = predictor.predict(
            point_coords=np.array(points, np.float32), point_labels=np.array(labels),
            mask_input=prev, multimask_output=True)
        best = int(np.argmax(scores))
        prev = low_res[best][None]
        out.append((masks[best] > 0.5, float(scores[best])))
    return out


def test_512_build_follows_the_override_recipe(backend, checkpoint):
    model = backend.predictor.model
    assert model.image_size == 512
    # RoPE tables are sized from feat_sizes: 32x32 positions at 512 px (64x64 at stock 1024 px).
    layer = model.memory_attention.layers[0]
    assert layer.self_attn.freqs_cis.shape[0] == 32 * 32
    assert layer.cross_attn_image.freqs_cis.shape[0] == 32 * 32
    assert model.sam_prompt_encoder.image_embedding_size == (32, 32)
    assert backend.predictor._bb_feat_sizes == [(128, 128), (64, 64), (32, 32)]
    assert backend.low_res_side == 128
    # Strict load: every tensor is the checkpoint's.
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]
    loaded = model.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[key], loaded[key]) for key in saved)


def test_steps_equal_direct_predictor_bit_for_bit(backend, checkpoint):
    image = make_images(1, seed=11)[0]
    clicks = make_clicks(4, seed=11)
    expected = reference_episode(checkpoint, image, clicks)
    tool = InProcessTool(backend)
    tool.open("e", image)
    points, labels, prev = [], [], None
    for (point, label), (mask, score) in zip(clicks, expected):
        points.append(point)
        labels.append(label)
        result = tool.segment("e", np.array(points), np.array(labels), prev)
        prev = result.logits
        assert result.logits.shape == (1, 128, 128)
        assert result.mask.shape == image.shape[:2] and result.mask.dtype == bool
        np.testing.assert_array_equal(result.mask, mask)
        assert result.score == score
    tool.close("e")
    # The masks change between steps: the check above compares non-trivial answers.
    assert len({m.tobytes() for m, _ in expected}) > 1


def test_batched_encode_equals_single_encode(backend):
    images = make_images(2, seed=5)
    single = backend.encode(images[:1])[0]
    batched = backend.encode(images)
    assert torch.equal(single.payload["image_embed"], batched[0].payload["image_embed"])
    for a, b in zip(single.payload["high_res_feats"], batched[0].payload["high_res_feats"]):
        assert torch.equal(a, b)
    assert single.nbytes == batched[1].nbytes == 4 * 256 * (32 * 32) + 4 * 32 * 128 * 128 + 4 * 64 * 64 * 64
    points, labels = np.array([[20.0, 30.0]], np.float32), np.array([1], np.int32)
    a = backend.decode([DecodeRequest(single, points, labels, None)])[0]
    b = backend.decode([DecodeRequest(batched[0], points, labels, None)])[0]
    np.testing.assert_array_equal(a.mask, b.mask)
    assert a.score == b.score


def test_checkpoint_with_missing_keys_is_a_clear_error(checkpoint, tmp_path):
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]
    dropped = sorted(state)[:3]
    for key in dropped:
        del state[key]
    broken = tmp_path / "broken.pt"
    torch.save({"model": state}, broken)
    with pytest.raises(ToolError, match="3 missing keys") as error:
        build_model(MEDSAM2, str(broken))
    assert dropped[0] in str(error.value)


def test_checkpoint_without_model_entry_or_wrong_config(checkpoint, tmp_path):
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]
    bare = tmp_path / "bare.pt"
    torch.save(state, bare)
    with pytest.raises(ToolError, match="no 'model' entry"):
        build_model(MEDSAM2, str(bare))
    with pytest.raises(ToolError, match="does not (fit|match) config .*hiera_s"):
        MedSAM2Backend(checkpoint, model="sam2.1_hiera_s")
    with pytest.raises(ToolError, match="--model 'hiera_xl' is unknown"):
        MedSAM2Backend(checkpoint, model="hiera_xl")
    with pytest.raises(ToolError, match="is not a file"):
        build_model(MEDSAM2, str(tmp_path / "nope.pt"))


def test_bad_prev_logits_shape_is_refused(backend):
    with pytest.raises(ToolError, match=r"expected \[1, 128, 128\]"):
        backend.check_logits(np.zeros((1, 256, 256), np.float32))


def test_fused_decoder_agrees_to_float_rounding(backend):
    # Opt-in (--fuse-decoder): one decoder pass for a batch of steps. It reorders float
    # reductions, so it is checked to rounding, which is why it is off by default.
    encoded = backend.encode(make_images(2, seed=9))
    points = [np.array([[10, 12], [40, 30]], np.float32), np.array([[5, 5], [60, 40]], np.float32)]
    labels = np.array([1, 0], np.int32)
    first = backend.decode([DecodeRequest(e, p[:1], labels[:1], None) for e, p in zip(encoded, points)])
    requests = [DecodeRequest(e, p, labels, r.logits) for e, p, r in zip(encoded, points, first)]
    separate = backend.decode(requests)
    backend.fuse_decoder = True
    try:
        fused = backend.decode(requests)
    finally:
        backend.fuse_decoder = False
    for a, b in zip(separate, fused):
        np.testing.assert_array_equal(a.mask, b.mask)
        assert abs(a.score - b.score) < 1e-5
        np.testing.assert_allclose(a.logits, b.logits, atol=1e-4)


def test_stock_sam21_preset_keeps_1024_px(checkpoint):
    # Hiera-T's weights do not depend on the resolution, so the random MedSAM2 checkpoint loads
    # into the stock 1024-px build too; only the sizes differ.
    stock = MedSAM2Backend(checkpoint, model="sam2.1_hiera_t")
    assert stock.predictor.model.image_size == 1024 and stock.image_size == 1024
    assert stock.predictor._bb_feat_sizes == [(256, 256), (128, 128), (64, 64)]
    assert stock.predictor.model.memory_attention.layers[0].self_attn.freqs_cis.shape[0] == 64 * 64
    assert stock.low_res_side == 256
