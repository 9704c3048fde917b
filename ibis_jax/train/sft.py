"""Cold-start SFT (docs/design.md section 5): one linear `train(config, data_dir, workdir)`.

Sections: distributed + mesh, model config and tokenizer, input pipeline, optimizer, init or
restore, the update step, the loop (metrics, checkpoints, SIGTERM), export. The same code runs
on a laptop CPU, a GPU node and a TPU pod slice; only the config differs (see configs/).
"""

from __future__ import annotations

import logging
import math
import os
import time
import zlib
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ibis_jax.agent.settings import AgentSettings
from ibis_jax.compilation import CompileCounter
from ibis_jax.models import family, model_config_from_hf, preset_config
from ibis_jax.train import core
from ibis_jax.train import mesh as mesh_lib
from ibis_jax.train.checkpoint import Checkpointer, export_hf
from ibis_jax.train.config import TrainConfig, to_dict
from ibis_jax.train.loss import LOSSES
from ibis_jax.train.metrics import MetricsWriter, last_metrics, peak_flops_per_device, step_flops
from ibis_jax.train.optim import make_optimizer
from ibis_jax.train.pipeline import make_pipeline
from ibis_jax.train.program import build_program

log = logging.getLogger(__name__)
StepHook = Callable[[int, dict[str, float]], None]


TINY_VOCAB = 2048  # BPE merges fitted to the dataset's texts: the system prompt takes ~100 tokens


def resolve_model(config: TrainConfig, workdir: str, data_dir: str | None = None) -> tuple[Any, str]:
    """(model config of either family, tokenizer dir). An HF dir gives its family by
    `model_type`; else the preset `config.model`. Tiny presets without a model dir: a byte-level
    BPE tokenizer is fitted once to the system prompt and the texts of `data_dir` and written to
    `workdir/tokenizer` (later stages reuse it, and the HF export copies it)."""
    if config.hf_dir:
        return model_config_from_hf(config.hf_dir), config.tokenizer_dir or config.hf_dir
    if config.model.startswith("tiny"):
        from ibis_jax.models.qwen2_5_vl.tiny import make_tokenizer_dir

        tok = config.tokenizer_dir or os.path.join(workdir, "tokenizer")
        if not os.path.exists(os.path.join(tok, "tokenizer.json")) and jax.process_index() == 0:
            from ibis_jax.fileio import atomic_dir

            # A new folder is built aside and renamed when complete: a failure leaves none behind.
            with atomic_dir(tok) if not os.path.exists(tok) else _nullcontext(tok) as out:
                make_tokenizer_dir(out, vocab_size=TINY_VOCAB, corpus=_dataset_texts(data_dir), grammar_tokens=True)
                family(config.model).write_processor_config(out)  # the preset's image settings
        from ibis_jax.storage import share

        # the other processes read what process 0 wrote (other hosts of a gs:// workdir: through the bucket)
        share(tok, jax.process_index() == 0, lambda: core.barrier("tokenizer"))
        return preset_config(config.model, tok), tok
    model_config = preset_config(config.model)  # an unknown name raises, listing the presets
    if not config.tokenizer_dir:
        raise ValueError(f"config model {config.model!r} without hf_dir needs tokenizer_dir (a local HF dir)")
    return model_config, config.tokenizer_dir


def _nullcontext(value):
    import contextlib

    return contextlib.nullcontext(value)


def _dataset_texts(data_dir: str | None):
    """The conversation texts a tiny model will see: system prompt, queries, user turns, replies."""
    from ibis_jax.agent.prompts import SYSTEM_PROMPT
    from ibis_jax.data.records import TrajectoryDataSource

    yield SYSTEM_PROMPT
    if data_dir is None:
        return
    for record in TrajectoryDataSource(data_dir):
        yield record.query
        for step in record.steps:
            yield step.user
            yield step.text


def with_vision_layout(batch: dict[str, np.ndarray], vision_cfg, cache: dict) -> dict[str, Any]:
    """Add the host-computed `VisionLayout` (stacked over the micro-batch axis) to a batch."""
    grid = batch["image_grid_thw"][0]
    key = grid.tobytes()
    if key not in cache:
        lay = family(vision_cfg).module.vision_layout(grid, vision_cfg, per_image=True)  # equal images: each chip encodes its own
        a = batch["image_grid_thw"].shape[0]
        cache[key] = jax.tree.map(lambda x: np.broadcast_to(x, (a, *x.shape)).copy(), lay)
    return {**batch, "vision_layout": cache[key]}


def image_dtype(config: TrainConfig):
    """The dtype images travel to the devices in: the compute dtype's (the patch embedding casts
    to it first, so bf16 pixels lose nothing there and halve the transfer)."""
    return jnp.bfloat16 if config.compute_dtype == "bfloat16" else np.float32


def to_global(batch: dict[str, Any], shardings: dict[str, Any]) -> dict[str, jax.Array]:
    """Process-local numpy batch -> global jax arrays laid out by `shardings`."""
    return jax.tree.map(lambda x, s: jax.make_array_from_process_local_data(s, np.asarray(x)), batch, shardings)


