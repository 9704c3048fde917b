"""The client's connections: one channel per address (TLS or plaintext, quick reconnects), the
first-connection wait (``connect_timeout_s``, then a one-line ``ToolError`` naming the address),
per-call arguments (deadline, token, wait-for-ready with one address), the check that every
address serves the same checkpoint, and the choice of a reachable address for an episode."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any, Sequence

import grpc

from ibis_jax.tools.protocol import ToolError
from tool_bridge.proto import tool_bridge_pb2 as pb
from tool_bridge.proto import tool_bridge_pb2_grpc as pb_grpc

log = logging.getLogger("tool_bridge.client")


@dataclasses.dataclass
class ClientTLS:
    """PEM files: ``ca`` verifies the server; ``cert``/``key`` identify this client (mutual TLS)."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    server_name: str | None = None  # override the name checked in the server certificate


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as handle:
        return handle.read()


class Channels:
    """Channels and stubs by address, created on first use."""

    def __init__(self, addresses: str | Sequence[str], *, token: str | None, tls: ClientTLS | None,
                 deadline_s: float, connect_timeout_s: float, max_message_bytes: int) -> None:
        self.addresses = [addresses] if isinstance(addresses, str) else list(addresses)
        if not self.addresses:
            raise ToolError("tool bridge client: give at least one server address host:port")
        self.token, self.tls = token, tls
        self.deadline_s, self.connect_timeout_s = deadline_s, connect_timeout_s
        self.max_message_bytes = max_message_bytes
        self._connected: set[str] = set()
        self._unreachable: dict[str, float] = {}  # address -> monotonic time to try it again
        self._stubs: dict[str, tuple[grpc.aio.Channel, pb_grpc.ToolBridgeStub]] = {}
        self._checkpoints: dict[str, str] = {}

    async def connect(self, address: str) -> None:
        """Waits up to ``connect_timeout_s`` for the first connection to ``address``."""
        if address in self._connected:
            return
        if self._unreachable.get(address, 0.0) > time.monotonic():
            raise ToolError(f"tool bridge: no server answered at {address} a moment ago; not retried yet")
        self.stub(address)
        channel = self._stubs[address][0]
        try:
            await asyncio.wait_for(channel.channel_ready(), self.connect_timeout_s)
        except asyncio.TimeoutError:
            if len(self.addresses) > 1:  # let other episodes go elsewhere for a while
                self._unreachable[address] = time.monotonic() + max(30.0, self.connect_timeout_s)
            raise ToolError(
                f"tool bridge: no server answers at {address} within {self.connect_timeout_s:g} s "
                f"(connect_timeout_s; channel {channel.get_state().name}): start one with 'ibis-jax "
                "tool serve', check the host:port, or match the server's TLS setting"
            ) from None
        self._connected.add(address)
        self._unreachable.pop(address, None)

    def stub(self, address: str) -> pb_grpc.ToolBridgeStub:
        if address not in self._stubs:
            options = [
                ("grpc.max_receive_message_length", self.max_message_bytes),
                ("grpc.max_send_message_length", self.max_message_bytes),
                # Reconnect quickly after a server restart instead of the default 1 s..120 s.
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 1000),
            ]
            if self.tls is not None:
                if self.tls.server_name:
                    options.append(("grpc.ssl_target_name_override", self.tls.server_name))
                credentials = grpc.ssl_channel_credentials(
                    root_certificates=_read(self.tls.ca),
                    private_key=_read(self.tls.key),
                    certificate_chain=_read(self.tls.cert),
                )
                channel = grpc.aio.secure_channel(address, credentials, options=options)
            else:
                channel = grpc.aio.insecure_channel(address, options=options)
            self._stubs[address] = (channel, pb_grpc.ToolBridgeStub(channel))
        return self._stubs[address][1]

    def call_kwargs(self) -> dict[str, Any]:
        metadata = (("authorization", f"Bearer {self.token}"),) if self.token else None
        # One server: wait out a restart within the deadline. Several: fail fast and fail over.
        return {"timeout": self.deadline_s, "metadata": metadata, "wait_for_ready": len(self.addresses) == 1}

    async def check_address(self, address: str) -> None:
        """All servers must run the same checkpoint, or failover would change masks."""
        if address in self._checkpoints:
            return
        info = await self.stub(address).Info(pb.InfoRequest(), **self.call_kwargs())
        identity = f"{info.backend}:{info.checkpoint_sha256}"
        if info.volume_backend:
            identity += f" volumes {info.volume_backend}"
        others = set(self._checkpoints.values())
        if others and identity not in others:
            raise ToolError(
                f"tool bridge: server {address} runs {identity}, others run {sorted(others)}; every "
                "address must serve the same backend and checkpoint"
            )
        self._checkpoints[address] = identity

    async def reachable(self, episode: Any) -> str:
        """The episode's address, or with several the next one that connects (``episode.address``
        moves along)."""
        for _ in range(len(self.addresses)):
            address = self.addresses[episode.address]
            try:
                await self.connect(address)
                return address
            except ToolError as error:
                if len(self.addresses) == 1:
                    raise
                log.warning("%s; trying the next address", error)
                episode.address = (episode.address + 1) % len(self.addresses)
        raise ToolError(
            f"tool bridge: no server answers at any of {', '.join(self.addresses)} within "
            f"{self.connect_timeout_s:g} s (connect_timeout_s)"
        )

    async def aclose(self) -> None:
        for channel, _ in self._stubs.values():
            await channel.close()
        self._stubs.clear()
        self._connected.clear()
