"""Qwen2.5-VL-7B-Instruct (the IBISAgent policy) on a TPU v5p-8 (4 chips, one host), LoRA rank 8
on the decoder projections as the released SFT config, vision tower frozen.

Mesh (data 1, fsdp = all chips, tensor 1); bf16 compute. Global batch 256 = 16 per micro-batch x
16 accumulation steps (4 sequences of up to 4096 tokens per chip per micro-batch). Check a target
before renting it (docs/design.md section 9; numbers in the README):

    ibis-jax plan --config configs/qwen2_5_vl_7b_tpu.py --topology v5p-8 --stage all

    ibis-jax sft --config configs/qwen2_5_vl_7b_tpu.py --data data/sft --workdir runs/7b \\
        hf_dir=/models/Qwen2.5-VL-7B-Instruct

On a bigger slice keep 4 sequences per chip: v5p-64 (32 chips, 8 hosts) with grad_accum=2
mesh_shape=4,8,1 (FSDP inside a host group, data parallel across). Launch the same command on every host; JAX detects the TPU slice (hosts, ids, coordinator) itself,
so no --coordinator flags are needed:

    gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all --command="ibis-jax sft \\
        --config configs/qwen2_5_vl_7b_tpu.py --data /mnt/shared/sft --workdir /mnt/shared/runs/7b \\
        hf_dir=/models/Qwen2.5-VL-7B-Instruct"

(Explicit form, where detection is unavailable: add --coordinator WORKER0_IP:8476
--num-processes 8 --process-id I on worker I.)

(data and workdir on a filesystem every host sees, e.g. Filestore/NFS; each host reads only its
slice of every batch. gs:// workdirs are not supported yet: os.makedirs / metrics.jsonl are local).
For full fine-tuning instead of LoRA pass lora_rank=0 (8.3B x (2 + 4 + 4) B of bf16 params, fp32 grads
and bf16 Adam moments, over the chips; `plan` says whether a target holds it).
"""

from ibis_jax.train.config import TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        model="qwen2_5_vl_7b",
        hf_dir="/models/Qwen2.5-VL-7B-Instruct",
        param_dtype="bfloat16",
        compute_dtype="bfloat16",
        remat=True,
        mlp_chunk=256,  # the MLP over 256 positions at a time: one layer's backward holds [rows, 256, F]
        freeze_vision=True,
        lora_rank=8,
        lora_alpha=16.0,
        mesh_shape=(1, -1, 1),
        image_size=504,
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
