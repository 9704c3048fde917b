"""Clients of the tool server implementing the ``SegmentationTool`` protocol (asyncio and sync).

The client remembers each open episode's image and the clicks of every step. When a server lost
an episode (restart, cache eviction, failover to another address) it re-opens the episode and
replays the missing steps, which reproduces the server-side logits chain, so the caller sees the
same masks as without the fault; replayed answers are checked against the ones already returned.
Transient failures are retried with exponential backoff with jitter (also re-opens after
``NOT_FOUND``, and ``RESOURCE_EXHAUSTED`` answers of a busy server or a full feature cache, which
get their own budget ``max_busy_attempts``); after ``max_attempts`` the call raises ``ToolError``
naming the episode, the step and the last gRPC status. Before the first call to an address the
client waits at most ``connect_timeout_s`` for a connection and otherwise raises a one-line
``ToolError`` naming the address (after that, with one address, a server restart is waited out
within the per-call deadline). It never returns an empty mask in place of an error.

``prev_logits`` is accepted for protocol compatibility and ignored: the server keeps the logits,
and results carry ``logits=None``.

Volume episodes (``open_volume`` / ``segment_volume``; :class:`BridgeVolumeTool` is the synchronous
``VolumeSegmentationTool``) work the same way: the volume (zlib-compressed) and its spacing go once
per episode and again only on a re-open; each step sends all clicks so far and gets the whole 3D
mask back. Their results carry ``logits=None`` unless ``volume_probability`` asks for the tool's
foreground probability (``"float32"`` exactly, ``"uint8"`` quantised to 1/255), which e.g. the
``uncertain`` slice rule reads.

The rooms: ``retry`` (the one retry policy), ``channels`` (connections, TLS, the checkpoint
check), ``episodes`` (what is remembered, the replay), ``aio`` (``AsyncBridgeClient``, 2D),
``volumes`` (volume episodes), ``sync`` (``BridgeClient``, ``BridgeVolumeTool``).
"""

from tool_bridge.client.aio import AsyncBridgeClient
from tool_bridge.client.channels import ClientTLS
from tool_bridge.client.retry import RetryPolicy
from tool_bridge.client.sync import BridgeClient, BridgeVolumeTool
from tool_bridge.client.volumes import PROBABILITY

__all__ = ["PROBABILITY", "AsyncBridgeClient", "BridgeClient", "BridgeVolumeTool", "ClientTLS", "RetryPolicy"]
