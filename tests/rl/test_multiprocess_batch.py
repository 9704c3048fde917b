"""A process's GRPO micro-batches padded to the shapes of the largest share over processes
(`agree_micro_batches`), with the process count and the other process's shapes stubbed: the
padding rows repeat the last row and its image with no loss, weight or advantage."""

import numpy as np

from ibis_jax.rl import trainer


def _arrays(rows, length, per_image=4, dim=3):
    rng = np.random.default_rng(rows)
    return {
        "input_ids": rng.integers(1, 50, (1, rows, length)).astype(np.int32),
        "attention_mask": np.ones((1, rows, length), np.int32),
        "targets": rng.integers(1, 50, (1, rows, length)).astype(np.int32),
        "loss_mask": np.ones((1, rows, length), np.float32),
        "advantages": np.full((1, rows), 0.5, np.float32),
        "row_weights": np.full((1, rows), 0.1, np.float32),
        "pixel_values": rng.normal(size=(1, rows * per_image, dim)).astype(np.float32),
        "image_grid_thw": np.tile(np.asarray([[[1, 2, 2]]]), (1, rows, 1)),
    }


def test_agree_pads_rows_and_length_to_the_largest_share(monkeypatch):
    import jax

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    # this process: 2 rows of 8; the other: 4 rows of 16
    monkeypatch.setattr(trainer.core, "gather_rows", lambda local, n: np.concatenate([local, [[4, 16, 1, 2, 2]]]))
    arrays, sampler = _arrays(2, 8), np.ones((1, 2, 8), np.float32)
    out, lp = trainer.agree_micro_batches(arrays, sampler)
    assert out["input_ids"].shape == out["loss_mask"].shape == lp.shape == (1, 4, 16)
    np.testing.assert_array_equal(out["input_ids"][0, :2, :8], arrays["input_ids"][0])
    assert not out["input_ids"][0, :2, 8:].any() and not out["attention_mask"][0, :2, 8:].any()
    np.testing.assert_array_equal(out["input_ids"][0, 2:, :8], np.repeat(arrays["input_ids"][0, 1:], 2, axis=0))
    for k in ("loss_mask", "advantages", "row_weights"):
        assert not out[k][0, 2:].any() and out[k][0, :2][..., :8].all(), k
    assert not out["loss_mask"][0, :, 8:].any()
    assert not lp[0, 2:].any()
    assert out["pixel_values"].shape == (1, 16, 3)
    np.testing.assert_array_equal(out["pixel_values"][0, 8:12], arrays["pixel_values"][0, 4:8])
    assert out["image_grid_thw"].shape == (1, 8, 3)  # the images of both processes' 4 rows
    inert = trainer.inert_rows(out)
    assert not inert["loss_mask"].any() and not inert["row_weights"].any() and not inert["advantages"].any()
    np.testing.assert_array_equal(inert["input_ids"], out["input_ids"])


def test_agree_refuses_other_image_grids(monkeypatch):
    import jax
    import pytest

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(trainer.core, "gather_rows", lambda local, n: np.concatenate([local, [[2, 8, 1, 4, 4]]]))
    with pytest.raises(ValueError, match="different image grids"):
        trainer.agree_micro_batches(_arrays(2, 8), np.ones((1, 2, 8), np.float32))
