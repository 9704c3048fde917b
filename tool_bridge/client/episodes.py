"""What the client remembers of each open episode: its image (or compressed volume message) and
every step's clicks and answer, so that a server that lost the episode can be given it again and
the steps replayed, each checked against the answer already returned."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any, Awaitable, Callable

import numpy as np

from ibis_jax.tools.protocol import ToolError
from tool_bridge.proto import tool_bridge_pb2 as pb

log = logging.getLogger("tool_bridge.client")


@dataclasses.dataclass
class ClientStep:
    points: np.ndarray
    labels: np.ndarray
    reply: Any  # pb.StepReply or pb.VolumeStepReply (without the probability)


@dataclasses.dataclass
class ClientEpisode:
    episode_id: str
    server_id: str  # namespaced by the client's session, so that clients never cross episodes
    image: np.ndarray | None  # None for a volume episode
    address: int  # index into the client's addresses
    steps: list[ClientStep] = dataclasses.field(default_factory=list)
    needs_open: bool = True
    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    volume: pb.Volume | None = None  # the message, compressed once, re-sent on every re-open
    shape: tuple[int, int, int] | None = None  # (depth, height, width) of a volume episode


class Replayer:
    """Re-sends the steps a re-opened server does not hold; counts them (``replays``)."""

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.replays = 0

    async def replay(self, episode: ClientEpisode, address: str, start: int,
                     call: Callable[[int, ClientStep], Awaitable[Any]], same: Callable[[Any, Any], bool]) -> None:
        """Re-sends the steps from ``start`` on to a server that re-opened ``episode``, checking
        that each answers as before (``same(new, old)``), then marks the episode open."""
        for index in range(start, len(episode.steps)):
            step = episode.steps[index]
            again = await call(index, step)
            self.replays += 1
            if not same(again, step.reply):
                message = (f"tool bridge: replaying step {index} of episode {episode.episode_id!r} on "
                           f"{address} gave another mask/score than before (different checkpoint or a "
                           "non-deterministic device)")
                if self.strict:
                    raise ToolError(message)
                log.warning(message)
                step.reply = again
        episode.needs_open = False
