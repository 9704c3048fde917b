"""``ibis-jax plan``: compile the SFT step, the GRPO update and the rollout sampler for a TPU slice
or a GPU node on this machine (no accelerator, no weights) and say whether they fit.

    ibis-jax plan --config configs/qwen2_5_vl_7b_tpu.py --topology v5p-8 --stage all
    ibis-jax plan --config configs/qwen2_5_vl_7b_tpu.py --topology v5e-4 lora_rank=0   # exit 2
    ibis-jax plan --config configs/qwen2_5_vl_3b_gpu_grpo.py --topology v5p-16 --stage grpo \\
        mesh_shape=1,-1,1 rl.prompts_per_step=8 --json plan.json

Shapes come from the config's model preset, buckets and image size (the largest bucket: the
worst step). ``key=value`` overrides are those of ``ibis-jax sft`` (``mesh_shape=1,-1,1``: -1
takes the target's remaining devices); ``rl.key=value`` those of ``ibis-jax grpo``. The GRPO and
rollout stages read the RL settings from the config file's ``get_rl_config()``, else from the
sibling ``<config>_grpo.py`` (its ``get_config()`` too), else ``RLConfig()``'s defaults.

Prints per stage the devices and mesh, bytes per device (parameters, optimizer state, KV cache,
XLA temporaries, total) against the chip's HBM, the analytic FLOPs of one step and its time at
``--mfu``. Exit 0 when everything fits; 2 with one line (stage, bytes per chip, HBM, levers) when
a stage does not. Needs the ``plan`` extra (libtpu) for TPU targets, the CUDA PJRT plugin for GPU
nodes (run with JAX_PLATFORMS=cpu).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import sys

STAGES = ("sft", "grpo", "rollout")


def register(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--config", required=True, help="Python config file defining get_config()")
    parser.add_argument("--topology", required=True, help="v5p-8, v5e-16, v4-8, v6e-8, 2xv5p-8, h100x8, ...")
    parser.add_argument("--stage", default="all", choices=(*STAGES, "all"))
    parser.add_argument("--json", default=None, metavar="FILE", help="write the result as JSON")
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation for the step times")
    parser.add_argument("--hbm-gib", type=float, default=None,
                        help="plan against this much HBM per chip instead of the chip's (what-if; the compiler still uses the chip's)")
    parser.add_argument("--rl-config", default=None, help="file with get_rl_config() (default: see above)")
    parser.add_argument("overrides", nargs="*", help="key=value (TrainConfig) and rl.key=value overrides")
    parser.set_defaults(run=run)


def _module(path: str):
    spec = importlib.util.spec_from_file_location("ibis_plan_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rl_source(config_path: str, explicit: str | None) -> str | None:
    """The file the GRPO/rollout stages take their settings from (None: RLConfig defaults)."""
    if explicit:
        return explicit
    if hasattr(_module(config_path), "get_rl_config"):
        return config_path
    stem, ext = os.path.splitext(config_path)
    sibling = f"{stem}_grpo{ext}"
    return sibling if os.path.exists(sibling) else None


def stages_for(config_path: str, stage: str) -> tuple[str, ...]:
    """The stages to compile: `--stage all` means the stages the config runs: a GRPO config (one
    that defines `get_rl_config()`) runs the GRPO update and its rollouts, an SFT config all three
    (its sibling `_grpo` config, or the defaults, give the GRPO settings)."""
    if stage != "all":
        return (stage,)
    return ("grpo", "rollout") if hasattr(_module(config_path), "get_rl_config") else STAGES


def load_rl(path: str | None, overrides: list[str]):
    """The RLConfig of ``path``'s ``get_rl_config()`` with ``rl.*`` dotted overrides, exactly as
    ``ibis-jax grpo`` builds it."""
    from ibis_jax.commands.grpo import rl_config_from

    return rl_config_from(overrides, path)


def model_config_for(config):
    """The model's shapes from the config's local hf_dir, else its preset (`ibis_jax.models.PRESETS`)."""
    from ibis_jax.models import PRESETS, model_config_from_hf, preset_config
    from ibis_jax.train.sft import TINY_VOCAB

    if config.hf_dir and os.path.exists(os.path.join(config.hf_dir, "config.json")):
        return model_config_from_hf(config.hf_dir)
    if config.model not in PRESETS:
        raise ValueError(f"config model {config.model!r}: plan knows {', '.join(PRESETS)} (or a local hf_dir)")
    return preset_config(config.model, vocab_size=TINY_VOCAB) if config.model.startswith("tiny") else \
        preset_config(config.model)


def fail(message: str) -> int:
    print(message, file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    from ibis_jax.plan import topologies
    from ibis_jax.storage import check_path

    if args.json:
        check_path(args.json, "--json")  # local or gs:// (one object); another scheme: refused before compiling

    try:
        target = topologies.parse(args.topology)
    except topologies.UnknownTopology as e:
        return fail(f"plan: {e}")
    # Compile-only devices: the host backend stays CPU (no TPU/GPU client is ever created).
    os.environ["JAX_PLATFORMS"] = "cpu"
    if target.platform == "cuda":
        extra = os.environ.get("IBIS_PLAN_GPU_PATH")  # where the CUDA plugin was installed with --target
        if extra and extra not in sys.path:
            sys.path.insert(0, extra)
    topologies.quiet_libtpu()
    import logging

    logging.getLogger("jax._src.xla_bridge").setLevel(logging.ERROR)
    from ibis_jax.plan import programs, report
    from ibis_jax.train import mesh as mesh_lib
    from ibis_jax.train.config import load_config

    plain = [o for o in args.overrides if not o.startswith("rl.")]
    rl_items = [o for o in args.overrides if o.startswith("rl.")]
    stages = stages_for(args.config, args.stage)
    try:
        config = load_config(args.config, plain)
        rl_path = rl_source(args.config, args.rl_config) if set(stages) & {"grpo", "rollout"} else None
        rl_train = load_config(rl_path, plain) if rl_path and hasattr(_module(rl_path), "get_config") else config
        rl = load_rl(rl_path, rl_items)
        model_config = model_config_for(config)
        rl_model_config = model_config_for(rl_train)
    except (ValueError, FileNotFoundError) as e:
        return fail(f"plan: {e}")
    try:
        devices = topologies.devices(target)
    except RuntimeError as e:
        return fail(f"plan: {target.name}: {e}")
    chip = target.chip
    if args.hbm_gib is not None:
        chip = dataclasses.replace(chip, hbm_bytes=int(args.hbm_gib * 2**30))
    print(target.description + f"; {report.gib(chip.hbm_bytes)} GiB HBM, {chip.bf16_flops / 1e12:.0f} bf16 TFLOP/s "
          f"per chip" + ("; GPU device facts from the data sheet, the compile itself cannot be checked here"
                         if target.platform == "cuda" else ""))
    print(f"sft: {args.config} ({config.model}, {programs.lora_or_full(config)}, remat={config.remat}, "
          f"params {config.param_dtype}, compute {config.compute_dtype})")
    if rl_path or "grpo" in stages or "rollout" in stages:
        print(f"grpo/rollout: {rl_path or 'RLConfig() defaults'} ({rl_train.model}, {programs.lora_or_full(rl_train)}; "
              f"prompts {rl.prompts_per_step} x G {rl.grpo.group_size}, {rl.max_turns} turns, "
              f"max_new_tokens {rl.max_new_tokens}, seq_buckets {list(rl.seq_buckets)})")
    results = []
    for stage in stages:
        cfg = config if stage == "sft" else rl_train
        mcfg = model_config if stage == "sft" else rl_model_config
        try:
            mesh = mesh_lib.make_mesh(cfg.mesh_shape, devices)
        except ValueError as e:
            return fail(f"plan: {stage}: {e} (target {target.name} has {len(devices)} devices; e.g. mesh_shape=1,-1,1)")
        peak = cfg.peak_flops or chip.bf16_flops
        try:
            if stage == "sft":
                r = programs.sft_stage(cfg, mcfg, mesh, chip.hbm_bytes, peak, args.mfu)
            elif stage == "grpo":
                r = programs.grpo_stage(cfg, rl, mcfg, mesh, chip.hbm_bytes, peak, args.mfu)
            else:
                r = programs.rollout_stage(cfg, rl, mcfg, mesh, chip.hbm_bytes, peak, args.mfu, chip.hbm_bandwidth)
        except programs.DoesNotFit as e:
            if args.json:
                report.write_json(args.json, args.config, target.name, results,
                                  {"failed": {"stage": stage, "needed_bytes": e.needed, "hbm_bytes": chip.hbm_bytes}})
            return fail(report.not_fit_line(stage, e.needed, chip.hbm_bytes, e.lower_bound))
        results.append(r)
        # Each stage as soon as it is known (a big model's stage compiles for minutes).
        print(f"  compiled {stage} in {r.compile_seconds:.1f} s: {report.gib(r.bytes['total'])} GiB of "
              f"{report.gib(r.hbm_bytes)} GiB per chip ({report.gib(r.bytes['params'])} params, "
              f"{report.gib(r.bytes['optimizer'])} optimizer, {report.gib(r.bytes['kv_cache'])} kv cache, "
              f"{report.gib(r.bytes['temp'])} temp), {'fits' if r.fits else 'does NOT fit'}, "
              f"{r.flops_per_step / 1e12:.1f} TFLOP, {report.fmt_seconds(r.step_seconds)} at MFU {args.mfu:.0%}",
              flush=True)
        if r.decode_collective_bytes is not None:
            print(f"    decode on mesh {r.decode_mesh}: {r.decode_collective_bytes:,} collective bytes per token per chip "
                  f"({', '.join(f'{k} {v:,} B' for k, v in (r.decode_collectives or {}).items()) or 'none'}); {r.decode_roofline_seconds * 1e3:.2f} ms "
                  f"per decode step at the HBM roofline", flush=True)
        if r.bound:
            print(f"    analytic bound {report.gib(r.bound_total)} GiB per chip ({report.gib_parts(r.bound)}); "
                  f"compiled / bound = {r.bytes['total'] / r.bound_total:.2f}", flush=True)
        if args.json:
            report.write_json(args.json, args.config, target.name, results, {})
        if not r.fits:  # the rest would not run either: stop here
            break
    print(report.table(target.name, results, args.mfu))
    if results and results[0].name in ("sft", "grpo"):
        s = results[0]
        cfg, mcfg = (config, model_config) if s.name == "sft" else (rl_train, rl_model_config)
        if cfg.model != "tiny":
            count = programs.analytic_param_count(mcfg)
            shards = s.mesh.get("fsdp", 1) * s.mesh.get("tensor", 1)
            expect = count * _itemsize(cfg.param_dtype) / shards
            print(f"params check ({s.name}): analytic {count / 1e9:.3f} B params x {_itemsize(cfg.param_dtype)} B / "
                  f"{shards} shards = {report.gib(expect)} GiB per device; compiled state {report.gib(s.bytes['params'])} "
                  f"GiB ({(s.bytes['params'] - expect) / expect:+.2%}; LoRA adapters and replicated norms/biases included)")
    if args.json:
        report.write_json(args.json, args.config, target.name, results, {})
    bad = next((r for r in results if not r.fits), None)
    if bad is not None:
        return fail(report.not_fit_line(bad.name, bad.bytes["total"], bad.hbm_bytes))
    return 0


def _itemsize(dtype: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]
