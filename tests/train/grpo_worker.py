"""One process of a GRPO run for `test_multiprocess_grpo` (alone or with `--coordinator ...`):
2 steps of the tiny model with the classical tool on a (2 data, 2 fsdp, 2 tensor) mesh, under
a scripted policy whose turns depend only on the episode id and turn (so any process count runs
the same episodes). Process 0 writes `--out` (JSON): every step's scores and advantages, and what
the policy saw each step (a checksum of its parameters, whether they were on this process's
devices alone).

    python tests/train/grpo_worker.py --init INIT --workdir W --out OUT.json [--coordinator ...]

`--init` is created (a tiny random model and a fitted tokenizer) when it does not exist."""

from __future__ import annotations

import argparse
import json
import os
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from ibis_jax.train import core

# The GRPO settings of both runs: 3 prompts x 3 rollouts = 9 episodes; on 2 processes 5 and 4, so
# the shares differ and the second prompt's group straddles the two processes.
MESH = (2, 2, 2)
PROMPTS, GROUP, TURNS, IMAGE = 3, 3, 2, 56
SALT = 7  # of the scripted turns: every group has a spread and both steps have the same row count (one compile)


class EpisodeScriptedPolicy:
    """Random clicks or a terminate as the run's token ids, drawn from (episode id, turn): the
    same episode gets the same turns wherever and with whichever batch it runs. Records a checksum
    of the parameters of the model it was built with."""

    def __init__(self, model, processor, seen: list):
        from flax import nnx

        leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
        checksum = jax.jit(lambda xs: sum(jnp.sum(jnp.abs(x.astype(jnp.float32))) for x in xs))(leaves)
        seen.append({"checksum": float(checksum), "local": all(x.is_fully_addressable for x in leaves)})
        self.processor = processor

    def generate(self, requests):
        from ibis_jax.agent.grammar import Click, Terminate, format_turn
        from ibis_jax.agent.loop import PolicyTurn

        turns = []
        for r in requests:
            rng = np.random.default_rng(zlib.crc32(f"{SALT}/{r.episode.episode_id}/{len(r.episode.steps)}".encode()))
            if rng.random() < 0.3:
                text = format_turn("done", Terminate(), "shape")
            else:
                x, y = rng.uniform(0.1, 0.9, 2).round(4)
                text = format_turn("try", Click(float(x), float(y), bool(rng.random() < 0.8)))
            ids = tuple(self.processor.tokenizer(text, add_special_tokens=False)["input_ids"])
            turns.append(PolicyTurn(text, ids, np.zeros(len(ids), np.float32), "stop"))
        return turns


def make_init(directory: str) -> None:
    """A tiny random Qwen2.5-VL HF dir with a tokenizer fitted to the prompts (short sequences)."""
    from flax import nnx

    from ibis_jax.agent.prompts import SYSTEM_PROMPT, user_turn
    from ibis_jax.fileio import atomic_dir
    from ibis_jax.models.qwen2_5_vl import Qwen25VL, save_hf
    from ibis_jax.models.qwen2_5_vl.tiny import make_tokenizer_dir, tiny_config
    from ibis_jax.train.sft import TINY_VOCAB

    tok = directory + "-tokenizer"
    corpus = [SYSTEM_PROMPT, *(user_turn(t, "Segment the shape.") for t in range(TURNS + 1))]
    make_tokenizer_dir(tok, vocab_size=TINY_VOCAB, corpus=corpus, grammar_tokens=True)
    with atomic_dir(directory) as out:
        save_hf(Qwen25VL(tiny_config(tok), rngs=nnx.Rngs(0)), out, source_dir=tok)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--init", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", required=True)
    core.add_distributed_arguments(parser)
    args = parser.parse_args()
    core.init_distributed(args.coordinator, args.num_processes, args.process_id)
    core.quiet_other_processes()
    import logging

    logging.basicConfig(level=logging.INFO if jax.process_index() == 0 else logging.ERROR,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from ibis_jax.data.shapes import synthetic_shapes
    from ibis_jax.data.sources.base import Sample
    from ibis_jax.rl.grpo import GRPOConfig
    from ibis_jax.rl.trainer import RLConfig, train_grpo
    from ibis_jax.tools.classical import ClassicalTool
    from ibis_jax.train.config import TrainConfig

    if not os.path.exists(args.init):
        if jax.process_index() == 0:
            make_init(args.init)
        core.barrier("init")
    samples = [Sample(s.image, s.mask, s.target, "Synthetic", s.sample_id, "shapes", {})
               for s in synthetic_shapes(PROMPTS, size=64, seed=0)]
    config = TrainConfig(image_size=IMAGE, lr=1e-3, warmup_frac=0.0, checkpoint_every=1000, mesh_shape=MESH,
                         seed=0)
    rl = RLConfig(steps=2, prompts_per_step=PROMPTS, max_turns=TURNS, grpo=GRPOConfig(group_size=GROUP),
                  seq_buckets=(256, 512, 1024))
    seen: list = []
    factory = lambda model, processor, rl_cfg, seed, settings: EpisodeScriptedPolicy(model, processor, seen)
    out = train_grpo(config, rl, samples, ClassicalTool(), args.workdir, init_dir=args.init, policy_factory=factory)
    if jax.process_index() == 0:
        with open(args.out, "w") as f:
            json.dump({"rollouts": out["rollouts"], "policy": seen, "metrics": out["metrics"],
                       "processes": jax.process_count(), "devices": jax.device_count()}, f)


if __name__ == "__main__":
    main()
