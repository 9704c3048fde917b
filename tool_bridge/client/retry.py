"""The client's one retry policy: which gRPC statuses are worth another attempt, what a failure
means for the episode (re-open it, move it to the next address), and exponential backoff with
jitter, with a budget for busy answers (``RESOURCE_EXHAUSTED``: waiting is the cure) counted apart
from the budget for failures. After either budget the call raises ``ToolError`` naming what was
tried, where, and the last gRPC status."""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any, Awaitable, Callable, TypeVar

import grpc

from ibis_jax.tools.protocol import ToolError

log = logging.getLogger("tool_bridge.client")
T = TypeVar("T")

# Worth another attempt (possibly after re-opening the episode); anything else is the caller's bug.
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.OUT_OF_RANGE,
}
LOST = {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OUT_OF_RANGE}  # the server no longer holds the episode
DOWN = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}  # the server does not answer


def after_failure(code: grpc.StatusCode, episode: Any, addresses: int) -> None:
    """What a retryable failure means for ``episode`` (a client episode, or None for calls outside
    one): lost there -> re-open it; a server down and others to go to -> the next address."""
    if episode is None:
        return
    if code in LOST:
        episode.needs_open = True  # re-open (after the backoff: a fresh server may be busy)
    if code in DOWN and addresses > 1:
        episode.address = (episode.address + 1) % addresses
        episode.needs_open = True


class RetryPolicy:
    """Tries a call until it answers, a status says retrying cannot help, or a budget is spent.

    Args:
      max_attempts: tries per call that fail (other than busy) before ``ToolError``.
      max_busy_attempts: tries per call answered ``RESOURCE_EXHAUSTED``, counted apart.
      backoff_s, max_backoff_s: exponential backoff between tries, each wait drawn in [1/2, 1] of
        the current step (jitter, so refused clients do not come back together).
    """

    def __init__(self, max_attempts: int = 6, max_busy_attempts: int = 200, backoff_s: float = 0.1,
                 max_backoff_s: float = 2.0) -> None:
        self.max_attempts, self.max_busy_attempts = max(1, max_attempts), max(1, max_busy_attempts)
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self._jitter = random.Random()
        self.busy_retries = 0  # RESOURCE_EXHAUSTED answers waited out, over all calls

    async def run(self, what: str, attempt: Callable[[], Awaitable[T]],
                  on_failure: Callable[[grpc.StatusCode], None] = lambda code: None,
                  where: Callable[[], object] = lambda: "the server") -> T:
        """``await attempt()`` until it answers; ``on_failure(code)`` before each backoff;
        ``where()`` names the server(s) in the final error."""
        delay = self.backoff_s
        last: grpc.aio.AioRpcError | None = None
        failures = busy = 0
        while True:
            try:
                return await attempt()
            except grpc.aio.AioRpcError as error:
                code = error.code()
                # gRPC reports an over-limit message as RESOURCE_EXHAUSTED too; resending cannot help.
                too_big = code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in (error.details() or "")
                if code not in RETRYABLE or too_big:
                    raise ToolError(f"tool bridge: {what}: {code.name}: {error.details()}") from error
                last = error
                if code == grpc.StatusCode.RESOURCE_EXHAUSTED:  # busy: waiting is the cure
                    busy += 1
                    self.busy_retries += 1
                    if busy >= self.max_busy_attempts:
                        break
                else:
                    failures += 1
                    if failures >= self.max_attempts:
                        break
                log.log(logging.INFO if code == grpc.StatusCode.RESOURCE_EXHAUSTED else logging.WARNING,
                        "tool bridge: %s: attempt %d: %s %s", what, failures + busy, code.name, error.details())
                on_failure(code)
                await asyncio.sleep(delay * self._jitter.uniform(0.5, 1.0))
                delay = min(self.max_backoff_s, delay * 2)
        raise ToolError(
            f"tool bridge: {what} failed after {failures + busy} attempts on {where()}: "
            f"{last.code().name}: {last.details()}"
        )
