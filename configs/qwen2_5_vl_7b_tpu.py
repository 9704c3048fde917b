"""Qwen2.5-VL-7B-Instruct (the IBISAgent policy) on a TPU v5p-64 slice (32 chips, 8 hosts),
LoRA rank 8 on the decoder projections as the released SFT config, vision tower frozen.

Mesh (data 4, fsdp 8, tensor 1): FSDP inside a host group, data parallel across; bf16 compute.
Global batch 256 = 128 per step x 2 accumulation steps (4 sequences of up to 4096 tokens per
chip per micro-batch).

Launch the same command on every host; JAX detects the TPU slice (hosts, ids, coordinator) itself,
so no --coordinator flags are needed:

    gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all --command="ibis-jax sft \\
        --config configs/qwen2_5_vl_7b_tpu.py --data /mnt/shared/sft --workdir /mnt/shared/runs/7b \\
        hf_dir=/models/Qwen2.5-VL-7B-Instruct"

(Explicit form, where detection is unavailable: add --coordinator WORKER0_IP:8476
--num-processes 8 --process-id I on worker I.)

(data and workdir on a filesystem every host sees, e.g. Filestore/NFS; each host reads only its
slice of every batch. gs:// workdirs are not supported yet: os.makedirs / metrics.jsonl are local).
For full fine-tuning instead of LoRA pass lora_rank=0 (needs fsdp 32: 8B x 16 B / 32 = 4 GB/chip).
"""

from ibis_jax.train.config import TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        model="qwen2_5_vl_7b",
        hf_dir="/models/Qwen2.5-VL-7B-Instruct",
        param_dtype="bfloat16",
        compute_dtype="bfloat16",
        remat=True,
        freeze_vision=True,
        lora_rank=8,
        lora_alpha=16.0,
        mesh_shape=(4, 8, 1),
        image_size=504,
        seq_buckets=(1024, 2048, 4096),
        history="none",
        batch_size=256,
        grad_accum=2,
        num_epochs=10.0,
        lr=1e-4,  # LoRA
        warmup_frac=0.1,
        grad_clip=1.0,
        num_workers=16,
        checkpoint_every=250,
        keep_checkpoints=3,
    )