def row_checksums(batch: dict[str, Any]) -> np.ndarray:
    """crc32 of each of this process's token-id rows, uint32 [rows] (micro-batch-major)."""
    ids = np.asarray(batch["input_ids"])
    return np.asarray([zlib.crc32(np.ascontiguousarray(r).tobytes()) for r in ids.reshape(-1, ids.shape[-1])],
                      np.uint32)


def fingerprint(row_crcs: np.ndarray) -> int:
    """The step's data fingerprint: crc32 of the global batch's row checksums in process order
    (logged per step to check the data order across resumes and process counts: the same for 1
    process or several, since each row keeps its checksum wherever it is read)."""
    return zlib.crc32(np.asarray(row_crcs, np.uint32).tobytes())


def agree_across_processes(batch: dict[str, np.ndarray], pad_id: int) -> dict[str, np.ndarray]:
    """Make the process-local batches of one step parts of one global batch (a no-op alone): the
    same sequence bucket everywhere (the longest any process needs) and image grids for the
    images of all processes (every grid is the same fixed square)."""
    processes = jax.process_count()
    if processes == 1:
        return batch
    cap = batch["image_grid_thw"].shape[1]
    if np.any(batch["num_images"] < cap):
        # Padding images sit after a micro-batch's real ones; across processes they would land
        # between two processes' images and be read by the second one's image tokens.
        raise ValueError(f"a micro-batch has fewer than max_images_per_sample x micro-batch = {cap} images; on "
                         "several processes every sample needs exactly max_images_per_sample images (history=none, "
                         "max_images_per_sample=1, no dropped samples)")
    batch = dict(batch)
    seq = batch["input_ids"].shape[-1]
    longest = core.global_max(seq)
    if longest > seq:
        pad = ((0, 0), (0, 0), (0, longest - seq))
        for k, fill in (("input_ids", pad_id), ("targets", pad_id), ("attention_mask", 0), ("weights", 0),
                        ("action_mask", 0)):
            batch[k] = np.pad(batch[k], pad, constant_values=fill)
    batch["image_grid_thw"] = np.tile(batch["image_grid_thw"], (1, processes, 1))
    return batch


