"""Tiny Qwen3-VL (3 text layers, 4 vision blocks with DeepStack taps, random init, offline
tokenizer) on CPU: `configs/tiny_cpu.py` with the other policy family.

Qwen3-VL's 16 px patches make 128 px images the 4 x 4 visual tokens that 112 px gives the tiny
Qwen2.5-VL. The quickstart takes it as it is:

    ibis-jax quickstart --out runs/quickstart_qwen3 --config configs/tiny_qwen3_vl_cpu.py
"""

import dataclasses
import importlib.util
import os

from ibis_jax.train.config import TrainConfig


def get_config() -> TrainConfig:
    spec = importlib.util.spec_from_file_location("tiny_cpu", os.path.join(os.path.dirname(__file__), "tiny_cpu.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return dataclasses.replace(module.get_config(), model="tiny_qwen3_vl", image_size=128)
