"""Qwen3-VL-8B-Instruct on one 8-GPU node (8 x H100 80 GB): `configs/qwen2_5_vl_3b_gpu.py` (full
fine-tuning of the decoder + mergers, vision tower frozen, fp32 master weights, bf16 compute, FSDP
over the 8 GPUs, global batch 256 = 32 x 8) with the Qwen3-VL model at 512 px. 8.8B params x 16 B
(weights, gradients, Adam) / 8 = 17.5 GB a GPU before activations.

    JAX_PLATFORMS=cpu ibis-jax plan --config configs/qwen3_vl_8b_gpu.py --topology h100x8 --stage all
    ibis-jax sft --config configs/qwen3_vl_8b_gpu.py --data data/sft --workdir runs/q3_8b \\
        hf_dir=/models/Qwen3-VL-8B-Instruct

Several nodes: as the base config (--coordinator ... or SLURM, mesh_shape=N,8,1).
"""

import os

from ibis_jax.train.config import load_config

BASE = os.path.join(os.path.dirname(__file__), "qwen2_5_vl_3b_gpu.py")
QWEN3 = ['model=qwen3_vl_8b', 'hf_dir=/models/Qwen3-VL-8B-Instruct', 'image_size=512']


def get_config():
    return load_config(BASE, QWEN3)
