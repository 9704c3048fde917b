"""HF export straight from a state sharded over 8 simulated devices (full fine-tuning and LoRA)
equals `save_hf` of the same parameters on the host byte for byte, and holds about one
safetensors shard in host memory. A subprocess: XLA_FLAGS must be set before jax is imported."""

import json
import os
import subprocess
import sys


def test_sharded_export_equals_host_export(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    worker = os.path.join(os.path.dirname(__file__), "export_worker.py")
    proc = subprocess.run([sys.executable, worker, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    assert line, proc.stderr[-3000:]
    r = json.loads(line[len("RESULT "):])
    for name in ("full", "lora"):
        m = r[name]
        print(f"{name}: {m['num_shards']} shards, largest {m['max_shard_bytes']} B of {m['total_bytes']} B; "
              f"peak host memory of the sharded export {m['peak_host_bytes']} B "
              f"({m['peak_host_bytes'] / m['max_shard_bytes']:.2f} shards), host save_hf {m['reference_peak_host_bytes']} B")
        assert m["same_bytes"]  # every file: safetensors shards, index, config.json, ibis_agent.json
        assert m["num_shards"] > 8
        # streamed: about one shard (+ one tensor in flight), far from the whole model
        assert m["peak_host_bytes"] < 3 * m["max_shard_bytes"] < m["total_bytes"]
        assert "P('fsdp', 'tensor')" in m["specs"] and "P('tensor', 'fsdp')" in m["specs"]
