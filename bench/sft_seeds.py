"""The quickstart's SFT row across SFT seeds: how much of it is the seed.

Trains the quickstart's SFT (``configs/tiny_cpu.py``, 400 steps) on an existing quickstart data
folder once per seed (``seed`` and ``shuffle_seed``), then evaluates each export on the
quickstart's 64 held-out shapes with its evaluation settings (greedy, classical tool, 6 actions).

    ibis-jax quickstart --out runs/quickstart          # for runs/quickstart/data
    PYTHONPATH=$PWD python bench/sft_seeds.py runs/quickstart/data runs/sft_seeds 1,2,3

Prints one JSON line per seed (held-out IoU, Dice, first click on target, clicks, end reasons).
About 11 minutes per seed on 2 shared cores.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ibis_jax.data.sources.demo import DemoSource
from ibis_jax.eval.evaluate import EvalConfig, evaluate
from ibis_jax.generate.policy import ModelPolicy
from ibis_jax.generate.sampler import SamplerConfig
from ibis_jax.tools.classical import ClassicalTool
from ibis_jax.train.config import load_config
from ibis_jax.train.sft import train

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.py"


def main() -> None:
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    data, out, seeds = sys.argv[1], Path(sys.argv[2]), [int(s) for s in sys.argv[3].split(",")]
    for seed in seeds:
        config = load_config(str(CONFIG), ["max_steps=400", "checkpoint_every=100", f"seed={seed}", f"shuffle_seed={seed}"])
        start = time.time()
        train(config, data, str(out / f"sft{seed}"), progress=False)
        held_out = DemoSource(parts=("shapes",), num_shapes=64, shapes_size=config.image_size, seed=1000,
                              shapes_per_image=(2, 4))
        eval_config = EvalConfig(max_steps=6, batch_size=16, curve_clicks=6, ks=(1, 3, 5), num_examples=0,
                                 policy_name=f"SFT seed {seed}")
        policy = ModelPolicy.from_pretrained_dir(str(out / f"sft{seed}" / "hf"), sampler_config=SamplerConfig(max_new_tokens=96))
        overall = evaluate(policy, ClassicalTool(), held_out, config=eval_config, out_dir=out / f"eval{seed}")["overall"]
        print(json.dumps({"seed": seed, "seconds": round(time.time() - start),
                          **{k: overall[k] for k in ("mean_iou", "mean_dice", "first_click_hit_rate", "avg_steps", "end_reasons")}}),
              flush=True)


if __name__ == "__main__":
    main()
