"""``ibis-jax grpo``: agentic GRPO from an SFT checkpoint (an HF dir, e.g. ``SFT_WORKDIR/hf``).

    ibis-jax grpo --config configs/tiny_cpu.py --init runs/sft/hf --source demo --tool classical \\
        --workdir runs/grpo rl.steps=20 rl.group_size=4 lr=1e-6

Plain ``key=value`` overrides set ``TrainConfig`` fields (optimizer, mesh, image size); ``rl.*``
overrides set the rollout and reward fields (``rl.steps``, ``rl.prompts_per_step``,
``rl.group_size``, ``rl.max_turns``, ``rl.t_opt``, ``rl.pseg_drop_penalty``, ``rl.epsilon_low``,
``rl.beta``, ``rl.reward_mode``...). ``--reward my_rewards.py:shape_bonus`` adds a reward (any
number of times). Rerunning with the same workdir resumes. The final policy is written as an HF directory to
``WORKDIR/hf`` (with ``ibis_agent.json``, as SFT's export); ``--export-every N`` also writes
``WORKDIR/exports/step_N``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging

from ibis_jax.commands.synth import add_source_arguments, build_source

RL_FIELDS = {
    "steps": ("rl", int), "prompts_per_step": ("rl", int), "max_turns": ("rl", int), "history": ("rl", str),
    "temperature": ("rl", float), "max_new_tokens": ("rl", int), "seed": ("rl", int),
    "group_size": ("grpo", int), "epsilon_low": ("grpo", float), "epsilon_high": ("grpo", float),
    "beta": ("grpo", float), "aggregation": ("grpo", str), "advantage": ("grpo", str),
    "kl_estimator": ("grpo", str), "num_iterations": ("grpo", int), "mini_batches": ("grpo", int),
    "t_opt": ("reward", int), "length_penalty": ("reward", float), "pseg_drop_penalty": ("reward", float),
    "aggregate": ("reward", str), "reward_mode": ("reward", str),
}


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="a TrainConfig file (configs/*.py)")
    parser.add_argument("--init", required=True, help="HF model dir to start from (the SFT export)")
    parser.add_argument("--workdir", required=True, help="checkpoints and metrics; reruns resume")
    parser.add_argument("--tool", default="classical", help="'classical', a bridge HOST:PORT, or module:factory")
    parser.add_argument("--reward", action="append", default=[], help="extra reward 'file.py:function'")
    parser.add_argument("--limit", type=int, default=None, help="use the first N source items as prompts")
    parser.add_argument("--export-every", type=int, default=0,
                        help="also export the policy every N steps to WORKDIR/exports/step_N (the final one: WORKDIR/hf)")
    parser.add_argument("overrides", nargs="*", help="key=value (TrainConfig) and rl.key=value")
    add_source_arguments(parser)
    parser.set_defaults(run=run)


def rl_config_from(overrides: list[str]):
    from ibis_jax.rl.trainer import RLConfig

    rl = RLConfig()
    parts: dict[str, dict] = {"rl": {}, "grpo": {}, "reward": {}}
    for item in overrides:
        key, _, value = item.partition("=")
        name = key.removeprefix("rl.")
        if name not in RL_FIELDS:
            raise ValueError(f"override {item!r}: unknown rl field; choose from {', '.join(sorted(RL_FIELDS))}")
        where, parse = RL_FIELDS[name]
        parts[where]["mode" if name == "reward_mode" else name] = parse(value)
    return dataclasses.replace(
        rl, **parts["rl"], grpo=dataclasses.replace(rl.grpo, **parts["grpo"]),
        reward=dataclasses.replace(rl.reward, **parts["reward"]),
    )


def run(args: argparse.Namespace) -> int:
    from ibis_jax.rl.rewards import PAPER_REWARDS
    from ibis_jax.rl.trainer import train_grpo
    from ibis_jax.tools import make_tool
    from ibis_jax.train.config import load_config

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rl_items = [o for o in args.overrides if o.startswith("rl.")]
    config = load_config(args.config, [o for o in args.overrides if not o.startswith("rl.")])
    rl = rl_config_from(rl_items)
    if args.export_every:
        rl = dataclasses.replace(rl, export_every=args.export_every)
    if args.reward:
        rl = dataclasses.replace(rl, rewards=tuple(PAPER_REWARDS) + tuple(args.reward))
    source = build_source(args)
    items = source.items()[: args.limit] if args.limit else source.items()
    samples = [s for item in items for s in source.load(item) if s.mask.any()]
    out = train_grpo(config, rl, samples, make_tool(args.tool), args.workdir, init_dir=args.init)
    m = out["metrics"]
    if m:
        print(f"GRPO done: reward {m['reward']:.3f}, IoU {m['iou']:.3f}, steps/episode {m['steps_per_episode']:.2f}; "
              f"metrics in {args.workdir}/metrics.jsonl")
    if out.get("export_dir"):
        print(f"HF export (loads with transformers and ModelPolicy.from_pretrained_dir): {out['export_dir']}")
    return 0
