"""Qwen3-VL-8B-Instruct on a TPU v5p-8 (4 chips, one host): `configs/qwen2_5_vl_7b_tpu.py` (LoRA
rank 8 on the decoder projections, vision tower frozen, bf16, fsdp over every chip, global batch
256 = 16 x 16 accumulation steps) with the Qwen3-VL model. Its 16 px patches make 512 px images
(16 x 16 = 256 visual tokens, the paper's 512 px cap); under freeze_vision the merger and the
DeepStack mergers train.

    ibis-jax plan --config configs/qwen3_vl_8b_tpu.py --topology v5p-8 --stage all
    ibis-jax sft --config configs/qwen3_vl_8b_tpu.py --data data/sft --workdir runs/q3_8b \\
        hf_dir=/models/Qwen3-VL-8B-Instruct

Multi-host slices and full fine-tuning (lora_rank=0): as the base config.
"""

import os

from ibis_jax.train.config import load_config

BASE = os.path.join(os.path.dirname(__file__), "qwen2_5_vl_7b_tpu.py")
QWEN3 = ['model=qwen3_vl_8b', 'hf_dir=/models/Qwen3-VL-8B-Instruct', 'image_size=512']


def get_config():
    return load_config(BASE, QWEN3)
