"""Qwen2.5-VL-3B-Instruct, full fine-tuning of LLM + merger (vision tower frozen), one GPU node.

8 x H100 80 GB: FSDP over all 8 GPUs (params, grads and Adam moments sharded: 3.8B params x
16 bytes / 8 = 7.6 GB per GPU), bf16 compute, fp32 master weights, remat on.
Global batch 256 (paper) = 32 per step x 8 accumulation steps.

    ibis-jax sft --config configs/qwen2_5_vl_3b_gpu.py --data data/sft --workdir runs/3b \\
        hf_dir=/models/Qwen2.5-VL-3B-Instruct

One process drives all GPUs of the node (no jax.distributed needed). Several nodes (here 2 x 8
GPUs, data parallel across nodes, FSDP inside one): on node I (0 and 1), node 0 reachable at
10.0.0.1, data and workdir on storage both nodes see,

    ibis-jax sft --config configs/qwen2_5_vl_3b_gpu.py --data /shared/sft --workdir /shared/runs/3b \\
        --coordinator 10.0.0.1:12355 --num-processes 2 --process-id I \\
        hf_dir=/models/Qwen2.5-VL-3B-Instruct mesh_shape=2,8,1

or under SLURM (JAX detects it; one process per GPU): srun --nodes=2 --ntasks-per-node=8
--gpus-per-node=8 ibis-jax sft ... mesh_shape=2,8,1 (the same command without --coordinator).
"""

from ibis_jax.train.config import TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        model="qwen2_5_vl_3b",
        hf_dir="/models/Qwen2.5-VL-3B-Instruct",
        param_dtype="float32",
        compute_dtype="bfloat16",
        remat=True,
        mlp_chunk=256,  # the MLP over 256 positions at a time: one layer's backward holds [rows, 256, F]
        freeze_vision=True,
        mesh_shape=(1, -1, 1),
        image_size=504,  # 324 visual tokens (docs/design.md section 5: images capped at 512 px)
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
