"""Rollout seconds per episode of the quickstart GRPO stage's rollouts (tiny model, the GRPO
config's 4 prompts x G 4, its temperature and max_new_tokens, classical tool), as before
(`rl.prefix_cache=False`, one row per episode) and with the system turn's prefix cache and
continuous batching (`rl.max_rows`), in one run; prints both and the ratio.

    python bench/rollout_prefix.py [--init HF_DIR] [--rows 8] [--system-prompt short|full] [--repeats 2]

Without --init a random tiny model is used (its turns mostly fail to parse: short episodes);
the quickstart's SFT export (runs/.../sft/hf) gives the real episode lengths. The first
repetition of each setting compiles and is not timed.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--init", default=None)
    ap.add_argument("--rows", type=int, default=8, help="rl.max_rows of the fast setting")
    ap.add_argument("--system-prompt", default="full", help="short (the tiny config's) or full (the ~330-token agent prompt)")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    from flax import nnx

    from ibis_jax.agent.loop import run_agent
    from ibis_jax.agent.settings import AgentSettings
    from ibis_jax.agent.volume import episode_for_sample
    from ibis_jax.data.queries import sample_query
    from ibis_jax.data.shapes import synthetic_shapes
    from ibis_jax.data.sources.base import Sample
    from ibis_jax.models.qwen2_5_vl import Qwen25VL, load_hf, save_hf
    from ibis_jax.models.qwen2_5_vl.processor import Qwen25VLProcessor
    from ibis_jax.models.qwen2_5_vl.tiny import make_tokenizer_dir, tiny_config
    from ibis_jax.rl.trainer import default_policy_factory
    from ibis_jax.tools.classical import ClassicalTool
    from ibis_jax.train.config import load_config

    root = Path(__file__).resolve().parents[1]
    spec = __import__("importlib.util").util.spec_from_file_location("grpo_cfg", root / "configs" / "grpo_tiny_cpu.py")
    module = __import__("importlib.util").util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config, rl = module.get_config(), module.get_rl_config()
    init = args.init
    if init is None:
        tmp = Path(tempfile.mkdtemp())
        tok = make_tokenizer_dir(tmp / "tok")
        save_hf(Qwen25VL(tiny_config(tok), rngs=nnx.Rngs(0)), tmp / "hf", source_dir=tok)
        init = str(tmp / "hf")
    model, processor = load_hf(init), Qwen25VLProcessor(init)
    settings = AgentSettings(args.system_prompt, image_size=config.image_size)
    samples = [Sample(s.image, s.mask, s.target, "Synthetic", s.sample_id, "shapes", {})
               for s in synthetic_shapes(rl.prompts_per_step, size=config.image_size, seed=0)]

    def rollouts(rl_cfg, seed: int) -> tuple[float, int, int]:
        episodes = [episode_for_sample(samples[i], sample_query(samples[i], rl_cfg.query_style, 0),
                                       episode_id=f"b{seed}-{i}-{g}", max_actions=rl_cfg.max_turns)
                    for i in range(rl_cfg.prompts_per_step) for g in range(rl_cfg.grpo.group_size)]
        policy = default_policy_factory(model, processor, rl_cfg, seed, settings)
        t0 = time.perf_counter()
        traces = run_agent(policy, ClassicalTool(), episodes, max_rows=rl_cfg.max_rows)
        return time.perf_counter() - t0, len(episodes), sum(len(t.turns) for t in traces)

    settings_ = {"before (no prefix cache, one row per episode)": dataclasses.replace(rl, prefix_cache=False, max_rows=None),
                 f"after (prefix cache, max_rows={args.rows})": dataclasses.replace(rl, prefix_cache=True, max_rows=args.rows)}
    per_episode = {}
    for name, rl_cfg in settings_.items():
        rollouts(rl_cfg, 0)  # compiles
        times = [rollouts(rl_cfg, seed) for seed in range(1, args.repeats + 1)]
        per_episode[name] = float(np.mean([t / n for t, n, _ in times]))
        turns = np.mean([k for _, _, k in times])
        print(f"{name}: {per_episode[name]:.3f} s per episode ({times[0][1]} episodes, {turns:.1f} turns per step, "
              f"{args.system_prompt} system prompt)", flush=True)
    before, after = per_episode.values()
    print(f"ratio before / after: {before / after:.2f}x")


if __name__ == "__main__":
    main()
