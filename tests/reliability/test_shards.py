"""Shards count as done only when their manifest entry says so; synth reruns redo corrupt or
incomplete ones and say which; readers (the data source, SFT) name the shard of a bad record."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import make_record, write_dataset

from ibis_jax.cli import main
from ibis_jax.data.records import (
    TrajectoryDataSource,
    manifest_path,
    read_manifest_entry,
    read_records,
    shard_is_complete,
    shard_paths,
    shard_problem,
)
from ibis_jax.errors import DataError


def _flip_middle(path: Path) -> None:
    """Garbles bytes inside the records, keeping the file size (bit rot, a bad copy)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 8  # inside the first records' chunks, well before the footer
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    path.write_bytes(bytes(data))


def test_manifest_entry_and_shard_problems(tmp_path):
    shard = shard_paths(write_dataset(str(tmp_path / "d"), records=3))[0]
    entry = read_manifest_entry(shard)
    assert entry["records"] == 3 and entry["bytes"] == shard.stat().st_size and len(entry["sha256"]) == 64
    assert shard_is_complete(shard) and shard_problem(shard) is None
    original = shard.read_bytes()
    _flip_middle(shard)
    assert "SHA-256" in shard_problem(shard) and shard_problem(shard, checksum=False) is None
    shard.write_bytes(original[:-10])
    assert "truncated" in shard_problem(shard)
    shard.write_bytes(original)
    manifest_path(shard).unlink()
    assert "no manifest entry" in shard_problem(shard) and not shard_is_complete(shard)


def test_readers_name_the_shard(tmp_path):
    shard = shard_paths(write_dataset(str(tmp_path / "d"), records=3))[0]
    original = shard.read_bytes()
    shard.write_bytes(original[: len(original) // 2])  # truncated: the manifest size disagrees
    with pytest.raises(DataError, match=rf"{shard.name}.*truncated"):
        TrajectoryDataSource(tmp_path / "d")
    manifest_path(shard).unlink()  # no manifest (older data): the open error still names the shard
    with pytest.raises(DataError, match=rf"{shard.name}.*does not open"):
        TrajectoryDataSource(tmp_path / "d")
    shard.write_bytes(original)
    _flip_middle(shard)  # same size: opens, then a record does not read
    source = TrajectoryDataSource(tmp_path / "d")
    with pytest.raises(DataError, match=rf"{shard.name}: corrupt or incomplete shard \(record \d+ does not read"):
        list(source)


def test_sft_names_the_shard_of_a_corrupt_record(tmp_path, capsys):
    data = write_dataset(str(tmp_path / "d"), records=3)
    shard = shard_paths(data)[0]
    _flip_middle(shard)
    work = tmp_path / "w"
    rc = main(["sft", "--config", str(Path(__file__).parents[2] / "configs" / "tiny_cpu.py"), "--data", data,
               "--workdir", str(work), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("ibis-jax sft: error: ") and shard.name in last and "does not read" in last
    assert not (work / "tokenizer").exists() and not list(work.glob(".tokenizer*"))  # nothing half-written


def test_synth_rerun_redoes_corrupt_and_incomplete_shards(tmp_path, capsys, biomedparse_folder):
    out = tmp_path / "out"
    argv = ["synth", "--source", "folder", "--root", str(biomedparse_folder), "--tool", "fake_tool:make_tool",
            "--max-steps", "3", "--shard-size", "1", "--out", str(out), "--no-progress", "--examples", "1"]
    assert main(argv) == 0
    first = {r.record_id: r.to_bytes() for r in read_records(out)}
    shards = shard_paths(out)
    assert len(shards) == 2 and all(shard_is_complete(s) for s in shards)
    capsys.readouterr()
    assert main(argv) == 0  # all done: nothing redone
    assert "0 corrupt or incomplete ones redone" in capsys.readouterr().out
    shards[0].write_bytes(shards[0].read_bytes()[:5000])  # truncated (a kill during a copy)
    manifest_path(shards[1]).unlink()  # renamed, but killed before its manifest entry
    assert main(argv) == 0
    printed = capsys.readouterr()
    assert f"re-synthesized {shards[0].name}: " in printed.out and "truncated" in printed.out
    assert f"re-synthesized {shards[1].name}: no manifest entry" in printed.out
    assert "2 corrupt or incomplete ones redone" in printed.out
    assert all(shard_is_complete(s) for s in shards)
    assert {r.record_id: r.to_bytes() for r in read_records(out)} == first  # the same records again


def test_shard_writer_rewrite_drops_the_old_entry(tmp_path):
    from ibis_jax.data.records import ShardWriter

    path = tmp_path / "trajectories-00000-of-00001.array_record"
    with ShardWriter(path) as w:
        w.write(make_record(0))
        w.commit()
    assert shard_is_complete(path)
    with ShardWriter(path) as w:  # a rewrite that dies before its commit
        w.write(make_record(1))
        assert not manifest_path(path).exists()  # the old entry no longer vouches for the file
    assert not shard_is_complete(path)
