"""Helpers shared by the tool bridge tests (images, clicks, subprocess servers)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np

# One torch thread everywhere (this process and server subprocesses): the CI box has 2 cores,
# and equal thread counts keep CPU reductions, hence masks, identical across processes.
THREADS = 1
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_images(count: int, size: tuple[int, int] = (64, 80), seed: int = 0) -> list[np.ndarray]:
    """Smooth random RGB images with a bright disc, so masks differ between images."""
    rng = np.random.default_rng(seed)
    height, width = size
    rows, cols = np.mgrid[0:height, 0:width]
    images = []
    for _ in range(count):
        base = rng.integers(0, 256, (4, 5, 3)).astype(np.float32)
        coarse = np.kron(base, np.ones((height // 4 + 1, width // 5 + 1, 1)))[:height, :width]
        cy, cx, r = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width, rng.uniform(6, 16)
        disc = ((rows - cy) ** 2 + (cols - cx) ** 2 < r * r)[..., None] * 120.0
        images.append(np.clip(coarse * 0.5 + disc + rng.normal(0, 8, coarse.shape), 0, 255).astype(np.uint8))
    return images


def make_clicks(count: int, size: tuple[int, int] = (64, 80), seed: int = 0) -> list[tuple[list[float], int]]:
    """``count`` clicks (pixel x, y; label), first one positive."""
    rng = np.random.default_rng(seed)
    height, width = size
    clicks = []
    for i in range(count):
        x, y = float(rng.integers(0, width)), float(rng.integers(0, height))
        clicks.append(([x, y], 1 if i == 0 else int(rng.integers(0, 2))))
    return clicks


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """``python -m ibis_jax.cli tool serve ...`` in a subprocess, killable with SIGKILL."""

    def __init__(self, args: list[str], port: int) -> None:
        self.port = port
        self.address = f"127.0.0.1:{port}"
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ibis_jax.cli", "tool", "serve", "--port", str(port), *args],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )

    def wait_ready(self, timeout: float = 120.0) -> str:
        """Reads output until the 'serving' line; returns what was read."""
        seen = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"server exited with {self.proc.wait()}: {''.join(seen)[-3000:]}")
            seen.append(line)
            if line.startswith("tool_bridge: serving"):
                # Keep reading so the server never blocks on a full pipe while it logs.
                threading.Thread(target=self.proc.stdout.read, daemon=True).start()
                return "".join(seen)
        raise RuntimeError(f"server not ready in {timeout} s: {''.join(seen)[-3000:]}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


class FakeBackend:
    """A cheap deterministic backend for server-logic tests: mask = pixels brighter than a
    threshold that moves with the clicks and the previous logits; records batch sizes."""

    name = "fake"
    image_size = 0
    device = "cpu"

    def __init__(self, checkpoint_sha256: str = "fake-sha", encode_delay_s: float = 0.0) -> None:
        self.checkpoint_sha256 = checkpoint_sha256
        self.encode_delay_s = encode_delay_s
        self.encode_batches: list[int] = []
        self.decode_batches: list[int] = []
        self.released = 0

    def encode(self, images):
        from tool_bridge.backends.base import Encoded

        self.encode_batches.append(len(images))
        time.sleep(self.encode_delay_s)
        return [Encoded(image.mean(axis=2), image.shape[0], image.shape[1], image.nbytes) for image in images]

    def decode(self, requests):
        from ibis_jax.tools.protocol import SegmentResult

        self.decode_batches.append(len(requests))
        out = []
        for r in requests:
            gray = r.encoded.payload
            level = float(np.mean([gray[int(y), int(x)] for x, y in r.points])) - 20.0 * float(np.mean(r.labels == 0))
            if r.prev_logits is not None:
                level += float(r.prev_logits.mean()) * 0.1
            logits = (gray - level).astype(np.float32)
            out.append(SegmentResult(mask=logits > 0, logits=logits, score=float(np.float32(np.tanh(level / 255.0)))))  # the wire carries float32
        return out

    def release(self, encoded) -> None:
        self.released += 1

    def check_logits(self, prev_logits):
        return prev_logits
