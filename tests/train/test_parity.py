"""One SFT step on a (2 data, 2 fsdp, 2 tensor) mesh of 8 simulated CPU devices equals the
same step on one device. Runs in a subprocess: XLA_FLAGS must be set before jax is imported,
and other test modules import jax first."""

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow  # ~3 min on 2 cores (two compiles, one of them SPMD over 8 devices)
def test_mesh_step_matches_single_device(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    worker = os.path.join(os.path.dirname(__file__), "parity_worker.py")
    proc = subprocess.run([sys.executable, worker, str(tmp_path)], env=env, capture_output=True, text=True, timeout=900)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    assert line, proc.stderr[-3000:]
    r = json.loads(line[len("RESULT "):])
    assert r["fingerprints"][0] == r["fingerprints"][1]  # same batch
    assert abs(r["loss_one"] - r["loss_mesh"]) < 1e-5 and 5.0 < r["loss_one"] < 7.0
    assert abs(r["grad_norm_one"] - r["grad_norm_mesh"]) < 1e-4 * r["grad_norm_one"]
    # lr 1e-3 Adam: 2e-5 is 2% of one update (Adam's normalisation magnifies fp32 noise on
    # near-zero gradients); a wrong sharding or a missed all-reduce moves params by ~1e-3.
    assert r["max_param_diff"] < 2e-5
    assert r["num_params"] > 50
    # the parameters really are sharded over all three axes
    assert "P('fsdp', 'tensor')" in r["mesh_specs"] and "P('tensor', 'fsdp')" in r["mesh_specs"]
