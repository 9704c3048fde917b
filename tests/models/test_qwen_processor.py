"""The numpy Qwen2-VL processor against transformers' image processors and processor."""

from __future__ import annotations

import numpy as np
import pytest

from ibis_jax.models.qwen2_5_vl.processor import Qwen25VLProcessor, preprocess_images, smart_resize


@pytest.mark.parametrize("hw", [(100, 150), (28, 28), (10, 900), (2000, 1500), (504, 504), (37, 1111)])
def test_smart_resize_matches_transformers(hw):
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as ref

    kw = dict(factor=28, min_pixels=56 * 56, max_pixels=512 * 512)
    assert smart_resize(*hw, **kw) == ref(*hw, **kw)


def test_504_image_gives_324_visual_tokens():
    pv, grid = preprocess_images([np.zeros((504, 504, 3), np.uint8)], max_pixels=512 * 512)
    assert grid.tolist() == [[1, 36, 36]] and pv.shape == (1296, 1176)
    assert int(grid.prod()) // 4 == 324


def test_pixel_values_exact_without_resize():
    pytest.importorskip("torch")
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (56, 84, 3), dtype=np.uint8), rng.integers(0, 256, (112, 28, 3), dtype=np.uint8)]
    ref = Qwen2VLImageProcessor()(images, return_tensors="np")
    pv, grid = preprocess_images(images)
    np.testing.assert_array_equal(grid, ref["image_grid_thw"])
    assert np.abs(pv - ref["pixel_values"]).max() < 1e-5


def test_pixel_values_with_resize_match_pil_backend():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (100, 150, 3), dtype=np.uint8), rng.integers(0, 256, (300, 70, 3), dtype=np.uint8)]
    kw = dict(min_pixels=56 * 56, max_pixels=128 * 128)
    ref = Qwen2VLImageProcessorPil(**kw)(images, return_tensors="np")
    pv, grid = preprocess_images(images, **kw)
    np.testing.assert_array_equal(grid, ref["image_grid_thw"])
    assert np.abs(pv - ref["pixel_values"]).max() < 1e-5


def test_chat_template_multi_turn_multi_image_matches_hf_processor(tok_dir):
    pytest.importorskip("torch")
    from transformers import AutoProcessor

    rng = np.random.default_rng(2)
    im1 = rng.integers(0, 256, (100, 150, 3), dtype=np.uint8)
    im2 = rng.integers(0, 256, (56, 84, 3), dtype=np.uint8)
    msgs = [
        {"role": "user", "content": [{"type": "image", "image": im1}, {"type": "text", "text": "Segment the liver."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "<think>\nok\n</think>\n<action>\nTerminate\n</action>"}]},
        {"role": "user", "content": [{"type": "image", "image": im2}, {"type": "text", "text": "Is the mask right?"}]},
    ]
    ours = Qwen25VLProcessor(tok_dir).apply_chat_template(msgs, add_generation_prompt=True)
    ref = AutoProcessor.from_pretrained(tok_dir, local_files_only=True).apply_chat_template(
        msgs, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="np"
    )
    np.testing.assert_array_equal(ours["input_ids"], ref["input_ids"])
    np.testing.assert_array_equal(ours["attention_mask"], ref["attention_mask"])
    np.testing.assert_array_equal(ours["mm_token_type_ids"], ref["mm_token_type_ids"])
    np.testing.assert_array_equal(ours["image_grid_thw"], ref["image_grid_thw"])
    # im1 is resized: PIL vs torchvision bicubic differ by interpolation rounding only.
    assert np.abs(ours["pixel_values"] - ref["pixel_values"]).max() < 0.05
    n_img = int((ours["input_ids"] == Qwen25VLProcessor(tok_dir).image_token_id).sum())
    assert n_img == int(ours["image_grid_thw"].prod(-1).sum()) // 4


def test_batch_padding_and_text_roundtrip(tok_dir):
    proc = Qwen25VLProcessor(tok_dir, padding_side="left")
    text = "Positive Point (0.4512, 0.4238) then 17 more clicks."
    out = proc([text, "Terminate"])
    assert out["input_ids"].shape[0] == 2
    assert out["attention_mask"][1, 0] == 0 and out["attention_mask"][1, -1] == 1
    ids = out["input_ids"][0][out["attention_mask"][0] == 1]
    assert proc.tokenizer.decode(ids) == text
    assert len(ids) < len(text.encode())  # the BPE merges do something
    with pytest.raises(ValueError, match="image"):
        proc("<|vision_start|><|image_pad|><|vision_end|>")
