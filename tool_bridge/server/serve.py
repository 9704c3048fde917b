"""The server's lifecycle: ``BridgeServer`` binds (refusing a non-loopback address without a
token), serves the ``ToolBridge`` service and gRPC health, and stops gracefully;
``ServerThread`` runs one on its own event loop in a daemon thread (tests, benchmarks)."""

from __future__ import annotations

import asyncio
import threading

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ibis_jax.tools.protocol import ToolError
from tool_bridge.backends.base import Backend
from tool_bridge.backends.volume import VolumeBackend
from tool_bridge.proto import tool_bridge_pb2_grpc as pb_grpc
from tool_bridge.server.auth import TokenInterceptor, is_loopback, server_credentials
from tool_bridge.server.config import SERVICE_NAME, ServerConfig
from tool_bridge.server.servicer import ToolBridgeServicer


class BridgeServer:
    """A started server; ``await stop()`` ends it."""

    def __init__(self, backend: Backend, config: ServerConfig, volume_backend: VolumeBackend | None = None) -> None:
        if not is_loopback(config.host) and not config.token:
            raise ToolError(
                f"refusing to listen on {config.host} without a token: pass --token-file (and --tls-*) "
                "or bind 127.0.0.1"
            )
        self.config = config
        self.servicer = ToolBridgeServicer(backend, config, volume_backend)
        options = [
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.so_reuseport", 0),  # never share a port with a stale server silently
        ]
        interceptors = [TokenInterceptor(config.token)] if config.token else []
        self.server = grpc.aio.server(options=options, interceptors=interceptors)
        pb_grpc.add_ToolBridgeServicer_to_server(self.servicer, self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        address = f"{config.host}:{config.port}"
        if config.tls:
            self.port = self.server.add_secure_port(address, server_credentials(config.tls))
        else:
            self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise ToolError(f"could not bind {address} (in use?)")

    async def start(self) -> None:
        self.servicer.start()
        await self.server.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float | None = 1.0) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        await self.servicer.stop()

    async def wait(self) -> None:
        await self.server.wait_for_termination()


class ServerThread:
    """Runs a ``BridgeServer`` on its own event loop in a daemon thread (tests, benchmarks)."""

    def __init__(self, backend: Backend, config: ServerConfig, volume_backend: VolumeBackend | None = None) -> None:
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.server: BridgeServer | None = None
        self._backend, self._config, self._volume_backend = backend, config, volume_backend
        self._thread = threading.Thread(target=self._main, daemon=True, name="tool-bridge-server")
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self.server = BridgeServer(self._backend, self._config, self._volume_backend)
            self._loop.run_until_complete(self.server.start())
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread
            self._error = error
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()

    @property
    def address(self) -> str:
        return f"{self._config.host}:{self.server.port}"

    def stop(self) -> None:
        if self.server is not None and self._loop.is_running():
            asyncio.run_coroutine_threadsafe(self.server.stop(0), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
