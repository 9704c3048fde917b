import numpy as np
import pytest

from ibis_jax.agent.grammar import Terminate, parse_turn
from ibis_jax.data.records import (
    RecordError,
    ShardWriter,
    TrajectoryDataSource,
    TrajectoryRecord,
    decode_png,
    encode_png,
    shard_paths,
)
from ibis_jax.data.rle import decode_rle
from ibis_jax.data.sources import DemoSource
from ibis_jax.synth import SynthConfig, synthesize_trajectory
from fake_tool import DiskTool


@pytest.fixture(scope="module")
def outcomes():
    source = DemoSource(parts=("shapes",), num_shapes=3, shapes_size=64)
    samples = [s for item in source.items() for s in source.load(item)]
    tool = DiskTool()
    cfg = SynthConfig(max_clicks=4, stop_iou=0.95, self_correction=0.5, seed=2)
    return samples, [synthesize_trajectory(s, tool, cfg, tool_name="disk") for s in samples]


def test_bytes_round_trip(outcomes):
    samples, results = outcomes
    for sample, result in zip(samples, results):
        record = result.record
        back = TrajectoryRecord.from_bytes(record.to_bytes())
        assert back == record
        assert np.array_equal(back.image(), sample.image)
        assert np.array_equal(back.gt(), sample.mask)


def test_shard_write_read_identical_masks_and_texts(outcomes, tmp_path):
    _, results = outcomes
    path = tmp_path / "trajectories-00000-of-00001.array_record"
    with ShardWriter(path) as writer:
        for r in results:
            writer.write(r.record)
        writer.commit()
    assert shard_paths(tmp_path) == [path] and not list(tmp_path.glob("*.tmp"))
    source = TrajectoryDataSource(tmp_path)
    assert len(source) == len(results)
    for i, r in enumerate(results):
        got, want = source[i], r.record
        assert [s.text for s in got.steps] == [s.text for s in want.steps]
        assert [s.reasoning for s in got.steps] == [s.reasoning for s in want.steps]
        assert [s.user for s in got.steps] == [s.user for s in want.steps]
        for a, b in zip(got.steps, want.steps):
            assert np.array_equal(decode_rle(a.mask), decode_rle(b.mask))
        assert got.answer == want.answer and got.query == want.query
    raw = TrajectoryDataSource(tmp_path, decode=False)
    assert isinstance(raw[0], bytes) and TrajectoryRecord.from_bytes(raw[0]) == results[0].record


def test_grain_reads_the_source(outcomes, tmp_path):
    import grain

    _, results = outcomes
    with ShardWriter(tmp_path / "trajectories-00000-of-00001.array_record") as writer:
        for r in results:
            writer.write(r.record)
        writer.commit()
    dataset = grain.MapDataset.source(TrajectoryDataSource(tmp_path, decode=False)).map(TrajectoryRecord.from_bytes)
    assert [dataset[i].record_id for i in range(len(dataset))] == [r.record.record_id for r in results]


def test_step_masks_match_the_episode(outcomes):
    _, results = outcomes
    record = results[0].record
    assert record.num_sft_samples == record.num_clicks + 1
    assert not record.observation_mask(0).any()  # M_0 is empty
    for i, step in enumerate(record.steps):
        assert np.array_equal(record.step_mask(i), decode_rle(step.mask))
        parsed = parse_turn(step.text, strict=True)  # every synthesized turn passes the format check
        assert parsed.reasoning == step.reasoning
        if step.kind == "click":
            assert (step.col, step.row) == (min(int(step.x * record.width), record.width - 1),
                                            min(int(step.y * record.height), record.height - 1))
    assert isinstance(parse_turn(record.steps[-1].text, strict=True).action, Terminate)


def test_writer_aborts_on_error(tmp_path):
    path = tmp_path / "trajectories-00000-of-00001.array_record"
    with pytest.raises(RuntimeError):
        with ShardWriter(path) as writer:
            writer.write(b"IBTR")
            raise RuntimeError("crash mid-shard")
    assert list(tmp_path.iterdir()) == []


def test_bad_bytes_raise():
    with pytest.raises(RecordError, match="bad magic"):
        TrajectoryRecord.from_bytes(b"not a record")
    with pytest.raises(RecordError, match="version"):
        TrajectoryRecord.from_bytes(b"IBTR" + bytes([9]) + b"\0\0\0\0")


def test_png_round_trip_is_lossless():
    image = np.random.default_rng(0).integers(0, 256, size=(7, 5, 3), dtype=np.uint8)
    assert np.array_equal(decode_png(encode_png(image)), image)
