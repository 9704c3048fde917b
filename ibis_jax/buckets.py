"""Shape buckets: a length padded up to one of a few sizes, so jitted programs see few shapes
(the sampler's batch/chunk/cache sizes, SFT's and GRPO's sequence lengths)."""

from __future__ import annotations

from collections.abc import Sequence


def fit_bucket(n: int, buckets: Sequence[int], *, overflow: str = "raise", what: str = "a sequence") -> int:
    """The smallest bucket >= ``n``. Past the last bucket: ``overflow="raise"`` raises a ValueError
    naming ``what`` and the fix; ``"round_up"`` gives the next multiple of the last bucket."""
    if not buckets:
        raise ValueError("no buckets configured")
    for b in sorted(buckets):
        if n <= b:
            return b
    last = max(buckets)
    if overflow == "round_up":
        return -(-n // last) * last
    raise ValueError(f"{what} of {n} tokens exceeds the largest bucket {last}; "
                     "raise the config's largest bucket (seq_buckets) or lower max_new_tokens")
