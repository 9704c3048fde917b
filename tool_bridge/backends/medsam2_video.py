"""MedSAM2 on volumes through ``sam2``'s video predictor (an in-process ``VolumeSegmentationTool``).

The slices of the volume are the video's frames, fed from the array (no JPEG folder): each slice
is made RGB, resized to the model's side (512 px for MedSAM2, the docs/design.md section 7 overrides) and
normalised with sam2's ImageNet mean / std, as ``sam2.utils.misc.load_video_frames`` would.

A ``segment`` call replays the episode: the state is reset, each prompted slice gets its clicks
(``add_new_points_or_box`` per slice, pixel coordinates of the original slice), then the memory
attention propagates forward from the first prompted slice and backward from the last; where both
passes reach a slice (between prompted slices) their logits are averaged. Slices no pass reaches
are empty. The replay makes every answer a function of the clicks alone (like the 2D tool's
restart replay). sam2 keeps one frame's image features; with ``cache_features`` (default) every
frame's are kept for the episode (with the frame itself 28 MiB a slice at 512 px, measured), so a
replay encodes nothing.

Served over the gRPC bridge as the ``medsam2`` volume backend (``backends/volume.py``).
"""

from __future__ import annotations

import numpy as np

from ibis_jax.tools.protocol import ToolError
from ibis_jax.tools.volume import VolumeSegmentResult, validate_volume, validate_volume_prompt
from tool_bridge.backends.medsam2 import PRESETS

IMG_MEAN = (0.485, 0.456, 0.406)
IMG_STD = (0.229, 0.224, 0.225)


def build_video_predictor(checkpoint: str, model: str = "medsam2", device: str = "cpu"):
    """``SAM2VideoPredictor`` for ``model``'s preset, with the checkpoint's ``["model"]`` loaded strictly."""
    import os

    import torch
    from sam2.build_sam import build_sam2_video_predictor

    if model not in PRESETS:
        raise ToolError(f"--model {model!r} is unknown; choose one of {sorted(PRESETS)}")
    if not os.path.isfile(checkpoint):
        raise ToolError(f"--checkpoint {checkpoint!r} is not a file; pass MedSAM2_latest.pt's path")
    preset = PRESETS[model]
    predictor = build_sam2_video_predictor(preset.config_file, None, device="cpu",
                                           hydra_overrides_extra=list(preset.overrides))
    loaded = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if not isinstance(loaded, dict) or "model" not in loaded:
        raise ToolError(f"checkpoint {checkpoint!r} has no 'model' entry; expected {{'model': state_dict}}")
    missing, unexpected = predictor.load_state_dict(loaded["model"], strict=False)
    if missing or unexpected:
        raise ToolError(f"checkpoint {checkpoint!r} does not match {preset.config_file}: {len(missing)} missing "
                        f"keys {missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}")
    return predictor.to(torch.device(device)).eval()


def volume_frames(volume: np.ndarray, side: int):
    """``uint8 [D, H, W]`` -> normalised ``float32`` frames ``[D, 3, side, side]`` (a torch tensor)."""
    import cv2
    import torch

    frames = np.stack([cv2.resize(plane, (side, side), interpolation=cv2.INTER_LINEAR) for plane in volume])
    rgb = np.repeat(frames[:, None].astype(np.float32) / 255.0, 3, axis=1)
    mean = np.asarray(IMG_MEAN, np.float32)[None, :, None, None]
    std = np.asarray(IMG_STD, np.float32)[None, :, None, None]
    return torch.from_numpy((rgb - mean) / std)


class MedSAM2VolumeTool:
    """``VolumeSegmentationTool`` over ``SAM2VideoPredictor`` (see the module docstring)."""

    name = "medsam2-3d"

    def __init__(self, checkpoint: str | None = None, *, model: str = "medsam2", device: str = "cpu", predictor=None,
                 cache_features: bool = True):
        if predictor is None:
            if checkpoint is None:
                raise ToolError("MedSAM2VolumeTool needs a checkpoint (or a built predictor)")
            predictor = build_video_predictor(checkpoint, model, device)
        self.predictor = predictor
        if cache_features:
            original = predictor._get_image_feature

            def cached(state, frame_idx, batch_size):
                store = state.setdefault("ibis_all_features", {})
                if frame_idx in store:
                    state["cached_features"] = {frame_idx: store[frame_idx]}
                out = original(state, frame_idx, batch_size)
                store.update(state["cached_features"])
                return out

            predictor._get_image_feature = cached
        self.side = int(predictor.image_size)
        self._states: dict[str, tuple[dict, tuple[int, int, int]]] = {}

    def open(self, episode_id: str, volume: np.ndarray, spacing) -> None:
        import torch
        from sam2 import sam2_video_predictor as svp

        volume, _ = validate_volume(volume, spacing, where=f"episode {episode_id} volume")
        frames = volume_frames(volume, self.side).to(self.predictor.device)
        d, h, w = volume.shape
        original = svp.load_video_frames
        svp.load_video_frames = lambda **kwargs: (frames, h, w)  # frames from the array, not a folder
        try:
            with torch.inference_mode():
                state = self.predictor.init_state(video_path="<volume>")
        finally:
            svp.load_video_frames = original
        self._states[episode_id] = (state, (d, h, w))

    def close(self, episode_id: str) -> None:
        self._states.pop(episode_id, None)

    def segment(self, episode_id: str, points: np.ndarray, labels: np.ndarray,
                prev_logits: np.ndarray | None) -> VolumeSegmentResult:
        import torch

        if episode_id not in self._states:
            raise ToolError(f"unknown episode {episode_id!r}: call open() first")
        state, shape = self._states[episode_id]
        points, labels = validate_volume_prompt(points, labels, shape)
        d, h, w = shape
        slices = np.rint(points[:, 2]).astype(int)
        predictor = self.predictor
        logits = np.zeros(shape, np.float32)
        hits = np.zeros(d, np.int32)
        with torch.inference_mode():
            predictor.reset_state(state)
            for k in sorted(set(slices.tolist())):
                on = slices == k
                predictor.add_new_points_or_box(state, frame_idx=int(k), obj_id=1, points=points[on, :2],
                                                labels=labels[on], normalize_coords=True)
            passes = [dict(reverse=False)]
            if slices.max() > 0:
                passes.append(dict(reverse=True, start_frame_idx=int(slices.max())))
            for kwargs in passes:
                for frame, _, masks in predictor.propagate_in_video(state, **kwargs):
                    logits[frame] += masks[0, 0].float().cpu().numpy()
                    hits[frame] += 1
        logits[hits > 0] /= hits[hits > 0, None, None]
        mask = (logits > 0.0) & (hits[:, None, None] > 0)
        prob = 1.0 / (1.0 + np.exp(-logits))
        inside = prob[mask]
        return VolumeSegmentResult(mask, prob.astype(np.float32), float(inside.mean()) if inside.size else 0.0)
