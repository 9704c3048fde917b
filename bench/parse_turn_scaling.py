"""parse_turn on adversarial inputs of growing size: seconds per call and the ratio per 4x input
(about 4 for a linear parser, about 16 for a quadratic one).

    python bench/parse_turn_scaling.py            # 64 KiB .. 1 MiB
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ibis_jax.agent import ActionParseError, parse_turn  # noqa: E402


def cases(n: int) -> dict[str, tuple[str, bool]]:
    return {
        "unclosed <action>": ("<action>" * (n // 8), False),
        "many \\n</think>\\n (strict)": ("<think>\n" + "\n</think>\n<action>\n" * (n // 19), True),
        "spaces in a point": ("<action>positive point" + " " * n + "x</action>", False),
        "spaces after a point": ("<action>positive point (0.5, 0.5)" + " " * n + "x</action>", False),
        "tag soup": ("<think><action><answer>" * (n // 23), False),
    }


def seconds(text: str, strict: bool) -> float:
    started = time.perf_counter()
    try:
        parse_turn(text, strict=strict)
    except ActionParseError:
        pass
    return time.perf_counter() - started


def main() -> None:
    sizes = [64 << 10, 256 << 10, 1 << 20]
    print(f"{'input':30s}" + "".join(f"{size >> 10:>10d}K" for size in sizes) + "   ratio/4x")
    for name in cases(1):
        times = [seconds(*cases(size)[name]) for size in sizes]
        ratio = (times[-1] / max(times[0], 1e-9)) ** 0.5
        print(f"{name:30s}" + "".join(f"{t:10.4f}s" for t in times) + f"   {ratio:6.1f}")


if __name__ == "__main__":
    main()
