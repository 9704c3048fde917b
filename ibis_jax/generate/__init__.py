"""Generation: the jitted KV-cache sampler and the model policy for the agent loop."""

from ibis_jax.generate.sampler import Completion, DecodeState, Sampler, SamplerConfig, bucket
from ibis_jax.generate.stop import StopAutomaton

__all__ = ["Completion", "DecodeState", "Sampler", "SamplerConfig", "StopAutomaton", "bucket"]
