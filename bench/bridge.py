"""Tool bridge benchmark: what the gRPC hop costs, what the feature cache saves, how it scales.

Prints, in one run:
  1. one click step in-process vs through the bridge (the overhead ratio);
  2. a 5-click episode with the per-episode feature cache vs re-encoding the image every step;
  3. bridge throughput with 1, 4 and 16 concurrent episodes (open + 5 clicks + close each).

Without ``--checkpoint`` it builds MedSAM2 (SAM2.1 Hiera-T, 512 px) with seeded random weights and
saves it in the real ``{"model": state_dict}`` layout; timings do not depend on the weights.
The server runs on its own thread in this process (same backend object), so the bridge numbers
include gRPC, protobuf, RLE and batching but no second copy of the model.

    python bench/bridge.py                       # CPU
    python bench/bridge.py --device cuda --checkpoint MedSAM2_latest.pt
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tool_bridge.backends.base import InProcessTool  # noqa: E402
from tool_bridge.backends.medsam2 import MEDSAM2, MedSAM2Backend  # noqa: E402
from tool_bridge.client import AsyncBridgeClient, BridgeClient  # noqa: E402
from tool_bridge.server import ServerConfig, ServerThread  # noqa: E402

CLICKS = 5


def random_checkpoint(directory: str) -> str:
    import torch
    from sam2.build_sam import build_sam2

    torch.manual_seed(0)
    model = build_sam2(MEDSAM2.config_file, None, device="cpu", hydra_overrides_extra=list(MEDSAM2.overrides))
    path = os.path.join(directory, "MedSAM2_random.pt")
    torch.save({"model": model.state_dict()}, path)
    return path


def images_and_clicks(count: int, side: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(count)]
    clicks = [
        (rng.uniform(0, side - 1, (CLICKS, 2)).astype(np.float32), np.array([1] + list(rng.integers(0, 2, CLICKS - 1))))
        for _ in range(count)
    ]
    return images, clicks


def time_steps(tool, image, points, labels, repeats: int, keep_logits: bool) -> list[float]:
    """Per-step wall times of ``repeats`` episodes of CLICKS steps (encode excluded)."""
    times = []
    for r in range(repeats):
        tool.open(f"t{r}", image)
        prev = None
        for k in range(CLICKS):
            start = time.perf_counter()
            result = tool.segment(f"t{r}", points[: k + 1], labels[: k + 1], prev)
            times.append(time.perf_counter() - start)
            prev = result.logits if keep_logits else None
        tool.close(f"t{r}")
    return times


def episode_cached(tool, image, points, labels) -> float:
    start = time.perf_counter()
    tool.open("c", image)
    prev = None
    for k in range(CLICKS):
        prev = tool.segment("c", points[: k + 1], labels[: k + 1], prev).logits
    tool.close("c")
    return time.perf_counter() - start


def episode_reencoded(tool, image, points, labels) -> float:
    """What a per-call HTTP tool does: encode the image again for every click."""
    start = time.perf_counter()
    prev = None
    for k in range(CLICKS):
        tool.open("u", image)
        prev = tool.segment("u", points[: k + 1], labels[: k + 1], prev).logits
        tool.close("u")
    return time.perf_counter() - start


async def throughput(address: str, images, clicks, concurrency: int) -> tuple[float, int]:
    """Runs all episodes with at most ``concurrency`` in flight; returns (seconds, steps)."""
    client = AsyncBridgeClient(address, deadline_s=600)
    gate = asyncio.Semaphore(concurrency)

    async def one(i):
        async with gate:
            await client.open(f"e{i}", images[i])
            points, labels = clicks[i]
            for k in range(CLICKS):
                await client.segment(f"e{i}", points[: k + 1], labels[: k + 1])
            await client.close(f"e{i}")

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(len(images))))
    elapsed = time.perf_counter() - start
    await client.aclose()
    return elapsed, len(images) * CLICKS


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="MedSAM2_latest.pt (default: random weights)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--side", type=int, default=256, help="test image side in pixels")
    parser.add_argument("--repeats", type=int, default=4, help="episodes timed for the step latency")
    parser.add_argument("--episodes", type=int, default=16, help="episodes per throughput run")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or random_checkpoint(tmp)
        backend = MedSAM2Backend(checkpoint, device=args.device, num_threads=args.threads)
    import torch

    print(f"tool bridge benchmark: medsam2 on {backend.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, images {args.side}x{args.side}, "
          f"max_batch {args.max_batch}, max_wait {args.max_wait_ms} ms")
    images, clicks = images_and_clicks(max(args.episodes, 16), args.side)
    points, labels = clicks[0]
    tool = InProcessTool(backend)
    episode_cached(tool, images[0], points, labels)  # warm-up (allocator, lazy init)

    server = ServerThread(backend, ServerConfig(port=0, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms))
    try:
        local, remote = [], []
        with BridgeClient(server.address) as client:
            time_steps(client, images[0], points, labels, 1, keep_logits=False)  # warm-up
            # Interleaved, so that load from other processes hits both sides alike.
            for _ in range(args.repeats):
                local += time_steps(tool, images[0], points, labels, 1, keep_logits=True)
                remote += time_steps(client, images[0], points, labels, 1, keep_logits=False)
        local_ms, remote_ms = 1e3 * statistics.median(local), 1e3 * statistics.median(remote)
        print(f"\n1. click step (median of {len(local)}):  in-process {local_ms:.1f} ms   "
              f"bridge {remote_ms:.1f} ms   overhead x{remote_ms / local_ms:.2f} (+{remote_ms - local_ms:.1f} ms)")

        cached, reencoded = [], []
        for _ in range(2):
            cached.append(episode_cached(tool, images[1], points, labels))
            reencoded.append(episode_reencoded(tool, images[1], points, labels))
        cached, reencoded = min(cached), min(reencoded)
        print(f"2. {CLICKS}-click episode (in-process, best of 2):  encode once + cache {cached:.2f} s   "
              f"re-encode every step {reencoded:.2f} s   speed-up x{reencoded / cached:.2f}")

        print(f"3. bridge throughput ({len(images)} episodes of open + {CLICKS} clicks + close):")
        for concurrency in (1, 4, 16):
            before = server.server.servicer.batcher.largest_batch
            elapsed, steps = asyncio.run(throughput(server.address, images, clicks, concurrency))
            print(f"   {concurrency:>2} concurrent: {elapsed:6.2f} s   {len(images) / elapsed:6.2f} episodes/s   "
                  f"{steps / elapsed:7.2f} steps/s   largest batch so far "
                  f"{max(before, server.server.servicer.batcher.largest_batch)}")
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
