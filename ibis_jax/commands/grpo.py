"""``ibis-jax grpo``: agentic GRPO from an SFT checkpoint (an HF dir, e.g. ``SFT_WORKDIR/hf``).

    ibis-jax grpo --config configs/tiny_cpu.py --init runs/sft/hf --source demo --tool classical \\
        --workdir runs/grpo rl.steps=20 rl.group_size=4 lr=1e-6

Plain ``key=value`` overrides set ``TrainConfig`` fields (optimizer, mesh, image size); ``rl.*``
overrides set ``RLConfig`` fields by dotted name, from the config file's ``get_rl_config()``
(``configs/grpo_tiny_cpu.py``) or the defaults: ``rl.steps=20``, ``rl.grpo.epsilon_high=0.28``,
``rl.grpo.num_iterations=2``, ``rl.grpo.beta=0.04``, ``rl.reward.t_opt=3``, ``rl.reward.mode=step``, ``rl.lr_schedule=cosine``, ``rl.warmup_steps=10``;
a name found once in a group may drop the group (``rl.group_size=4``). An unknown or ill-typed
override names the field, its type and the nearest valid names. ``--reward my_rewards.py:shape_bonus`` adds a reward (any
number of times). Rerunning with the same workdir resumes. The final policy is written as an HF directory to
``WORKDIR/hf`` (with ``ibis_agent.json``, as SFT's export); ``--export-every N`` also writes
``WORKDIR/exports/step_N``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os

from ibis_jax.commands.synth import SOURCE_NAMES, add_source_arguments, build_source

# Older flat spellings, still accepted: rl.reward_mode (rl.group_size, rl.t_opt... resolve as the
# only field of that name).
RL_ALIASES = {"reward_mode": "reward.mode"}


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="a TrainConfig file (configs/*.py)")
    parser.add_argument("--init", required=True, help="HF model dir to start from (the SFT export)")
    parser.add_argument("--workdir", required=True, help="checkpoints and metrics; reruns resume")
    parser.add_argument("--tool", default="auto", help="'auto' (the classical tool's preset per target; "
                        "default), 'classical', 'classical-tissue', a bridge HOST:PORT, or module:factory")
    parser.add_argument("--reward", action="append", default=[], help="extra reward 'file.py:function'")
    parser.add_argument("--limit", type=int, default=None, help="use the first N source items as prompts")
    parser.add_argument("--export-every", type=int, default=0,
                        help="also export the policy every N steps to WORKDIR/exports/step_N (the final one: WORKDIR/hf)")
    parser.add_argument("overrides", nargs="*", help="key=value (TrainConfig) and rl.key=value")
    parser.add_argument("--source", default="demo", choices=SOURCE_NAMES,
                        help="prompt images and masks (default demo)")
    parser.add_argument("--seed", type=int, default=0, help="source seed (nifti/demo)")
    add_source_arguments(parser)
    from ibis_jax.train.core import add_distributed_arguments

    add_distributed_arguments(parser)
    parser.set_defaults(run=run)


def rl_config_from(overrides: list[str], config_path: str | None = None):
    """The config file's ``get_rl_config()`` (``RLConfig()`` without one) with ``rl.*`` dotted
    overrides (``rl.grpo.epsilon_high=0.28``; a unique leaf name also works: ``rl.group_size=8``)."""
    from ibis_jax.rl.trainer import RLConfig
    from ibis_jax.train.config import apply_dotted_overrides, run_config_file

    rl = None if config_path is None else run_config_file(config_path, "get_rl_config")
    return apply_dotted_overrides(RLConfig() if rl is None else rl, overrides, prefix="rl.", aliases=RL_ALIASES)


def run(args: argparse.Namespace) -> int:
    from ibis_jax.rl.trainer import train_grpo
    from tool_bridge.factory import make_tool
    from ibis_jax.train.config import load_config

    from ibis_jax.train import core

    from ibis_jax import storage
    from ibis_jax.commands.sft import stage_model_dirs

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger().setLevel(logging.INFO)  # also when an import configured logging first
    # gs:// --init: staged into the local cache (committed exports only, verified); a gs:// workdir
    # is trained in its local spool (checkpoints to the bucket, metrics and exports uploaded).
    init = storage.stage_input(args.init, "--init")
    workdir = storage.spool(args.workdir)
    if not os.path.isfile(os.path.join(init, "config.json")):
        raise FileNotFoundError(f"--init {args.init}: no model directory (config.json) there; give the SFT "
                                "export, e.g. SFT_WORKDIR/hf")
    core.init_distributed(args.coordinator, args.num_processes, args.process_id)  # before any computation
    core.quiet_other_processes()
    rl_items = [o for o in args.overrides if o.startswith("rl.")]
    config = stage_model_dirs(load_config(args.config, [o for o in args.overrides if not o.startswith("rl.")]))
    rl = rl_config_from(rl_items, args.config)
    if args.export_every:
        rl = dataclasses.replace(rl, export_every=args.export_every)
    if args.reward:
        rl = dataclasses.replace(rl, rewards=tuple(rl.rewards) + tuple(args.reward))
    source = build_source(args)
    items = source.items()[: args.limit] if args.limit else source.items()
    samples = [s for item in items for s in source.load(item) if s.mask.any()]
    out = train_grpo(config, rl, samples, make_tool(args.tool, volumes=args.source == "volumes", slice_rule=args.slice_rule),
                     workdir, init_dir=init)
    m = out["metrics"]
    import jax

    if jax.process_index() == 0 and out.get("already_finished"):
        print(f"{args.workdir}: GRPO already finished at step {out['step']}; nothing to train: use a new "
              "--workdir, or raise rl.steps to continue")
    elif jax.process_index() == 0 and m:
        print(f"GRPO done: reward {m['reward']:.3f}, IoU {m['iou']:.3f}, steps/episode {m['steps_per_episode']:.2f}; "
              f"metrics in {args.workdir}/metrics.jsonl")
    if jax.process_index() == 0 and out.get("export_dir"):
        export_dir = storage.remote_of(out["export_dir"]) or out["export_dir"]
        print(f"HF export (loads with transformers and ModelPolicy.from_pretrained_dir): {export_dir}")
    if jax.process_index() == 0:
        p = out["programs"]
        print(f"programs: {p['compiled']} compiled, {p['from_cache']} from the compilation cache")
    return 0
