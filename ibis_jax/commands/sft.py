"""``ibis-jax sft``: cold-start supervised fine-tuning on synthesized trajectories.

Examples::

    ibis-jax sft --config configs/tiny_cpu.py --data data/demo --workdir runs/tiny
    ibis-jax sft --config configs/qwen2_5_vl_3b_gpu.py --data data/sft --workdir runs/3b \\
        hf_dir=/models/Qwen2.5-VL-3B-Instruct batch_size=64 lr=2e-5

On several hosts run the same command on each, adding ``--coordinator HOST0:PORT --num-processes N
--process-id I`` (or nothing where JAX detects the cluster: Cloud TPU VMs, GKE, SLURM, Open MPI);
data and workdir on storage every host sees: a shared folder or ``gs://`` (``--data gs://B/sft
--workdir gs://B/runs/x hf_dir=gs://B/models/base``; docs/storage.md).

Trailing ``key=value`` arguments override fields of the config's ``TrainConfig``. Rerunning with
the same workdir resumes from its latest checkpoint (SIGTERM saves one before exiting). Writes
``WORKDIR/metrics.jsonl``, TensorBoard events under ``WORKDIR/tb``, checkpoints under
``WORKDIR/checkpoints`` and the final model as an HF directory in ``WORKDIR/hf``.
"""

from __future__ import annotations

import argparse
import logging


def register(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--config", required=True, help="Python config file defining get_config()")
    parser.add_argument("--data", required=True, help="dataset folder written by `ibis-jax synth`")
    parser.add_argument("--workdir", required=True, help="checkpoints, metrics, tokenizer, HF export")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the config fields")
    from ibis_jax.train.core import add_distributed_arguments

    add_distributed_arguments(parser)
    parser.set_defaults(run=run)


def stage_model_dirs(config):
    """The config with ``hf_dir`` / ``tokenizer_dir`` given as ``gs://`` staged into the local cache."""
    import dataclasses

    from ibis_jax import storage

    return dataclasses.replace(config, **{name: storage.stage_input(getattr(config, name), name)
                                          for name in ("hf_dir", "tokenizer_dir") if getattr(config, name)})


def run(args: argparse.Namespace) -> int:
    from ibis_jax.data.records import check_dataset
    from ibis_jax.train.config import load_config

    from ibis_jax import storage
    from ibis_jax.data.records import stage_dataset

    # Bad config, overrides or data are reported before JAX is imported (a second, not twenty).
    config = load_config(args.config, args.overrides)
    # gs:// inputs are staged into the local cache (committed folders only, checked file by file);
    # a gs:// workdir is trained in its local spool: checkpoints to the bucket, the rest uploaded.
    config = stage_model_dirs(config)
    data = stage_dataset(args.data)
    check_dataset(data)
    workdir = storage.spool(args.workdir)
    from ibis_jax.train.sft import train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(logging.INFO)  # also when an import configured logging first
    for noisy in ("absl", "jax._src.xla_bridge", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from ibis_jax.train import core

    core.init_distributed(args.coordinator, args.num_processes, args.process_id)  # before any computation
    core.quiet_other_processes()
    out = train(config, data, workdir, progress=not args.no_progress)
    import jax

    if jax.process_index() != 0:
        return 0
    m = out["metrics"]
    if out.get("already_finished"):
        print(f"{args.workdir}: already finished at step {out['step']}/{out['total_steps']}"
              + (f" (loss {m['loss']:.4f})" if "loss" in m else "")
              + (f"; HF export in {args.workdir}/hf" if config.export_hf else "")
              + "; nothing to train: use a new --workdir, or raise max_steps to continue")
        return 0
    print(
        f"step {out['step']}/{out['total_steps']} loss {m.get('loss', float('nan')):.4f} "
        f"action acc {m.get('action_accuracy', float('nan')):.3f}"
        + (f"; HF export in {args.workdir}/hf" if out["finished"] and config.export_hf else "; not finished (resume by rerunning)")
    )
    p = out["programs"]
    print(f"programs: {p['compiled']} compiled, {p['from_cache']} from the compilation cache")
    return 0
