"""Bad input to every command: one line on stderr naming the file or field, exit code 1 (2 for
usage errors), no traceback, nothing half-written. In process (``cli.main``), so the whole file
costs a few seconds; ``test_real_process_exit_code`` runs one case as a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cli_checks import one_line_error
from data_helpers import write_png
from helpers import write_dataset

from ibis_jax.data.records import manifest_path, shard_paths

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny_cpu.py")

BAD_TOOL = '''
from ibis_jax.tools.protocol import ToolError

def unreachable():
    raise ToolError("bridge 127.0.0.1:1: no server answered within 10 s; start one with `ibis-jax tool serve`")
'''


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return Path(write_dataset(str(tmp_path_factory.mktemp("ds") / "data"), records=2))


@pytest.fixture
def bad_tool_module(tmp_path, monkeypatch) -> str:
    (tmp_path / "bad_tool_mod.py").write_text(BAD_TOOL)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "bad_tool_mod:unreachable"


def _copy_dataset(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_sft_bad_inputs(capsys, tmp_path, dataset):
    work = tmp_path / "work"
    cases = [  # (argv after `sft`, text the line must hold, exit code)
        (["--config", str(tmp_path / "nope.py"), "--data", str(dataset)], "nope.py", 1),
        (["--config", TINY, "--data", str(dataset), "batch_size=abc"], "batch_size=abc", 1),
        (["--config", TINY, "--data", str(dataset), "no_such_field=1"], "no_such_field", 1),
        (["--config", TINY, "--data", str(dataset), "lr"], "write key=value", 1),
        (["--config", TINY, "--data", str(dataset), "image_size=100"], "image_size", 1),
        (["--config", TINY, "--data", str(dataset), "freeze_vision=maybe"], "freeze_vision", 1),
        (["--config", TINY, "--data", str(dataset), "system_prompt=long"], "system_prompt", 1),
        (["--config", TINY, "--data", str(tmp_path / "missing")], "missing", 1),
        (["--config", TINY], "--data", 2),  # usage error
    ]
    syntax = tmp_path / "broken.py"
    syntax.write_text("def get_config(:\n")
    cases.append((["--config", str(syntax), "--data", str(dataset)], "broken.py line 1", 1))
    noget = tmp_path / "noget.py"
    noget.write_text("x = 1\n")
    cases.append((["--config", str(noget), "--data", str(dataset)], "get_config", 1))
    empty = tmp_path / "empty"
    empty.mkdir()
    cases.append((["--config", TINY, "--data", str(empty)], "empty", 1))
    # a truncated shard (kill during a copy), and one whose manifest disagrees with its size
    truncated = _copy_dataset(dataset, tmp_path / "truncated")
    shard = shard_paths(truncated)[0]
    shard.write_bytes(shard.read_bytes()[:5000])
    cases.append((["--config", TINY, "--data", str(truncated)], shard.name, 1))
    manifest_path(shard).unlink()  # no manifest: the reader still names the shard that does not open
    cases.append((["--config", TINY, "--data", str(truncated)], shard.name, 1))
    for argv, text, code in cases:
        one_line_error(capsys, ["sft", *argv, "--workdir", str(work)] if code == 1 else ["sft", *argv],
                       code=code, names=text)
        assert not (work / "tokenizer").exists()  # nothing half-written (was left behind before)
    print(f"sft: {len(cases)} bad inputs, all one-line errors")


def test_synth_bad_inputs(capsys, tmp_path, biomedparse_folder, bad_tool_module):
    out = tmp_path / "out"
    base = ["synth", "--out", str(out), "--no-progress", "--examples", "0"]
    folder = ["--source", "folder", "--root", str(biomedparse_folder)]
    cases = [
        (["--source", "folder"], "--root", 1),
        (["--source", "folder", "--root", str(tmp_path / "nope")], "nope", 1),
        ([*folder, "--tool", "no_such_module:factory"], "no_such_module", 1),
        ([*folder, "--tool", "bogus"], "bogus", 1),
        ([*folder, "--tool", bad_tool_module], "127.0.0.1:1", 1),
        ([*folder, "--window", "sideways"], "sideways", 1),
        ([*folder, "--shard-size", "0"], "shard_size", 1),
        ([*folder, "--query-styles", "rhyming"], "rhyming", 1),
        (["--source", "nifti", "--images", str(tmp_path)], "--labels", 1),
        ([*folder, "--rule", "psychic"], "--rule", 2),
        (["--source", "pdf"], "--source", 2),
    ]
    for argv, text, code in cases:
        one_line_error(capsys, [*base, *argv], code=code, names=text)
        assert not out.exists() or (not shard_paths(out) and not list(out.glob("*.tmp")))
        assert not (out / "config.json").exists()  # a failed first run pins no settings
    # a rerun with other settings, then a torn config.json
    from ibis_jax.cli import main

    assert main([*base, *folder, "--tool", "fake_tool:make_tool", "--max-steps", "2"]) == 0
    one_line_error(capsys, [*base, *folder, "--tool", "fake_tool:make_tool", "--max-steps", "3"],
                   names=("other settings", "--overwrite"))
    (out / "config.json").write_text("")
    one_line_error(capsys, [*base, *folder, "--tool", "fake_tool:make_tool", "--max-steps", "2"],
                   names="config.json")
    print(f"synth: {len(cases) + 2} bad inputs, all one-line errors")


def test_eval_and_segment_bad_inputs(capsys, tmp_path, bad_tool_module):
    image = write_png(tmp_path / "img.png", np.full((32, 32, 3), 90, np.uint8))
    gt = np.zeros((32, 32), np.uint8)
    gt[8:20, 8:20] = 255
    gt_path = write_png(tmp_path / "gt.png", gt)
    corrupt_png = tmp_path / "corrupt.png"
    corrupt_png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    torn = tmp_path / "torn_model"  # what a SIGKILL during the old export left: a 0-byte config.json
    torn.mkdir()
    (torn / "config.json").write_text("")
    vqa_bad = tmp_path / "vqa.json"
    vqa_bad.write_text("[{")
    out = tmp_path / "out"
    demo = ["--source", "demo", "--demo-parts", "shapes", "--num-shapes", "1"]
    eval_cases = [
        (["--policy", "oracle"], "--source", 1),
        (["--policy", str(tmp_path / "no_model"), *demo], "no_model", 1),
        (["--policy", str(torn), *demo], "config.json", 1),
        (["--policy", "oracle", "--vqa", str(tmp_path / "none.json")], "none.json", 1),
        (["--policy", "oracle", "--vqa", str(vqa_bad)], "vqa.json", 1),
        (["--policy", "oracle", "--tool", bad_tool_module, *demo], "127.0.0.1:1", 1),
        (["--policy", "oracle", "--source", "folder", "--root", str(tmp_path / "nothing")], "nothing", 1),
        (["--policy", "oracle", "--history", "some", *demo], "--history", 2),
    ]
    for argv, text, code in eval_cases:
        one_line_error(capsys, ["eval", "--out", str(out), *argv], code=code, names=text)
        assert not out.exists() or not shard_paths(out)
    seg = ["segment", "--out", str(out), "--query", "Segment the square."]
    segment_cases = [
        (["--model", "oracle", "--image", str(tmp_path / "none.png"), "--gt", str(gt_path)], "none.png", 1),
        (["--model", "oracle", "--image", str(corrupt_png), "--gt", str(gt_path)], "corrupt.png", 1),
        (["--model", "oracle", "--image", str(image)], "--gt", 1),
        (["--model", "oracle", "--image", str(image), "--gt", str(tmp_path / "nogt.png")], "nogt.png", 1),
        (["--model", "oracle", "--image", str(image), "--gt", str(gt_path), "--tool", bad_tool_module],
         "127.0.0.1:1", 1),
        (["--model", str(torn), "--image", str(image)], "config.json", 1),
        (["--model", "oracle", "--image", str(image), "--gt", str(gt_path), "--window", "sideways"], "sideways", 1),
        (["--model", "oracle", "--image", str(image), "--gt", str(gt_path), "--max-steps", "x"], "--max-steps", 2),
    ]
    for argv, text, code in segment_cases:
        one_line_error(capsys, [*seg, *argv], code=code, names=text)
        leftovers = sorted(p.name for p in out.iterdir()) if out.exists() else []
        assert not [n for n in leftovers if n != "examples"], leftovers  # no mask, report, gif or summary
    print(f"eval: {len(eval_cases)}, segment: {len(segment_cases)} bad inputs, all one-line errors")


def test_grpo_demo_quickstart_bad_inputs(capsys, tmp_path):
    init = tmp_path / "init"
    init.mkdir()
    (init / "config.json").write_text("{}")
    work = ["--workdir", str(tmp_path / "w")]
    grpo_cases = [
        (["--config", TINY, "--init", str(tmp_path / "none"), *work], "--init", 1),
        (["--config", str(tmp_path / "nope.py"), "--init", str(init), *work], "nope.py", 1),
        (["--config", TINY, "--init", str(init), *work, "rl.steps=abc"], "rl.steps=abc", 1),
        (["--config", TINY, "--init", str(init), *work, "rl.bogus=1"], "rl.bogus", 1),
        (["--config", TINY, "--init", str(init), *work, "lr=fast"], "lr=fast", 1),
        (["--config", TINY, *work], "--init", 2),
    ]
    for argv, text, code in grpo_cases:
        one_line_error(capsys, ["grpo", *argv], code=code, names=text)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    other_cases = [
        (["demo", "--out", str(a_file / "sub"), "--parts", "shapes", "--shapes", "1"], "a_file", 1),
        (["demo", "--parts", "shapes", "--rule", "psychic"], "--rule", 2),
        (["quickstart", "--config", str(tmp_path / "nope.py"), "--out", str(tmp_path / "q")], "nope.py", 1),
        (["quickstart", "--shapes-per-image", "4,2"], "MIN <= MAX", 2),
        (["nonsense"], "nonsense", 2),
    ]
    for argv, text, code in other_cases:
        one_line_error(capsys, argv, code=code, names=text)
    print(f"grpo: {len(grpo_cases)}, demo/quickstart/unknown: {len(other_cases)} bad inputs, all one-line errors")


def test_debug_shows_the_traceback(tmp_path, dataset, monkeypatch):
    from ibis_jax.cli import main

    argv = ["sft", "--config", TINY, "--data", str(dataset), "--workdir", str(tmp_path / "w"), "batch_size=abc"]
    with pytest.raises(ValueError, match="batch_size=abc"):
        main(["--debug", *argv])
    monkeypatch.setenv("IBIS_DEBUG", "1")
    with pytest.raises(ValueError, match="batch_size=abc"):
        main(argv)


def test_real_process_exit_code(tmp_path, dataset):
    """The real entry point: exit status 1, one stderr line, no traceback (one subprocess, ~5 s)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("IBIS_DEBUG", None)
    done = subprocess.run(
        [sys.executable, "-m", "ibis_jax.cli", "sft", "--config", TINY, "--data", str(tmp_path / "none"),
         "--workdir", str(tmp_path / "w")], capture_output=True, text=True, env=env, timeout=120)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert lines[0].startswith("ibis-jax sft: error: ") and "none" in lines[0] and "ibis-jax synth" in lines[0]
    assert not (tmp_path / "w").exists()
