"""bench/grounding_probe.py runs on both families (two steps) and prints its table: one row per
(family, seed) with content / row / column / cell accuracy, and the majority anchors.

A subprocess with XLA's CPU backend optimisation off: compiling the two training steps is most of
the time (about 25 s on two loaded cores this way, 50 s in-process with the default flags)."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_probe_table_rows_for_both_families():
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
    cmd = [sys.executable, os.path.join(ROOT, "bench", "grounding_probe.py"), "--family", "both",
           "--probes", "content,row,column", "--train", "mixed", "--steps", "2", "--batch", "4",
           "--held-out", "8", "--seeds", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "| family | seed | content | row | column | cell | final loss | train s |" in out
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| qwen"):
            rows[(cells[0], cells[1])] = cells
    assert set(rows) == {("qwen2_5_vl", "0"), ("qwen3_vl", "0"), ("qwen2_5_vl", "majority"), ("qwen3_vl", "majority")}
    for family in ("qwen2_5_vl", "qwen3_vl"):
        content, row, column, cell = (float(x) for x in rows[(family, "0")][2:6])
        assert 0.0 <= cell <= min(row, column) <= 1.0 and 0.0 <= content <= 1.0
        assert all(0.0 < float(x) <= 1.0 for x in rows[(family, "majority")][2:6])
    # both families see 4 x 4 visual tokens, and the mRoPE printout follows each decoder's band layout
    assert "112 px -> 4^2 visual tokens" in out and "128 px -> 4^2 visual tokens" in out
    assert "qwen3_vl: decoder 2 layers x 128" in out and "interleaved" in out
    assert "total wall time" in out


def test_rope_turn_follows_the_band_layout():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        from grounding_probe import rope_turn
    finally:
        sys.path.remove(os.path.join(ROOT, "bench"))
    # Qwen2.5-VL tiny: width on the lowest frequencies, two columns < 1e-3 rad apart on a 4 x 4 grid
    assert rope_turn(32, (4, 6, 6), 1e6, 4)["width"] < 1e-3
    # Qwen3-VL interleaved: bands cycle t, h, w, so width's fastest band is band 2
    turn = rope_turn(32, (6, 5, 5), 5e6, 4, interleaved=True)
    assert abs(turn["width"] - 3 * 5e6 ** (-4 / 32)) < 1e-9 and abs(turn["height"] - 3 * 5e6 ** (-2 / 32)) < 1e-9
