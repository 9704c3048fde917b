"""Who may call: the shared token (``authorization: Bearer <token>``, compared in constant time;
health checks stay open), TLS credentials, and the rule that only loopback goes without a token."""

from __future__ import annotations

import hmac
import ipaddress

import grpc

from tool_bridge.server.config import TOKEN_HEADER, TLSConfig


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without ``authorization: Bearer <token>`` (health checks stay open)."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token (--token-file)")

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    async def intercept_service(self, continuation, details):
        if details.method.startswith("/grpc.health.v1.Health/"):
            return await continuation(details)
        sent = dict(details.invocation_metadata or ()).get(TOKEN_HEADER, "")
        sent = sent.encode() if isinstance(sent, str) else sent
        if hmac.compare_digest(sent, self._expected):
            return await continuation(details)
        return self._deny


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def server_credentials(tls: TLSConfig) -> grpc.ServerCredentials:
    def read(path: str) -> bytes:
        with open(path, "rb") as handle:
            return handle.read()

    client_ca = read(tls.client_ca) if tls.client_ca else None
    return grpc.ssl_server_credentials(
        [(read(tls.key), read(tls.cert))], root_certificates=client_ca, require_client_auth=client_ca is not None
    )
