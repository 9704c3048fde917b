"""``ibis-jax plan``: compile the real programs for a target without its hardware (docs/design.md section 9)."""
