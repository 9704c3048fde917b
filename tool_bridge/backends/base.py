"""What a server-side segmentation backend provides, and the in-process tool built on it.

A backend splits the tool protocol into its two costs so that the server can batch each:
``encode`` (the per-image work, run once per episode) and ``decode`` (one click step against
encoded features). ``InProcessTool`` turns any backend back into a ``SegmentationTool`` with a
per-episode feature cache, which is what the JAX side uses when the tool lives in its process.
"""

from __future__ import annotations

import abc
import dataclasses
import threading
from typing import Any

import numpy as np

from ibis_jax.tools.protocol import SegmentResult, ToolError, validate_image, validate_prompt


@dataclasses.dataclass
class Encoded:
    """Backend features of one image.

    Attributes:
      payload: backend-specific (MedSAM2: its feature pyramid; classical: a handle).
      height, width: the original image size (masks come back at this size).
      nbytes: memory the payload holds, for the server's byte-capped cache.
    """

    payload: Any
    height: int
    width: int
    nbytes: int


@dataclasses.dataclass(frozen=True)
class DecodeRequest:
    """One click step: all clicks so far and the previous step's logits (``None`` on step 0)."""

    encoded: Encoded
    points: np.ndarray  # float32 [N, 2], pixel (x, y)
    labels: np.ndarray  # int32 [N]
    prev_logits: np.ndarray | None


class Backend(abc.ABC):
    """A segmenter split into batched encode and decode; not thread safe (one worker calls it)."""

    name: str = "backend"
    image_size: int = 0  # model input side in pixels (0 when the backend has none)
    device: str = "cpu"
    checkpoint_sha256: str = ""

    @abc.abstractmethod
    def encode(self, images: list[np.ndarray]) -> list[Encoded]:
        """Encodes validated RGB uint8 ``[H, W, 3]`` images, one ``Encoded`` each."""

    @abc.abstractmethod
    def decode(self, requests: list[DecodeRequest]) -> list[SegmentResult]:
        """Runs click steps; result ``i`` answers request ``i``."""

    def release(self, encoded: Encoded) -> None:
        """Frees whatever ``encoded`` holds outside Python memory (default: nothing)."""

    def check_logits(self, prev_logits: np.ndarray | None) -> np.ndarray | None:
        """Validates caller-supplied previous logits; backends with a fixed shape override this."""
        return prev_logits


class InProcessTool:
    """A ``SegmentationTool`` over a backend in this process, encoding each episode's image once."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._episodes: dict[str, Encoded] = {}
        # The backend is not thread safe; rollouts may call from several threads.
        self._lock = threading.Lock()

    def open(self, episode_id: str, image: np.ndarray) -> None:
        image = validate_image(image, where=f"open({episode_id!r})")
        with self._lock:
            if episode_id in self._episodes:
                raise ToolError(
                    f"open: episode {episode_id!r} is already open; close it first or pick a new id"
                )
            self._episodes[episode_id] = self.backend.encode([image])[0]

    def segment(
        self,
        episode_id: str,
        points: np.ndarray,
        labels: np.ndarray,
        prev_logits: np.ndarray | None,
    ) -> SegmentResult:
        with self._lock:
            encoded = self._episodes.get(episode_id)
            if encoded is None:
                raise ToolError(f"segment: unknown episode {episode_id!r}; call open() first")
            points, labels = validate_prompt(points, labels, encoded.height, encoded.width)
            prev_logits = self.backend.check_logits(prev_logits)
            return self.backend.decode([DecodeRequest(encoded, points, labels, prev_logits)])[0]

    def close(self, episode_id: str) -> None:
        with self._lock:
            encoded = self._episodes.pop(episode_id, None)
            if encoded is not None:
                self.backend.release(encoded)
