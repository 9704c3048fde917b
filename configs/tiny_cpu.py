"""Tiny Qwen2.5-VL (2 text layers, 4 vision blocks, random init, offline tokenizer) on CPU.

Trains on the demo dataset in a few minutes on 2 cores:

    ibis-jax synth --source demo --tool classical --out data/demo --self-correction 0.3
    ibis-jax sft --config configs/tiny_cpu.py --data data/demo --workdir runs/tiny

No model directory: the tokenizer is built once under WORKDIR/tokenizer and exported with the
model to WORKDIR/hf, which later stages load with `load_hf`.
"""

from ibis_jax.train.config import TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        model="tiny",
        mesh_shape=(-1, 1, 1),
        image_size=112,  # 8x8 patches, 16 visual tokens
        # The one-line system prompt: the 330-token agent instructions are nothing a 2-layer model
        # trained from scratch can read, and they bury the query (see agent/prompts.py).
        system_prompt="short",
        seq_buckets=(224, 288),  # the fitted tokenizer and the short prompt: samples 111-200 tokens
        history="none",
        batch_size=8,
        num_epochs=3.0,
        lr=2e-3,  # a random-init tiny model needs a large rate to learn the format quickly
        warmup_frac=0.05,
        weight_decay=0.0,
        freeze_vision=False,
        checkpoint_every=50,
        keep_checkpoints=2,
    )
