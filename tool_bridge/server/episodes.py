"""What the server keeps per episode: the step records that make steps idempotent, and the
byte-capped cache of open episodes (features plus the last step's logits).

Open episodes are never evicted to make room: when the cache cannot take a new episode,
``EpisodeCache.reserve``/``admit`` raise ``CacheFull`` (the open waits for a close, then answers
``RESOURCE_EXHAUSTED``), so that a full cache slows new episodes down instead of thrashing live
ones; :meth:`EpisodeCache.expire` frees the ones nobody touched for ``idle_timeout_s``.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import time

import grpc
import numpy as np

from tool_bridge.backends.base import Encoded
from tool_bridge.proto import tool_bridge_pb2 as pb
from tool_bridge.server.status import Abort


@dataclasses.dataclass
class StepRecord:
    prompt_digest: str
    reply: pb.StepReply


@dataclasses.dataclass
class Episode:
    encoded: Encoded
    image_digest: str
    steps: list[StepRecord] = dataclasses.field(default_factory=list)
    last_logits: np.ndarray | None = None
    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    last_used: float = dataclasses.field(default_factory=time.monotonic)

    kind = "image"

    @property
    def nbytes(self) -> int:
        logits = 0 if self.last_logits is None else self.last_logits.nbytes
        return self.encoded.nbytes + logits


@dataclasses.dataclass
class VolumeEpisode(Episode):
    """A volume episode: ``encoded.payload`` is the volume backend's handle, ``encoded.nbytes``
    what the tool holds for it (measured after the open and after each step)."""

    depth: int = 0

    kind = "volume"

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.depth, self.encoded.height, self.encoded.width


class CacheFull(Exception):
    """The feature cache cannot take another episode without evicting an open one."""


class EpisodeCache:
    """Open episodes by id, capped in bytes of features. Nothing is ever evicted to make room:
    ``admit`` refuses a new episode instead (only an empty cache takes one over the cap, or no
    image could ever be served); ``expire`` frees the episodes idle for too long.

    ``reserve``/``unreserve`` hold room for opens whose features are still being computed, so that
    concurrent opens cannot all pass the check and overshoot together."""

    def __init__(self, cap_bytes: int) -> None:
        self.cap_bytes = cap_bytes
        self._entries: collections.OrderedDict[str, Episode] = collections.OrderedDict()
        self.bytes = 0
        self.reserved = 0
        # The largest episode seen per kind (features + logits): the estimate for a new one. Kinds
        # apart, so that one volume does not make every image open look a volume's size.
        self.largest: dict[str, int] = collections.defaultdict(int)
        self.refusals = 0
        self.expirations = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> Episode | None:
        entry = self._entries.get(key)
        if entry is not None:
            entry.last_used = time.monotonic()
            self._entries.move_to_end(key)
        return entry

    def _full_message(self, needed: int) -> str:
        mib = 1 << 20
        return (f"feature cache full: {len(self._entries)} open episodes hold {self.bytes / mib:.1f} MiB"
                f"{f' (+{self.reserved / mib:.1f} MiB opening)' if self.reserved else ''} of --cache-mb "
                f"{self.cap_bytes / mib:g}, a new one needs ~{needed / mib:.1f} MiB; open episodes are "
                "never evicted: retry after some close, or raise --cache-mb")

    def reserve(self, kind: str = "image") -> int:
        """Holds room for one more episode of the largest size seen; raises ``CacheFull``."""
        needed = self.largest[kind]
        busy = len(self._entries) > 0 or self.reserved > 0
        if busy and self.bytes + self.reserved + needed > self.cap_bytes:
            self.refusals += 1
            raise CacheFull(self._full_message(needed))
        self.reserved += needed
        return needed

    def unreserve(self, amount: int) -> None:
        self.reserved -= amount

    def admit(self, key: str, entry: Episode) -> None:
        """Adds an open episode; raises ``CacheFull`` if it does not fit next to the others.

        It must fit at the largest size an episode reached so far (features plus the logits its
        steps add): steps grow episodes without eviction, so the cap can only be overshot by the
        logits of the first episodes, before any step showed their size."""
        needed = max(entry.nbytes, self.largest[entry.kind])
        if self._entries and self.bytes + self.reserved + needed > self.cap_bytes:
            self.refusals += 1
            raise CacheFull(self._full_message(needed))
        self.pop(key)
        self._entries[key] = entry
        self.bytes += entry.nbytes
        self.largest[entry.kind] = max(self.largest[entry.kind], entry.nbytes)

    def resize(self, key: str, old_nbytes: int) -> None:
        """A step changed an episode's size (its logits); may overshoot the cap, never evicts."""
        entry = self._entries.get(key)
        if entry is not None:
            self.bytes += entry.nbytes - old_nbytes
            self.largest[entry.kind] = max(self.largest[entry.kind], entry.nbytes)

    def pop(self, key: str) -> Episode | None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.bytes -= entry.nbytes
        return entry

    def expire(self, idle_s: float, now: float | None = None) -> list[tuple[str, Episode]]:
        """Removes and returns the episodes unused for ``idle_s`` seconds and not mid-step."""
        now = time.monotonic() if now is None else now
        stale = [key for key, entry in self._entries.items()
                 if now - entry.last_used >= idle_s and not entry.lock.locked()]
        self.expirations += len(stale)
        return [(key, self.pop(key)) for key in stale]


def image_digest(image: np.ndarray) -> str:
    digest = hashlib.sha256(np.asarray(image.shape, dtype=np.int64).tobytes())
    digest.update(image.tobytes())
    return digest.hexdigest()


def answered_step(episode_id: str, episode, index: int, prompt: str):
    """Step ``index`` of an episode (image or volume) under the idempotent-step rules: the stored
    record when it was already answered for these clicks, None when it is the next one; a step
    answered for other clicks, or one past the next, is the status that says why."""
    if index < len(episode.steps):
        record = episode.steps[index]
        if record.prompt_digest != prompt:
            raise Abort(grpc.StatusCode.FAILED_PRECONDITION,
                         f"step {index} of episode {episode_id!r} was already answered for other clicks")
        return record
    if index > len(episode.steps):
        raise Abort(grpc.StatusCode.OUT_OF_RANGE,
                     f"episode {episode_id!r} holds {len(episode.steps)} steps, got step_index {index}; "
                     "re-open it and replay the missing steps")
    return None


def prompt_digest(points: np.ndarray, labels: np.ndarray) -> str:
    return hashlib.sha256(points.tobytes() + b"|" + labels.tobytes()).hexdigest()
