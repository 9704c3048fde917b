"""Flax NNX ports of the policy models (see `qwen2_5_vl`)."""
