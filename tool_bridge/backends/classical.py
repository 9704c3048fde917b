"""The weight-free classical tool (``ibis_jax.tools.classical``) as a server backend.

The classical tool keeps its own per-episode state behind the tool protocol, so "encoding" here is
its ``open`` under a private id and decoding its ``segment``; releasing the cache entry closes it.
"""

from __future__ import annotations

import itertools

import numpy as np

from ibis_jax.tools.protocol import SegmentResult
from tool_bridge.backends.base import Backend, DecodeRequest, Encoded


class ClassicalBackend(Backend):
    name = "classical"

    def __init__(self) -> None:
        from ibis_jax.tools.classical import ClassicalTool  # numpy/scipy/skimage only

        self.tool = ClassicalTool()
        self._ids = itertools.count()

    def encode(self, images: list[np.ndarray]) -> list[Encoded]:
        out = []
        for image in images:
            handle = f"classical-{next(self._ids)}"
            self.tool.open(handle, image)
            height, width = int(image.shape[0]), int(image.shape[1])
            # The tool keeps the image and a float64 Lab copy at most work_size on a side.
            work = min(height * width, self.tool.config.work_size**2)
            out.append(Encoded(handle, height, width, image.nbytes + work * 3 * 8))
        return out

    def decode(self, requests: list[DecodeRequest]) -> list[SegmentResult]:
        return [
            self.tool.segment(r.encoded.payload, r.points, r.labels, r.prev_logits) for r in requests
        ]

    def release(self, encoded: Encoded) -> None:
        self.tool.close(encoded.payload)
