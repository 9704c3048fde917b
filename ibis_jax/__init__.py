"""ibis-jax: agentic interactive biomedical segmentation (IBISAgent) in JAX/Flax."""

__version__ = "0.1.0"
