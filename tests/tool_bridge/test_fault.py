"""A server SIGKILLed in the middle of 16 concurrent episodes and restarted on the same port:
every episode completes with the masks of an uninterrupted run, none lost or crossed."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import numpy as np
import pytest

from bridge_helpers import REPO, THREADS, ServerProcess, free_port, make_clicks, make_images
from tool_bridge.backends.base import InProcessTool
from tool_bridge.client import AsyncBridgeClient

EPISODES = 16
STEPS = 4


def reference(tool, images, clicks):
    out = []
    for i, image in enumerate(images):
        tool.open(f"r{i}", image)
        prev, answers = None, []
        for k in range(STEPS):
            result = tool.segment(f"r{i}", np.array([c[0] for c in clicks[i][: k + 1]]),
                                  np.array([c[1] for c in clicks[i][: k + 1]]), prev)
            prev = result.logits
            answers.append((result.mask, result.score))
        tool.close(f"r{i}")
        out.append(answers)
    return out


def run_with_a_crash(server_args, images, clicks, kill_after_steps):
    """Runs the episodes concurrently; SIGKILLs the server after ``kill_after_steps`` answers in
    total and starts a new one on the same port. Returns the answers and the client's replays."""
    port = free_port()
    server = ServerProcess(server_args, port)
    server.wait_ready()
    state = {"done": 0, "restarted": None, "killed_at": None}

    async def restart():
        server.kill()
        state["killed_at"] = state["done"]
        fresh = ServerProcess(server_args, port)
        await asyncio.to_thread(fresh.wait_ready)
        state["restarted"] = fresh

    async def episode(client, i):
        await client.open(f"ep{i}", images[i])
        answers = []
        for k in range(STEPS):
            result = await client.segment(f"ep{i}", np.array([c[0] for c in clicks[i][: k + 1]]),
                                          np.array([c[1] for c in clicks[i][: k + 1]]))
            answers.append((result.mask, result.score))
            state["done"] += 1
            if state["done"] == kill_after_steps:
                asyncio.get_running_loop().create_task(restart())
        await client.close(f"ep{i}")
        return answers

    async def main():
        client = AsyncBridgeClient(server.address, deadline_s=120, max_attempts=8, backoff_s=0.1)
        try:
            return await asyncio.gather(*(episode(client, i) for i in range(EPISODES))), client.replays
        finally:
            await client.aclose()

    try:
        results, replays = asyncio.run(main())
    finally:
        server.kill()
        if state["restarted"] is not None:
            state["restarted"].kill()
    assert state["restarted"] is not None, "the server was never killed"
    assert 0 < state["killed_at"] < EPISODES * STEPS
    return results, replays


def check(results, expected, replays):
    assert len(results) == EPISODES
    for got, want in zip(results, expected):
        assert len(got) == STEPS
        for (mask, score), (mask_ref, score_ref) in zip(got, want):
            np.testing.assert_array_equal(mask, mask_ref)
            assert score == score_ref
    # Every episode's answers are its own: masks of different episodes differ.
    assert len({r[-1][0].tobytes() for r in results}) == EPISODES
    assert replays > 0  # the restart really lost server state


def test_classical_server_killed_mid_run_and_restarted():
    pytest.importorskip("skimage")
    from tool_bridge.backends.classical import ClassicalBackend

    images = make_images(EPISODES, seed=7)
    clicks = [make_clicks(STEPS, seed=200 + i) for i in range(EPISODES)]
    expected = reference(InProcessTool(ClassicalBackend()), images, clicks)
    results, replays = run_with_a_crash(["--backend", "classical"], images, clicks,
                                        kill_after_steps=EPISODES * STEPS // 2)
    check(results, expected, replays)


@pytest.mark.slow
def test_medsam2_server_killed_mid_run_and_restarted(backend, checkpoint):
    images = make_images(EPISODES, seed=8)
    clicks = [make_clicks(STEPS, seed=300 + i) for i in range(EPISODES)]
    expected = reference(InProcessTool(backend), images, clicks)
    args = ["--backend", "medsam2", "--checkpoint", checkpoint, "--threads", str(THREADS)]
    results, replays = run_with_a_crash(args, images, clicks, kill_after_steps=EPISODES * STEPS // 2)
    check(results, expected, replays)


def test_ping_command_reports_a_live_server():
    port = free_port()
    server = ServerProcess(["--backend", "classical"], port)
    try:
        server.wait_ready()
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        done = subprocess.run([sys.executable, "-m", "ibis_jax.cli", "tool", "ping", server.address],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert "SERVING" in done.stdout and "backend classical" in done.stdout
    finally:
        server.kill()
    done = subprocess.run([sys.executable, "-m", "ibis_jax.cli", "tool", "ping", server.address, "--timeout", "1"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "UNAVAILABLE" in done.stderr
