"""The ``grpc.aio`` tool server: episodes, dynamic batching, a byte-capped feature cache.

Flow of one episode: ``OpenEpisode`` encodes the image once (batched with other opens) and keeps
the features under the episode id; each ``Step`` decodes all clicks so far against them with the
previous step's logits, kept here, and answers a COCO RLE mask and a score. Steps are idempotent
on (episode, step index): a retried step is answered from the per-episode record. All model work
runs on one worker thread (backends are not thread safe); the event loop only batches and routes.

Open episodes are never evicted to make room: when the feature cache cannot take a new episode,
``OpenEpisode`` waits up to ``admit_wait_s`` for a close (waiters are served first come, first
served), then answers ``RESOURCE_EXHAUSTED`` (the client backs off and retries), so that a full
cache slows new episodes down instead of thrashing live ones. Episodes nobody touched for
``idle_timeout_s`` (a crashed or careless client) are freed.

Volume episodes (``OpenVolume`` / ``VolumeStep``, with a ``VolumeBackend``) share the cache, the
idempotent step records, the idle sweep and ``CloseEpisode``; the volume's header is checked before
it is inflated, and the tool's calls run on the same model thread (one at a time, not batched).

The rooms: ``config`` (settings), ``batcher`` (the model thread), ``episodes`` (step records, the
cache), ``host`` (opening, finding, closing, the idle sweep), ``requests`` (parsing, the image
root), ``rpc_image`` / ``rpc_volume`` (the RPCs), ``servicer`` (routing), ``auth`` (token, TLS),
``serve`` (``BridgeServer``, ``ServerThread``). The names below are the public ones.
"""

from tool_bridge.server.batcher import Batcher, Overloaded
from tool_bridge.server.config import MAX_EPISODE_ID_CHARS, SERVICE_NAME, TOKEN_HEADER, ServerConfig, TLSConfig
from tool_bridge.server.episodes import CacheFull, EpisodeCache
from tool_bridge.server.serve import BridgeServer, ServerThread
from tool_bridge.server.servicer import ToolBridgeServicer

__all__ = ["MAX_EPISODE_ID_CHARS", "SERVICE_NAME", "TOKEN_HEADER", "Batcher", "BridgeServer", "CacheFull",
           "EpisodeCache", "Overloaded", "ServerConfig", "ServerThread", "TLSConfig", "ToolBridgeServicer"]
