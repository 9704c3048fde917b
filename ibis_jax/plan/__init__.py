"""``ibis-jax plan``: compile the real programs for a target without its hardware (SPEC section 9)."""
