"""The dynamic batcher: encode/decode requests wait up to ``max_wait_ms`` for company (at most
``max_batch``), then run on the one model thread, encoders as one batched call. Backends are not
thread safe: every model call, batched or not (:meth:`Batcher.call`), goes through this thread."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from typing import Any, Callable

import numpy as np

from ibis_jax.tools.protocol import SegmentResult
from tool_bridge.backends.base import Backend, DecodeRequest, Encoded
from tool_bridge.server.config import ServerConfig

log = logging.getLogger("tool_bridge.server")


class Overloaded(Exception):
    """The batcher's queue is full."""


class Batcher:
    """Collects encode/decode requests for up to ``max_wait_ms`` or ``max_batch`` and runs them
    on the single model thread, encoders as one batched call."""

    def __init__(self, backend: Backend, config: ServerConfig) -> None:
        self.backend = backend
        self.max_batch = max(1, config.max_batch)
        self.max_wait_s = max(0.0, config.max_wait_ms) / 1000.0
        self.max_queue = max(1, config.max_queue)
        self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tool-model")
        self._queue: asyncio.Queue | None = None
        self._pending = 0
        self._task: asyncio.Task | None = None
        self.batches_run = 0
        self.largest_batch = 0

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)

    def encode(self, image: np.ndarray) -> "asyncio.Future[Encoded]":
        """Queues an image; raises ``Overloaded`` at once when the queue is full."""
        return self._submit("encode", image)

    def decode(self, request: DecodeRequest) -> "asyncio.Future[SegmentResult]":
        return self._submit("decode", request)

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Runs ``fn`` on the model thread (e.g. releasing cached features)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def _submit(self, kind: str, item: Any) -> asyncio.Future:
        if self._pending >= self.max_queue:
            raise Overloaded(f"{self._pending} requests already queued (max_queue={self.max_queue})")
        future = asyncio.get_running_loop().create_future()
        self._pending += 1
        self._queue.put_nowait((kind, item, future))
        return future

    async def _collect(self) -> list[tuple[str, Any, asyncio.Future]]:
        batch = [await self._queue.get()]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            self._pending -= len(batch)
            live = [job for job in batch if not job[2].done()]  # cancelled callers
            encodes = [job for job in live if job[0] == "encode"]
            decodes = [job for job in live if job[0] == "decode"]
            self.batches_run += 1
            self.largest_batch = max(self.largest_batch, len(live))
            try:
                outcome = await loop.run_in_executor(self.executor, self._work, encodes, decodes)
            except RuntimeError as error:  # executor shut down: fail these, keep the loop alive
                outcome = [(live, [error] * len(live))]
            for jobs, results in outcome:
                for (_, _, future), result in zip(jobs, results):
                    if future.done():  # the caller went away (deadline, cancel) meanwhile
                        if isinstance(result, Encoded):
                            self.executor.submit(self.backend.release, result)
                        continue
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result)

    def _work(self, encodes: list, decodes: list) -> list:
        out = []
        for jobs, run in ((decodes, self.backend.decode), (encodes, self.backend.encode)):
            if not jobs:
                continue
            try:
                results = run([job[1] for job in jobs])
            except Exception as error:  # noqa: BLE001 - handed to every caller of the batch
                log.exception("backend %s failed on a batch of %d", run.__name__, len(jobs))
                results = [error] * len(jobs)
            out.append((jobs, results))
        return out
