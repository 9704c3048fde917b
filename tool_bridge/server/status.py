"""How a request fails: ``Abort`` carries the gRPC status and a message naming the field and the
fix; :func:`guard` turns it (or any bug, as ``INTERNAL``) into the RPC's answer."""

from __future__ import annotations

import logging
from typing import Any

import grpc

log = logging.getLogger("tool_bridge.server")


class Abort(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


def invalid(details: str) -> Abort:
    """The request is wrong (``INVALID_ARGUMENT``): ``details`` says which field and why."""
    return Abort(grpc.StatusCode.INVALID_ARGUMENT, details)


async def guard(context: grpc.aio.ServicerContext, coro) -> Any:
    """Maps ``Abort`` to a gRPC status; anything else is a bug reported as INTERNAL."""
    try:
        return await coro
    except Abort as error:
        await context.abort(error.code, error.details)
    except Exception as error:  # noqa: BLE001 - keep serving, report the cause
        log.exception("internal error")
        await context.abort(grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}")
