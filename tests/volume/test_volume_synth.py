"""Volume trajectories: ``ibis-jax synth --source volumes`` writes records holding the slice each
turn saw, and the SFT samples built from them are exactly what the volume episode showed."""

import json
import struct

import numpy as np
import pytest

from ibis_jax.agent.grammar import Click, parse_turn
from ibis_jax.agent.overlay import draw_clicks, render_overlay
from ibis_jax.agent.volume import VOLUME_PROMPT_NOTE, VolumeEpisode, VolumeEpisodeConfig
from ibis_jax.cli import main
from ibis_jax.data.records import MAGIC, TrajectoryRecord, read_records, shard_paths
from ibis_jax.data.sources.volumes import EllipsoidVolumeSource
from ibis_jax.models.qwen2_5_vl.processor import Qwen25VLProcessor
from ibis_jax.models.qwen2_5_vl.tiny import make_tokenizer_dir
from ibis_jax.report.pictures import step_frame
from ibis_jax.tools.volume import ClassicalVolumeTool
from ibis_jax.train.samples import observations, record_conversations, record_samples


@pytest.fixture(scope="module")
def volume_records(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth3d")
    code = main(["synth", "--source", "volumes", "--volumes", "ellipsoids:2", "--tool", "classical", "--max-steps", "4",
                 "--out", str(out), "--no-progress", "--examples", "0"])
    assert code == 0
    records = [r for p in shard_paths(out) for r in read_records(p)]
    return out, records


def test_records_replay_to_the_observations_the_episode_showed(volume_records):
    _, records = volume_records
    samples = {s.sample_id: s for item in EllipsoidVolumeSource(2).items() for s in EllipsoidVolumeSource(2).load(item)}
    assert sorted(r.record_id for r in records) == sorted(samples)
    for record in records:
        sample = samples[record.record_id]
        assert record.views and len(record.views) == len(record.steps) + 1 and record.gt_mask is None
        assert record.meta["volume"]["shape"] == list(sample.volume.shape)
        # replay the recorded turns through a fresh episode with the same (deterministic) tool
        episode = VolumeEpisode(sample.volume, sample.spacing, record.query, sample.mask,
                                config=VolumeEpisodeConfig(max_actions=len(record.steps)))
        tool = ClassicalVolumeTool()
        episode.open_tool(tool)
        shown = []
        for step in record.steps:
            shown.append(episode.observation())
            episode.step(parse_turn(step.text).action, tool)
        assert [s.slice for s in episode.steps] + [episode.current_slice] == [v["slice"] for v in record.views]
        for t, image in enumerate(observations(record)):
            np.testing.assert_array_equal(image, shown[t])
        # the example pictures draw the final mask on the slice on view at the end
        final = render_overlay(np.repeat(sample.volume[episode.current_slice][:, :, None], 3, axis=2),
                               episode.current_mask[episode.current_slice])
        on_view = [Click(c.x, c.y, c.positive) for c in episode.clicks if episode.position(c)[0] == episode.current_slice]
        np.testing.assert_array_equal(step_frame(record, len(record.steps) - 1), draw_clicks(final, on_view))
        assert record.final_dice == pytest.approx(episode.dices[-1])
        clicks = [s for s in record.steps if s.kind == "click"]
        # slice-then-3d: on the slice on view while it shows an error (the first view always does)
        assert clicks and clicks[0].slice == record.views[0]["slice"]
        for s in clicks:
            view = record.views[s.index]["slice"]
            on_view_errors = (episode.steps[s.index].prev_mask[view] != sample.mask[view]).any()
            assert (s.slice == view) == bool(on_view_errors)


def test_sft_samples_carry_the_slice_text_and_the_volume_note(volume_records, tmp_path):
    _, records = volume_records
    record = records[0]
    conversations = record_conversations(record, system_prompt="Segment.")
    for t, messages in conversations:
        assert messages[0].text == f"Segment.\n\n{VOLUME_PROMPT_NOTE}"
        depth = record.meta["volume"]["shape"][0]
        assert messages[1].text.endswith(f"Slice {record.views[t]['slice'] + 1} of {depth} "
                                         f"(z = {(record.views[t]['slice'] + 0.5) / depth:.4f}).")
    processor = Qwen25VLProcessor(make_tokenizer_dir(tmp_path / "tok", grammar_tokens=True))
    samples = record_samples(record, processor.tokenizer, image_size=56, system_prompt="Segment.")
    assert len(samples) == len(record.steps) and all(s.loss_weights.sum() > 0 for s in samples)


def test_version_1_records_still_read(volume_records):
    _, records = volume_records
    v2 = records[0]
    header = v2.header()
    for key in ("views", "view_png_sizes"):
        header.pop(key)
    body = json.dumps(header).encode()
    v1 = TrajectoryRecord.from_bytes(MAGIC + struct.pack("<BI", 1, len(body)) + body + v2.image_png)
    assert v1.views is None and v1.view_pngs == [] and v1.image_png == v2.image_png
    again = TrajectoryRecord.from_bytes(v2.to_bytes())
    assert again.view_pngs == v2.view_pngs and again.views == v2.views
    with pytest.raises(Exception, match="truncated"):
        TrajectoryRecord.from_bytes(v2.to_bytes()[: -sum(len(p) for p in v2.view_pngs) - len(v2.image_png)])
