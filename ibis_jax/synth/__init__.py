"""Cold-start trajectory synthesis: the oracle in the agent loop over a source, written as
trajectory records (``trajectory.py``: one sample; ``runner.py``: sharded, resumable runs)."""

from ibis_jax.synth.runner import ConfigMismatch, run_synthesis
from ibis_jax.synth.trajectory import FILTER_REASONS, SynthConfig, SynthOutcome, synthesize_trajectory

__all__ = ["FILTER_REASONS", "ConfigMismatch", "SynthConfig", "SynthOutcome", "run_synthesis", "synthesize_trajectory"]
