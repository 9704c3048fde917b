"""MedSAM2 (and stock SAM2.1) as a batched backend over ``sam2.SAM2ImagePredictor``.

Built as docs/design.md section 7 says: MedSAM2 is SAM2.1 Hiera-Tiny at 512 px (config overrides below),
the predictor's hard-coded 1024-px feature sizes are fixed for the chosen resolution, and the
checkpoint's ``["model"]`` state dict is loaded strictly. A click step is exactly the predictor's
``predict`` with all clicks, the previous step's argmax-score low-res logits as ``mask_input`` and
``multimask_output=True``, keeping the best-scoring mask (docs/design.md section 1); the server reaches
bit-identical answers because it runs that very call against cached features.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import numpy as np

from ibis_jax.tools.protocol import SegmentResult, ToolError
from tool_bridge.backends.base import Backend, DecodeRequest, Encoded


@dataclasses.dataclass(frozen=True)
class ModelPreset:
    """A sam2 config file plus the hydra overrides that make the wanted model."""

    config_file: str
    image_size: int
    overrides: tuple[str, ...] = ()


MEDSAM2 = ModelPreset(
    config_file="configs/sam2.1/sam2.1_hiera_t.yaml",
    image_size=512,
    overrides=(
        "++model.image_size=512",
        "++model.memory_attention.layer.self_attention.feat_sizes=[32,32]",
        "++model.memory_attention.layer.cross_attention.feat_sizes=[32,32]",
    ),
)

PRESETS: dict[str, ModelPreset] = {
    "medsam2": MEDSAM2,
    **{
        f"sam2.1_hiera_{size}": ModelPreset(f"configs/sam2.1/sam2.1_hiera_{size}.yaml", 1024)
        for size in ("t", "s", "b+", "l")
    },
}


def file_sha256(path: str) -> str:
    """Hex sha256 of a file, streamed (checkpoints are hundreds of MiB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def require_sam2() -> None:
    """The optional PyTorch side, checked before any work starts: a ToolError naming the install."""
    import importlib.util

    missing = [p for p in ("torch", "sam2") if importlib.util.find_spec(p) is None]
    if missing:
        raise ToolError(f"the medsam2 backend needs {' and '.join(missing)}: pip install torch==2.14.1 "
                        "torchvision==0.29.1, then SAM2_BUILD_CUDA=0 pip install --no-build-isolation sam2==1.1.0 "
                        "(bash scripts/install.sh does both)")


def backbone_feature_sizes(image_size: int) -> list[tuple[int, int]]:
    """The predictor's ``_bb_feat_sizes`` for an input side: strides 4, 8 and 16."""
    return [(image_size // 4,) * 2, (image_size // 8,) * 2, (image_size // 16,) * 2]


def build_model(preset: ModelPreset, checkpoint: str, device: str = "cpu"):
    """Builds a ``SAM2Base`` from ``preset`` and strictly loads ``torch.load(checkpoint)["model"]``.

    Raises ``ToolError`` naming the missing/unexpected keys or the shape clash, since a partial
    load would silently serve random layers.
    """
    import torch
    from sam2.build_sam import build_sam2

    if not os.path.isfile(checkpoint):
        raise ToolError(f"--checkpoint {checkpoint!r} is not a file; pass MedSAM2_latest.pt's path")
    # Built on CPU without a checkpoint: sam2's own loader logs and raises a bare RuntimeError.
    model = build_sam2(
        preset.config_file, None, device="cpu", hydra_overrides_extra=list(preset.overrides)
    )
    try:
        loaded = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle/zip errors have many types
        raise ToolError(f"checkpoint {checkpoint!r} could not be read by torch.load: {error}") from error
    if not isinstance(loaded, dict) or "model" not in loaded:
        keys = list(loaded)[:5] if isinstance(loaded, dict) else type(loaded).__name__
        raise ToolError(
            f"checkpoint {checkpoint!r} has no 'model' entry (found {keys}); expected the MedSAM2/SAM2 "
            "layout {'model': state_dict}"
        )
    try:
        missing, unexpected = model.load_state_dict(loaded["model"], strict=False)
    except RuntimeError as error:  # shape mismatches raise even when strict=False
        raise ToolError(
            f"checkpoint {checkpoint!r} does not fit config {preset.config_file} at "
            f"{preset.image_size} px (wrong --model?): {str(error)[:600]}"
        ) from error
    if missing or unexpected:
        raise ToolError(
            f"checkpoint {checkpoint!r} does not match config {preset.config_file}: "
            f"{len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys "
            f"{unexpected[:5]}; pass the checkpoint that belongs to --model"
        )
    return model.to(torch.device(device)).eval()


class MedSAM2Backend(Backend):
    """SAM2-family image predictor with per-image features cached by the caller."""

    name = "medsam2"

    def __init__(
        self,
        checkpoint: str,
        *,
        model: str = "medsam2",
        device: str = "cpu",
        num_threads: int = 0,
        fuse_decoder: bool = False,
    ) -> None:
        require_sam2()
        import torch
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        if model not in PRESETS:
            raise ToolError(f"--model {model!r} is unknown; choose one of {sorted(PRESETS)}")
        if num_threads > 0:
            torch.set_num_threads(num_threads)
        self.preset = PRESETS[model]
        self.model_name = model
        self.device = str(torch.device(device))
        self.image_size = self.preset.image_size
        self.checkpoint_sha256 = file_sha256(checkpoint)
        self.predictor = SAM2ImagePredictor(build_model(self.preset, checkpoint, device))
        # The predictor hard-codes 1024-px sizes; at 512 px set_image would crash (docs/design.md section 7).
        self.predictor._bb_feat_sizes = backbone_feature_sizes(self.image_size)
        self.low_res_side = self.image_size // 4
        # Off by default: a fused pass's float reductions may depend on which steps share it.
        self.fuse_decoder = fuse_decoder

    def encode(self, images: list[np.ndarray]) -> list[Encoded]:
        predictor = self.predictor
        if len(images) == 1:
            predictor.set_image(images[0])
            pyramids = [predictor._features]
        else:
            predictor.set_image_batch(list(images))
            batch = predictor._features
            # clone() keeps each slice's strides, so decoding sees the layout set_image gives.
            pyramids = [
                {
                    "image_embed": batch["image_embed"][i : i + 1].clone(),
                    "high_res_feats": [level[i : i + 1].clone() for level in batch["high_res_feats"]],
                }
                for i in range(len(images))
            ]
        predictor.reset_predictor()
        out = []
        for image, pyramid in zip(images, pyramids):
            tensors = [pyramid["image_embed"], *pyramid["high_res_feats"]]
            nbytes = sum(t.numel() * t.element_size() for t in tensors)
            out.append(Encoded(pyramid, int(image.shape[0]), int(image.shape[1]), nbytes))
        return out

    def check_logits(self, prev_logits: np.ndarray | None) -> np.ndarray | None:
        if prev_logits is None:
            return None
        logits = np.asarray(prev_logits, dtype=np.float32)
        side = self.low_res_side
        if logits.size != side * side:
            raise ToolError(
                f"segment: prev_logits has shape {logits.shape}, expected [1, {side}, {side}] "
                f"(the low-res logits this backend returned on the previous step)"
            )
        return logits.reshape(1, side, side)

    def decode(self, requests: list[DecodeRequest]) -> list[SegmentResult]:
        # Default: one predictor call per step, exactly what SAM2ImagePredictor.predict computes,
        # whatever else shares the batch, so replay after a restart reproduces every mask.
        if not self.fuse_decoder or len(requests) == 1:
            return [self._decode_one(request) for request in requests]
        # Fused: one prompt-encoder + mask-decoder pass per group of steps with the same number
        # of clicks and the same kind of mask prompt (first step or not).
        groups: dict[tuple[int, bool], list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault((len(request.points), request.prev_logits is None), []).append(i)
        out: list[SegmentResult | None] = [None] * len(requests)
        for indices in groups.values():
            for i, result in zip(indices, self._decode_fused([requests[i] for i in indices])):
                out[i] = result
        return out

    def _decode_fused(self, requests: list[DecodeRequest]) -> list[SegmentResult]:
        import torch

        predictor, model = self.predictor, self.predictor.model
        device = model.device
        with torch.no_grad():
            coords = torch.stack([
                predictor._transforms.transform_coords(
                    torch.as_tensor(r.points, dtype=torch.float, device=device),
                    normalize=True, orig_hw=(r.encoded.height, r.encoded.width))
                for r in requests
            ])
            labels = torch.as_tensor(np.stack([r.labels for r in requests]), dtype=torch.int, device=device)
            masks_in = None
            if requests[0].prev_logits is not None:
                masks_in = torch.as_tensor(np.stack([r.prev_logits for r in requests]), dtype=torch.float,
                                           device=device)
            sparse, dense = model.sam_prompt_encoder(points=(coords, labels), boxes=None, masks=masks_in)
            payloads = [r.encoded.payload for r in requests]
            low_res, scores, _, _ = model.sam_mask_decoder(
                image_embeddings=torch.cat([p["image_embed"] for p in payloads]),
                image_pe=model.sam_prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=True,
                repeat_image=False,
                high_res_features=[torch.cat(level) for level in zip(*(p["high_res_feats"] for p in payloads))],
            )
            results = []
            for i, request in enumerate(requests):
                hw = (request.encoded.height, request.encoded.width)
                masks = predictor._transforms.postprocess_masks(low_res[i : i + 1], hw)[0]
                score = scores[i].float().cpu().numpy()
                best = int(np.argmax(score))
                results.append(SegmentResult(
                    mask=(masks[best] > predictor.mask_threshold).cpu().numpy(),
                    logits=torch.clamp(low_res[i, best], -32.0, 32.0)[None].float().cpu().numpy(),
                    score=float(score[best]),
                ))
        return results

    def _decode_one(self, request: DecodeRequest) -> SegmentResult:
        predictor = self.predictor
        encoded = request.encoded
        predictor._features = encoded.payload
        predictor._orig_hw = [(encoded.height, encoded.width)]
        predictor._is_image_set = True
        predictor._is_batch = False
        try:
            masks, scores, low_res = predictor.predict(
                point_coords=request.points,
                point_labels=request.labels,
                mask_input=request.prev_logits,
                multimask_output=True,
            )
        finally:
            predictor.reset_predictor()
        best = int(np.argmax(scores))
        return SegmentResult(
            mask=masks[best] > 0.5,  # predict returns {0., 1.} floats
            logits=low_res[best][None].astype(np.float32, copy=True),
            score=float(scores[best]),
        )