def train(
    config: TrainConfig,
    data_dir: str,
    workdir: str,
    *,
    progress: bool = False,
    hooks: Sequence[StepHook] = (),
    stop_at_step: int | None = None,
    devices: Sequence[Any] | None = None,
) -> dict[str, Any]:
    """Train; resume from `workdir/checkpoints` if there is one. Returns a summary dict.

    stop_at_step: save and return after this step, as a preemption would (tests).
    """
    from ibis_jax.data.records import check_dataset

    from ibis_jax.fileio import local_workdir

    check_dataset(data_dir)  # a missing, empty or corrupt dataset is named before anything is written
    os.makedirs(local_workdir(workdir), exist_ok=True)
    # ---------------------------------------------------------------- distributed + mesh
    core.init_distributed()  # no-op when the command did it (--coordinator ...) or alone
    compiles = CompileCounter()
    os.makedirs(workdir, exist_ok=True)
    if jax.process_count() > 1 and config.history != "none":
        raise ValueError("history=full on several processes is not supported yet (padding images of one process "
                         "would be read by another's image tokens); use history=none")
    mesh = mesh_lib.make_mesh(config.mesh_shape, devices)
    log.info("mesh %s over %d devices (%s)", dict(mesh.shape), mesh.size, jax.devices()[0].device_kind)

    # ---------------------------------------------------------------- model config, tokenizer
    model_config, tokenizer_dir = resolve_model(config, workdir, data_dir)

    # ---------------------------------------------------------------- input pipeline
    pipeline = make_pipeline(
        data_dir, tokenizer_dir, config, process_index=jax.process_index(), process_count=jax.process_count(),
        image_kwargs=family(model_config).processor(tokenizer_dir).image_kwargs,
    )
    total_steps = config.max_steps or max(1, math.ceil(config.num_epochs * pipeline.steps_per_epoch))
    data_iter = pipeline.iterator()

    # ---------------------------------------------------------------- model and optimizer
    tx, schedule = make_optimizer(config, total_steps)
    key = jax.random.key(config.seed)
    program = build_program(config, model_config, mesh, tx, schedule)  # what `ibis-jax plan` compiles
    model_def = program.model_def

    # ---------------------------------------------------------------- init or restore
    ckpt = Checkpointer(workdir, config.keep_checkpoints)
    restored = ckpt.restore_latest(program.abstract)  # logs "resumed from step N"
    if restored is not None:
        saved, data_state, _, start = restored
        data_iter.set_state(data_state)
        state = program.resume(saved, config.hf_dir, key)  # the frozen base from where it came
    elif config.hf_dir:
        state, start = program.from_hf(config.hf_dir, key), 0
    else:
        state, start = program.init(key), 0

    # ---------------------------------------------------------------- the update step
    layout_cache: dict = {}
    pad_id = pipeline.collate.pad_id

    def next_batch() -> dict[str, Any]:
        batch = dict(agree_across_processes(next(data_iter), pad_id))
        batch.pop("num_images")  # a host-side count: the step (and `ibis-jax plan`) never takes it
        batch["pixel_values"] = batch["pixel_values"].astype(image_dtype(config))  # half the bytes in bf16
        return with_vision_layout(batch, model_config.vision, layout_cache)

    first = next_batch()
    batch_shardings = program.batch_shardings(first, processes=jax.process_count())
    step_fn = program.train_step(LOSSES["sft"], batch_shardings)
    peak = peak_flops_per_device(config.compute_dtype, config.peak_flops) * mesh.size

    # ---------------------------------------------------------------- the loop
    preemption = core.Preemption()  # SIGTERM: finish the step, checkpoint (all processes), exit
    writer = MetricsWriter(workdir, start_step=start)
    bar = _progress(progress, start, total_steps)
    metrics_out: dict[str, float] = {}
    clock = {"last": time.perf_counter(), "step": start}

    def log_step(pending: dict[str, Any]) -> None:
        """Write a dispatched step's metrics (fetched a step late: the next step is already
        queued, so the host never waits on the device just to log)."""
        nonlocal metrics_out
        done = pending["step"]
        m = {k: float(v) for k, v in jax.device_get(pending["metrics"]).items()}
        now = time.perf_counter()
        dt = (now - clock["last"]) / max(1, done - clock["step"])
        clock["last"], clock["step"] = now, done
        m["step_time_s"] = dt
        m["text_tokens_per_s"] = m["text_tokens"] / dt
        m["image_tokens_per_s"] = m["image_tokens"] / dt
        m["mfu"] = pending["flops"] / dt / peak
        m["data_fingerprint"] = float(pending["fingerprint"])
        if done % config.log_every == 0 or done == total_steps:
            writer.write(done, m)
            metrics_out = m
            for hook in hooks:
                hook(done, m)
            if bar is not None:
                bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{m['text_tokens_per_s']:.0f}",
                                img_tok_s=f"{m['image_tokens_per_s']:.0f}")

    batch = first
    pending: dict[str, Any] | None = None
    step = start
    try:
        while step < total_steps:
            if batch is None:
                batch = next_batch()  # host work and the transfer overlap the step still running
            global_batch = to_global(batch, batch_shardings)
            state, metrics = step_fn(state, global_batch)
            step += 1
            shapes = batch["input_ids"].shape
            patches = batch["pixel_values"].shape[0] * batch["pixel_values"].shape[1]
            flops = step_flops(
                model_config, tokens=shapes[0] * shapes[1] * shapes[2] * jax.process_count(), seq_len=shapes[2],
                sequences=shapes[0] * shapes[1] * jax.process_count(), patches=patches * jax.process_count(),
                freeze_vision=config.freeze_vision, image_size=config.image_size,
            )
            if pending is not None:
                log_step(pending)  # the previous step's (its hooks may ask to stop: seen just below)
            # The step's one host collective: the stop flag and every process's row checksums.
            sigterm, rows = preemption.requested_with(row_checksums(batch))
            batch = None
            pending = {"step": step, "metrics": metrics, "flops": flops, "fingerprint": fingerprint(rows)}
            if bar is not None:
                bar.update(1)
            stop = sigterm or step == stop_at_step
            save = step % config.checkpoint_every == 0 or step == total_steps or stop
            if save or step == total_steps:
                log_step(pending)
                pending = None
            if save:
                ckpt.save(step, state, data_iter.get_state(), to_dict(config))
            if stop:
                log.info("stopping at step %d (%s); checkpoint saved", step, "SIGTERM" if sigterm else "stop_at_step")
                break
    finally:
        writer.close()
        if bar is not None:
            bar.close()
        preemption.close()
    finished = step >= total_steps
    already_finished = start >= total_steps  # a rerun of a finished run: nothing trained
    if already_finished:
        metrics_out = last_metrics(workdir, start)
        log.info("%s: already finished at step %d/%d", workdir, start, total_steps)
    # ---------------------------------------------------------------- export
    hf_out = os.path.join(workdir, "hf")
    if finished and config.export_hf and not (already_finished and os.path.isdir(hf_out)):
        export_hf(model_def, state, hf_out, source_dir=tokenizer_dir, settings=AgentSettings.from_train_config(config))
    ckpt.close()
    programs = compiles.log("sft")
    return {"step": step, "total_steps": total_steps, "finished": finished, "state": state, "programs": programs,
            "program": program, "step_fn": step_fn,
            "model_def": model_def, "metrics": metrics_out, "tokenizer_dir": tokenizer_dir,
            "already_finished": already_finished}


def _progress(enabled: bool, start: int, total: int):
    if not enabled or jax.process_index() != 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="sft", unit="step", dynamic_ncols=True)


__all__ = ["train", "resolve_model", "with_vision_layout", "to_global", "fingerprint"]
