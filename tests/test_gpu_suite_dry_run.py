"""The GPU suite's dry run (configs and shapes only) runs on a CPU, so the suite cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_suite_dry_run_writes_the_summary(tmp_path):
    out = tmp_path / "suite"
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_suite.py"), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "suite.json").read_text())
    assert summary["dry_run"] and set(summary["sections"]) == {"parity", "decode", "sft", "sidecar", "agent"}
    decode = summary["sections"]["decode"]
    assert 60 < decode["medium"]["params_M"] < 200 and 800 < decode["1b"]["params_M"] < 1300
    assert summary["sections"]["sft"]["train_tflops_per_step"] > 0
    assert summary["sections"]["parity"]["input_ids"][1] > 256  # 256 image tokens + text
    assert "agent_case.py" in summary["sections"]["agent"]["command"]
    assert "## decode" in (tmp_path / "suite.md").read_text()
