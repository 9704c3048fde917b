"""Qwen3-VL-8B-Instruct on a TPU v5p-8 (4 chips, one host): LoRA rank 8 on the decoder
projections, vision tower frozen (its merger and DeepStack mergers train), bf16.

Qwen3-VL has 16 px patches: images are 512 px (a multiple of 32), 16 x 16 = 256 visual tokens,
the paper's 512 px cap. Mesh (data 1, fsdp = all chips, tensor 1). Global batch 256 = 16 per
micro-batch x 16 accumulation steps. Check a target before renting it:

    ibis-jax plan --config configs/qwen3_vl_8b_tpu.py --topology v5p-8 --stage all

    ibis-jax sft --config configs/qwen3_vl_8b_tpu.py --data data/sft --workdir runs/q3_8b \\
        hf_dir=/models/Qwen3-VL-8B-Instruct

Multi-host slices run the same command on every host (see configs/qwen2_5_vl_7b_tpu.py). Full
fine-tuning instead of LoRA: lora_rank=0 (8.8B x (2 + 4 + 4) B over the chips; `plan` says
whether a target holds it).
"""

from ibis_jax.train.config import TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        model="qwen3_vl_8b",
        hf_dir="/models/Qwen3-VL-8B-Instruct",
        param_dtype="bfloat16",
        compute_dtype="bfloat16",
        remat=True,
        mlp_chunk=256,
        freeze_vision=True,
        lora_rank=8,
        lora_alpha=16.0,
        mesh_shape=(1, -1, 1),
        image_size=512,
        seq_buckets=(1024, 2048, 4096),
        history="none",
        batch_size=256,
        grad_accum=16,
        num_epochs=10.0,
        lr=1e-4,  # LoRA
        warmup_frac=0.1,
        grad_clip=1.0,
        num_workers=16,
        checkpoint_every=250,
        keep_checkpoints=3,
    )
