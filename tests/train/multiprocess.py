"""Launch `ibis-jax` commands as N processes on loopback (each with its own simulated CPU
devices and JAX's CPU collectives), with timeouts, and kill every child on failure."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(devices: int) -> dict:
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
                PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


CLI = ("-m", "ibis_jax.cli")


def launch(args: list[str], processes: int, devices: int, log_dir: str, timeout: float = 600,
           program: tuple[str, ...] = CLI) -> list[str]:
    """Run `python -m ibis_jax.cli ARGS` (or `python PROGRAM ARGS`) as `processes` processes on
    one coordinator port; returns their logs. Raises with the logs when one fails or the timeout
    passes (all children killed)."""
    return finish(*start(args, processes, devices, log_dir, program), timeout=timeout)


def metrics(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def start(args: list[str], processes: int, devices: int, log_dir: str,
          program: tuple[str, ...] = CLI) -> tuple[list, list[str]]:
    """Like `launch` but returns the running (Popen, log file) pairs; `finish` waits for them."""
    os.makedirs(log_dir, exist_ok=True)
    port = free_port()
    procs, logs = [], []
    for i in range(processes):
        extra = [] if processes == 1 else ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes),
                                           "--process-id", str(i)]
        logs.append(os.path.join(log_dir, f"process_{i}.log"))
        f = open(logs[-1], "w")
        procs.append((subprocess.Popen([sys.executable, *program, *args, *extra], env=env(devices),
                                       stdout=f, stderr=subprocess.STDOUT, cwd=ROOT), f))
    return procs, logs


def finish(procs: list, logs: list[str], timeout: float = 600) -> list[str]:
    try:
        for p, _ in procs:
            p.wait(timeout=timeout)
    except BaseException:
        for p, _ in procs:
            if p.poll() is None:
                p.kill()
        for p, _ in procs:
            p.wait(timeout=30)
        raise
    finally:
        for _, f in procs:
            f.close()
    texts = [open(l).read() for l in logs]
    bad = [(i, p.returncode) for i, (p, _) in enumerate(procs) if p.returncode != 0]
    if bad:
        raise AssertionError(f"processes {bad} failed:\n" + "\n".join(f"--- {i}\n{texts[i][-4000:]}" for i, _ in bad))
    return texts
