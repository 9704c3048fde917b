"""Qwen3-VL-8B-Instruct, full fine-tuning of the decoder + mergers (vision tower frozen), one
8-GPU node (8 x H100 80 GB).

FSDP over all 8 GPUs: 8.8B params with fp32 master weights, fp32 gradients and Adam moments is
8.8B x 16 B / 8 = 17.5 GB per GPU, plus activations (bf16 compute, remat). 512 px images (16 px
patches: 256 visual tokens). Global batch 256 = 32 per step x 8 accumulation steps.

    ibis-jax plan --config configs/qwen3_vl_8b_gpu.py --topology h100x8 --stage all
    ibis-jax sft --config configs/qwen3_vl_8b_gpu.py --data data/sft --workdir runs/q3_8b \\
        hf_dir=/models/Qwen3-VL-8B-Instruct

Several nodes: as configs/qwen2_5_vl_3b_gpu.py (--coordinator ... or SLURM, mesh_shape=N,8,1).
"""

from ibis_jax.train.config import TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        model="qwen3_vl_8b",
        hf_dir="/models/Qwen3-VL-8B-Instruct",
        param_dtype="float32",
        compute_dtype="bfloat16",
        remat=True,
        mlp_chunk=256,
        freeze_vision=True,
        mesh_shape=(1, -1, 1),
        image_size=512,
        seq_buckets=(1024, 2048, 4096),
        history="none",
        batch_size=256,
        grad_accum=8,
        num_epochs=10.0,
        lr=1e-5,
        warmup_frac=0.1,
        weight_decay=0.0,
        grad_clip=1.0,
        num_workers=8,
        checkpoint_every=500,
        keep_checkpoints=3,
    )
