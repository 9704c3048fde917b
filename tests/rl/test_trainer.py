"""Two GRPO steps end to end: tiny model, classical tool, real token ids, Orbax resume."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from ibis_jax.agent.grammar import Click, Terminate, format_turn
from ibis_jax.agent.loop import PolicyTurn
from ibis_jax.data.shapes import synthetic_shapes
from ibis_jax.data.sources.base import Sample
from ibis_jax.models.qwen2_5_vl import Qwen25VL, save_hf
from ibis_jax.models.qwen2_5_vl.tiny import make_tokenizer_dir, tiny_config
from ibis_jax.rl.grpo import GRPOConfig
from ibis_jax.rl.trainer import RLConfig, train_grpo
from ibis_jax.tools.classical import ClassicalTool
from ibis_jax.train.config import TrainConfig


class RandomClickPolicy:
    """Emits random clicks or a terminate as real token ids of the run's tokenizer, so rollouts
    differ within a group and the update has a signal. (The model sampler is tested elsewhere.)"""

    def __init__(self, processor, seed):
        self.processor, self.rng = processor, np.random.default_rng(seed)

    def generate(self, requests):
        turns = []
        for _ in requests:
            if self.rng.random() < 0.3:
                text = format_turn("done", Terminate(), "shape")
            else:
                x, y = self.rng.uniform(0.1, 0.9, 2).round(4)
                text = format_turn("try", Click(float(x), float(y), bool(self.rng.random() < 0.8)))
            ids = tuple(self.processor.tokenizer(text, add_special_tokens=False)["input_ids"])
            turns.append(PolicyTurn(text, ids, np.zeros(len(ids), np.float32), "stop"))
        return turns


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    tok = make_tokenizer_dir(root / "tok")
    model = Qwen25VL(tiny_config(tok), rngs=nnx.Rngs(0))
    save_hf(model, root / "hf", source_dir=tok)
    return str(root / "hf")


def test_two_grpo_steps_update_and_resume(init_dir, tmp_path):
    samples = [Sample(s.image, s.mask, s.target, "Synthetic", s.sample_id, "shapes", {})
               for s in synthetic_shapes(2, size=64, seed=0)]
    config = TrainConfig(image_size=56, lr=1e-3, warmup_frac=0.0, checkpoint_every=1, mesh_shape=(1, 1, 1))
    rl = RLConfig(steps=2, prompts_per_step=2, max_turns=2, grpo=GRPOConfig(group_size=2), seq_buckets=(1024,),
                  export_every=1)
    factory = lambda model, processor, rl_cfg, seed, settings: RandomClickPolicy(processor, seed=seed)
    seen = []
    out = train_grpo(config, rl, samples, ClassicalTool(), str(tmp_path), init_dir=init_dir,
                     policy_factory=factory, hooks=[lambda step, m: seen.append((step, m))])
    assert [s for s, _ in seen] == [1, 2]
    m = seen[0][1]
    for key in ("loss", "grad_norm", "reward", "reward/format", "reward/click", "iou", "steps_per_episode",
                "parse_failure_rate", "clip_fraction", "entropy", "time/generation_s", "time/update_s"):
        assert key in m and np.isfinite(m[key]), key
    assert m["reward/format"] == 1.0  # canonical text passes the strict check
    assert m["policy_tokens"] > 0 and m["grad_norm"] > 0
    # GRPO runs at a constant rate (no SFT warmup-cosine): the same on both steps
    assert [s_m["learning_rate"] for _, s_m in seen] == [np.float32(1e-3)] * 2
    assert m["sampler_vs_old_logprob_max_abs"] >= 0
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[1])["step"] == 2
    # A rerun resumes at the last checkpoint: nothing left to do, same parameters.
    again = train_grpo(config, rl, samples, ClassicalTool(), str(tmp_path), init_dir=init_dir, policy_factory=factory)
    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), out["state"].params, again["state"].params)
    assert all(jax.tree.leaves(same))
    # The final policy as an HF directory with the agent record; transformers loads it, trained.
    from transformers import Qwen2_5_VLForConditionalGeneration

    from ibis_jax.agent.settings import AGENT_FILE, load_agent_settings

    assert out["export_dir"] == str(tmp_path / "hf")
    assert (tmp_path / "hf" / AGENT_FILE).exists() and load_agent_settings(tmp_path / "hf").system_prompt == config.system_prompt
    assert (tmp_path / "exports" / "step_1" / AGENT_FILE).exists()  # --export-every 1; step 2 is the final
    assert not (tmp_path / "exports" / "step_2").exists()
    trained = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    initial = Qwen2_5_VLForConditionalGeneration.from_pretrained(init_dir, local_files_only=True)
    a, b = trained.state_dict(), initial.state_dict()
    assert set(a) == set(b)
    assert any(not np.allclose(a[k].numpy(), b[k].numpy()) for k in a)  # GRPO moved the weights


def test_each_step_samples_with_its_own_seed():
    from ibis_jax.rl.trainer import rollout_seed

    rl = RLConfig(seed=0)
    seeds = [rollout_seed(rl, step) for step in range(50)]
    assert len(set(seeds)) == 50
    assert seeds == [rollout_seed(rl, step) for step in range(50)]  # a resumed step replays its seed
    assert rollout_seed(RLConfig(seed=1), 0) != seeds[0]
    # on several processes each samples its own stream (a group may span two); process 0 keeps the single-process one
    assert rollout_seed(rl, 3, 0) == seeds[3] and len({rollout_seed(rl, 3, p) for p in range(4)}) == 4


def test_grpo_refuses_a_config_that_differs_from_the_model_record(init_dir, tmp_path):
    import shutil

    from ibis_jax.agent.settings import AGENT_FILE, AgentSettings, save_agent_settings

    short_dir = tmp_path / "short"
    shutil.copytree(init_dir, short_dir)
    save_agent_settings(short_dir, AgentSettings("short", image_size=56))
    samples = [Sample(s.image, s.mask, s.target, "Synthetic", s.sample_id, "shapes", {})
               for s in synthetic_shapes(1, size=64, seed=0)]
    with pytest.raises(ValueError, match=f"system_prompt='short' \\({AGENT_FILE}\\).*set the config to 'short'"):
        train_grpo(TrainConfig(image_size=56, mesh_shape=(1, 1, 1)), RLConfig(steps=1), samples, ClassicalTool(),
                   str(tmp_path / "work"), init_dir=str(short_dir))
    assert not (tmp_path / "work" / "metrics.jsonl").exists()


def test_grpo_schedule_constant_with_optional_warmup():
    from ibis_jax.rl.trainer import grpo_schedule

    config = TrainConfig(lr=1e-6, warmup_frac=0.1, end_lr_frac=0.0)  # SFT's fields do not apply
    constant = grpo_schedule(config, RLConfig(steps=100))
    np.testing.assert_allclose([float(constant(s)) for s in (0, 1, 50, 99, 100)], [1e-6] * 5, rtol=1e-7)
    warm = grpo_schedule(config, RLConfig(steps=100, warmup_steps=4))
    np.testing.assert_allclose([float(warm(s)) for s in (0, 2, 4, 50, 99)], [0, 5e-7, 1e-6, 1e-6, 1e-6], rtol=1e-6)
    cosine = grpo_schedule(config, RLConfig(steps=100, lr_schedule="cosine"))
    assert float(cosine(99)) < 1e-7  # SFT's schedule only when asked for
    with pytest.raises(ValueError, match="lr_schedule"):
        grpo_schedule(config, RLConfig(lr_schedule="linear"))


def test_grad_accum_two_equals_one_double_micro_batch(init_dir, tmp_path):
    samples = [Sample(s.image, s.mask, s.target, "Synthetic", s.sample_id, "shapes", {})
               for s in synthetic_shapes(2, size=64, seed=0)]
    rl = RLConfig(steps=1, prompts_per_step=2, max_turns=1, grpo=GRPOConfig(group_size=4), seq_buckets=(1024,))
    factory = lambda model, processor, rl_cfg, seed, settings: RandomClickPolicy(processor, seed=seed)
    out, seen = {}, {}
    for accum in (1, 2):
        config = TrainConfig(image_size=56, lr=1e-3, warmup_frac=0.0, checkpoint_every=100, mesh_shape=(1, 1, 1),
                             batch_size=8, grad_accum=accum)
        out[accum] = train_grpo(config, rl, samples, ClassicalTool(), str(tmp_path / str(accum)), init_dir=init_dir,
                                policy_factory=factory, hooks=[lambda step, m, a=accum: seen.setdefault(a, m)])
    m1, m2 = seen[1], seen[2]
    assert (m1["micro_batches"], m2["micro_batches"]) == (1, 2)
    assert m1["reward"] == m2["reward"] and m1["policy_tokens"] == m2["policy_tokens"] > 0
    assert abs(m1["loss"] - m2["loss"]) < 1e-6 + 1e-5 * abs(m1["loss"])
    assert abs(m1["grad_norm"] - m2["grad_norm"]) < 1e-4 * m1["grad_norm"] and m1["grad_norm"] > 0
    p1 = jax.tree.leaves(jax.device_get(out[1]["state"].params))
    p2 = jax.tree.leaves(jax.device_get(out[2]["state"].params))
    worst = max(float(np.abs(a - b).max()) for a, b in zip(p1, p2))
    assert worst < 0.05 * 1e-3  # a few % of one Adam step (fp32 summation order differs)


@pytest.mark.slow  # compiles a second update shape and the reference pass: ~60 s CPU
def test_several_updates_per_batch_move_the_ratio_and_the_kl(init_dir, tmp_path):
    """num_iterations x mini_batches updates on one rollout batch: after the first the ratio
    leaves 1 (and may clip); with beta > 0 the KL to the frozen initial policy becomes > 0."""
    samples = [Sample(s.image, s.mask, s.target, "Synthetic", s.sample_id, "shapes", {})
               for s in synthetic_shapes(1, size=64, seed=0)]
    config = TrainConfig(image_size=56, lr=3e-3, warmup_frac=0.0, checkpoint_every=10, mesh_shape=(1, 1, 1))
    grpo = GRPOConfig(group_size=4, num_iterations=2, mini_batches=2, beta=0.1, kl_estimator="k3",
                      epsilon_high=0.28)
    rl = RLConfig(steps=1, prompts_per_step=1, max_turns=1, grpo=grpo, seq_buckets=(1024,))
    seen = []
    train_grpo(config, rl, samples, ClassicalTool(), str(tmp_path), init_dir=init_dir,
               policy_factory=lambda model, processor, rl_cfg, seed, settings: RandomClickPolicy(processor, seed=seed + 1),
               hooks=[lambda step, m: seen.append(m)])
    m = seen[0]
    assert m["updates"] == 4.0 and m["kept_group_fraction"] == 1.0
    assert m["ratio_abs_dev_last"] > 1e-4  # the last update sees a policy three updates away from pi_old
    assert m["kl_last"] > 0.0 and np.isfinite(m["clip_fraction"])


def test_one_grpo_step_on_volume_prompts(init_dir, tmp_path):
    """Volume prompts go through the same trainer: volume episodes (a 2D click means the slice on
    view), the classical 3D tool, the click reward in voxels, one update."""
    from ibis_jax.agent.volume import VolumeEpisode
    from ibis_jax.data.sources.volumes import EllipsoidVolumeSource
    from ibis_jax.rl import trainer as trainer_lib
    from ibis_jax.tools.volume import ClassicalVolumeTool

    source = EllipsoidVolumeSource(num=2, side=16)
    samples = [s for item in source.items() for s in source.load(item)]
    config = TrainConfig(image_size=56, lr=1e-3, warmup_frac=0.0, checkpoint_every=10, mesh_shape=(1, 1, 1))
    # the volume note and the slice line make a turn longer than the 2D test's 1024 tokens
    rl = RLConfig(steps=1, prompts_per_step=2, max_turns=2, grpo=GRPOConfig(group_size=2), seq_buckets=(1536,))
    made = []
    real = trainer_lib.episode_for_sample

    def spy(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    trainer_lib.episode_for_sample = spy
    try:
        seen = []
        train_grpo(config, rl, samples, ClassicalVolumeTool(), str(tmp_path), init_dir=init_dir,
                   policy_factory=lambda model, processor, rl_cfg, seed, settings: RandomClickPolicy(processor, seed=seed),
                   hooks=[lambda step, m: seen.append(m)])
    finally:
        trainer_lib.episode_for_sample = real
    assert len(made) == 4 and all(isinstance(e, VolumeEpisode) and e.done for e in made)
    assert any(s.is_click for e in made for s in e.steps)
    m = seen[0]
    assert m["policy_tokens"] > 0 and np.isfinite(m["loss"]) and np.isfinite(m["reward/click"])
    assert 0.0 <= m["iou"] <= 1.0
