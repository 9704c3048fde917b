"""What `ibis-jax plan` compiles is what the trainers run: the SFT and GRPO programs built by the
trainers and by plan's stages, on the tiny config with bf16 parameters and compute and remat,
have the same parameter dtypes, the same model definition and the same lowered step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ibis_jax.train.config import TrainConfig

BF16 = dict(param_dtype="bfloat16", compute_dtype="bfloat16", remat=True)


def _rl_tests():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("rl_trainer_tests", Path(__file__).parents[1] / "rl" / "test_trainer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _dtypes(tree) -> set:
    return {jnp.dtype(x.dtype) for x in jax.tree.leaves(tree)}


def test_sft_trainer_runs_the_program_plan_compiles(tmp_path, tok_dir):
    from helpers import make_config, write_dataset

    from ibis_jax.models.qwen2_5_vl.tiny import tiny_config
    from ibis_jax.plan import programs
    from ibis_jax.train.loss import LOSSES
    from ibis_jax.train.sft import train

    data = write_dataset(str(tmp_path / "data"), records=2)
    config = make_config(batch_size=2, seq_buckets=(1024,), mesh_shape=(1, 1, 1), tokenizer_dir=tok_dir, **BF16)
    out = train(config, data, str(tmp_path / "run"))
    program = out["program"]
    assert _dtypes(out["state"].params) == {jnp.dtype(jnp.bfloat16)}
    assert program.model_def.graphdef == programs.train_setup(config, tiny_config(tok_dir), program.mesh).program.model_def.graphdef
    lm = nnx.merge(program.model_def.graphdef, nnx.State(program.model_def.abstract_params(
        program.abstract.params, program.abstract.frozen))).language_model
    assert (lm.remat, lm.scan_layers, lm.dtype) == ("full", True, jnp.bfloat16)

    # The step the trainer jitted (its shardings bound) and the one plan compiles, lowered on
    # plan's abstract state and batch: the same program.
    setup = programs.train_setup(config, tiny_config(tok_dir), program.mesh)
    batch, shardings, _, _ = programs.sft_batch(config, tiny_config(tok_dir), program.mesh)
    with jax.set_mesh(program.mesh):
        planned = setup.program.train_step(LOSSES["sft"], shardings).jitted.lower(setup.state, batch).as_text()
        ran = out["step_fn"].jitted.lower(setup.state, batch).as_text()
    assert ran == planned
    assert "bf16" in planned


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory):
    from ibis_jax.models.qwen2_5_vl import Qwen25VL, save_hf
    from ibis_jax.models.qwen2_5_vl.tiny import make_tokenizer_dir, tiny_config

    root = tmp_path_factory.mktemp("one_program")
    tok = make_tokenizer_dir(root / "tok")
    save_hf(Qwen25VL(tiny_config(tok), rngs=nnx.Rngs(0)), root / "hf", source_dir=tok)
    return str(root / "hf")


def test_grpo_trainer_runs_the_program_plan_compiles(init_dir, tmp_path):
    import orbax.checkpoint as ocp

    from ibis_jax.data.shapes import synthetic_shapes
    from ibis_jax.data.sources.base import Sample
    from ibis_jax.models.qwen2_5_vl import Qwen25VLConfig
    from ibis_jax.plan import programs
    from ibis_jax.rl.grpo import GRPOConfig
    from ibis_jax.rl.loss import make_grpo_loss
    from ibis_jax.rl.trainer import RLConfig, train_grpo
    from ibis_jax.tools.classical import ClassicalTool

    RandomClickPolicy = _rl_tests().RandomClickPolicy  # scripted random clicks as real token ids

    samples = [Sample(s.image, s.mask, s.target, "Synthetic", s.sample_id, "shapes", {})
               for s in synthetic_shapes(2, size=64, seed=0)]
    config = TrainConfig(image_size=56, lr=1e-3, warmup_frac=0.0, checkpoint_every=1, mesh_shape=(1, 1, 1),
                         lora_rank=4, lora_targets=("q_proj", "v_proj"), export_hf=False, **BF16)
    rl = RLConfig(steps=1, prompts_per_step=2, max_turns=2, grpo=GRPOConfig(group_size=2), seq_buckets=(1024,))
    factory = lambda model, processor, rl_cfg, seed, settings: RandomClickPolicy(processor, seed=seed)
    out = train_grpo(config, rl, samples, ClassicalTool(), str(tmp_path), init_dir=init_dir, policy_factory=factory)
    program = out["program"]
    assert _dtypes(out["state"].frozen) == {jnp.dtype(jnp.bfloat16)}
    assert _dtypes(out["state"].params) == {jnp.dtype(jnp.float32)}  # LoRA adapters
    assert _dtypes(out["state"].opt_state) <= {jnp.dtype(jnp.float32), jnp.dtype(jnp.int32)}

    # The checkpoint on disk: fp32 adapters and their optimizer state; the bf16 base is not in it
    # (a resume reloads it from the init directory), the state it restores into holds it in bf16.
    meta = ocp.StandardCheckpointer().metadata(tmp_path / "checkpoints" / "1" / "state").item_metadata
    is_array = lambda m: hasattr(m, "dtype") and hasattr(m, "shape")
    assert set(meta) == {"step", "params", "opt_state"}
    adapters = {np.dtype(m.dtype) for m in jax.tree.leaves(meta["params"], is_leaf=is_array)}
    assert adapters == {np.dtype(np.float32)}
    from ibis_jax.train.checkpoint import Checkpointer

    ckpt = Checkpointer(str(tmp_path))
    saved, _, _, step = ckpt.restore_latest(program.abstract)
    ckpt.close()
    resumed = program.resume(saved, init_dir, jax.random.key(0))
    assert step == 1 and _dtypes(resumed.frozen) == {jnp.dtype(jnp.bfloat16)}
    for x, y in zip(jax.tree.leaves(resumed), jax.tree.leaves(out["state"])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    # plan's GRPO stage builds the same program and lowers the same update.
    model_config = Qwen25VLConfig.from_hf_config(init_dir)
    setup = programs.train_setup(config, model_config, program.mesh, rl)
    assert setup.program.model_def.graphdef == program.model_def.graphdef
    assert jax.tree.map(lambda a: (a.shape, a.dtype, a.sharding), setup.state) == \
        jax.tree.map(lambda a: (a.shape, a.dtype, a.sharding), program.abstract)
    batch, _, _ = programs.grpo_batch(config, rl, model_config)
    batch = {**batch, "sampler_logprobs": jax.ShapeDtypeStruct(batch["targets"].shape, jnp.float32)}
    shardings = setup.program.batch_shardings(batch)
    batch = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), batch, shardings)
    loss = make_grpo_loss(rl.grpo, temperature=rl.temperature, suppressed=model_config.multimodal_token_ids)
    with jax.set_mesh(program.mesh):
        planned = setup.program.train_step(loss, shardings).jitted.lower(setup.state, batch).as_text()
        ran = program.train_step(loss, shardings).jitted.lower(setup.state, batch).as_text()
    assert ran == planned
