"""The tool sidecar under load with a feature cache smaller than the episodes in flight.

Starts ``ibis-jax tool serve --backend classical --cache-mb CACHE`` in a subprocess, runs
``--clients`` clients (one session each) with ``--episodes`` concurrent episodes each, every
episode open + ``--steps`` steps + close, and compares every mask and score with the in-process
tool. Prints episodes ok / failed, mask mismatches, replays, wall time and the server's RSS before
and after (``/proc/PID/status``, VmRSS and VmHWM).

    python bench/bridge_load.py                                   # 4 clients x 4 episodes x 5 steps
    python bench/bridge_load.py --clients 10 --episodes 5 --steps 20
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests", "tool_bridge"))

from bridge_helpers import ServerProcess, free_port, make_clicks, make_images  # noqa: E402
from tool_bridge.backends.base import InProcessTool  # noqa: E402
from tool_bridge.backends.classical import ClassicalBackend  # noqa: E402
from tool_bridge.client import AsyncBridgeClient  # noqa: E402


def rss_kib(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(("VmRSS", "VmHWM")):
                key, value = line.split(":")
                out[key] = int(value.split()[0])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--episodes", type=int, default=4, help="concurrent episodes per client")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--side", type=int, default=104, help="image side (classical: ~0.28 MiB per episode at 104)")
    parser.add_argument("--cache-mb", type=int, default=1)
    args = parser.parse_args()

    count = args.clients * args.episodes
    size = (args.side, args.side)
    images = make_images(count, size=size, seed=7)
    clicks = [make_clicks(args.steps, size=size, seed=1000 + i) for i in range(count)]

    def upto(i, k):
        return np.array([c[0] for c in clicks[i][: k + 1]]), np.array([c[1] for c in clicks[i][: k + 1]])

    tool = InProcessTool(ClassicalBackend())
    expected = []
    for i, image in enumerate(images):
        tool.open("r", image)
        prev, answers = None, []
        for k in range(args.steps):
            result = tool.segment("r", *upto(i, k), prev)
            prev = result.logits
            answers.append((result.mask, result.score))
        tool.close("r")
        expected.append(answers)
    probe = ClassicalBackend()
    per_episode = probe.encode([images[0]])[0].nbytes

    port = free_port()
    server = ServerProcess(["--backend", "classical", "--cache-mb", str(args.cache_mb), "--log-level", "WARNING"], port)
    server.wait_ready()
    before = rss_kib(server.proc.pid)

    async def episode(client, i):
        await client.open(f"e{i}", images[i])
        answers = []
        for k in range(args.steps):
            result = await client.segment(f"e{i}", *upto(i, k))
            answers.append((result.mask, result.score))
        await client.close(f"e{i}")
        return answers

    async def run():
        clients = [AsyncBridgeClient(server.address) for _ in range(args.clients)]
        try:
            results = await asyncio.gather(*(episode(clients[i % args.clients], i) for i in range(count)),
                                           return_exceptions=True)
            return results, sum(c.replays for c in clients)
        finally:
            for client in clients:
                await client.aclose()

    start = time.perf_counter()
    try:
        results, replays = asyncio.run(run())
        elapsed = time.perf_counter() - start
        after = rss_kib(server.proc.pid)
    finally:
        server.kill()
    failed = [r for r in results if isinstance(r, BaseException)]
    mismatched = 0
    for got, want in zip(results, expected):
        if isinstance(got, BaseException):
            continue
        mismatched += sum(not (np.array_equal(m, mr) and s == sr) for (m, s), (mr, sr) in zip(got, want))
    print(f"{args.clients} clients x {args.episodes} concurrent episodes x {args.steps} steps, cache "
          f"{args.cache_mb} MiB = {(args.cache_mb << 20) / per_episode:.1f} episodes of {per_episode / 2**20:.2f} MiB")
    print(f"episodes ok {count - len(failed)}/{count}, failed {len(failed)}, mask/score mismatches "
          f"{mismatched}, replays {replays}, {elapsed:.1f} s")
    print(f"server RSS before {before['VmRSS'] / 1024:.0f} MiB, after {after['VmRSS'] / 1024:.0f} MiB "
          f"(peak {after['VmHWM'] / 1024:.0f} MiB)")
    for error in failed[:3]:
        print(f"  e.g. {str(error)[:300]}")
    return 0 if not failed and not mismatched else 1


if __name__ == "__main__":
    sys.exit(main())
