"""Cold-start SFT (docs/design.md section 5): `train(config, data_dir, workdir)`.

`SFTLoop` is the shared training loop (`ibis_jax.train.loop`: init or restore, the steps,
SIGTERM, metrics, checkpoints, export) with SFT's phases: the model config and tokenizer
(`resolve_model`), the grain input pipeline (its iterator state checkpointed with the train
state), the ``sft`` loss, and metrics fetched a step late with throughput and MFU. The host-batch
helpers here (`with_vision_layout`, `to_global`, the row checksums) serve GRPO too. The same code
runs on a laptop CPU, a GPU node and a TPU pod slice; only the config differs (see configs/).
"""

from __future__ import annotations

import logging
import math
import os
import time
import zlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ibis_jax.agent.settings import AgentSettings
from ibis_jax.models import family, model_config_from_hf, preset_config
from ibis_jax.train import core
from ibis_jax.train import mesh as mesh_lib
from ibis_jax.train.config import TrainConfig
from ibis_jax.train.loop import StepHook, TrainLoop
from ibis_jax.train.loss import LOSSES
from ibis_jax.train.metrics import last_metrics, peak_flops_per_device, step_flops
from ibis_jax.train.optim import make_optimizer
from ibis_jax.train.pipeline import make_pipeline
from ibis_jax.train.program import build_program

log = logging.getLogger(__name__)


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


class SFTLoop(TrainLoop):
    """SFT in the shared loop: batches from the grain pipeline, the ``sft`` loss, metrics a step
    late (one host collective per step: the SIGTERM flag and the batch's row checksums)."""

    name = "sft"
    metrics_late = True

    def __init__(self, config: TrainConfig, data_dir: str, workdir: str, *, devices: Sequence[Any] | None = None,
                 **loop_options):
        super().__init__(config, workdir, **loop_options)
        self.data_dir, self.devices = data_dir, devices

    def check_inputs(self) -> None:
        from ibis_jax.data.records import check_dataset

        check_dataset(self.data_dir)  # a missing, empty or corrupt dataset is named before anything is written

    def check_processes(self) -> None:
        if jax.process_count() > 1 and self.config.history != "none":
            raise ValueError("history=full on several processes is not supported yet (padding images of one "
                             "process would be read by another's image tokens); use history=none")

    def build(self) -> None:
        """Mesh; model config and tokenizer; the input pipeline; optimizer and program."""
        config = self.config
        self.mesh = mesh = mesh_lib.make_mesh(config.mesh_shape, self.devices)
        log.info("mesh %s over %d devices (%s)", dict(mesh.shape), mesh.size, jax.devices()[0].device_kind)
        self.model_config, self.export_source = resolve_model(config, self.workdir, self.data_dir)
        self.pipeline = make_pipeline(self.data_dir, self.export_source, config, process_index=jax.process_index(),
                                      process_count=jax.process_count(),
                                      image_kwargs=family(self.model_config).processor(self.export_source).image_kwargs)
        self.total_steps = config.max_steps or max(1, math.ceil(config.num_epochs * self.pipeline.steps_per_epoch))
        self.data_iter = self.pipeline.iterator()
        tx, schedule = make_optimizer(config, self.total_steps)
        self.program = build_program(config, self.model_config, mesh, tx, schedule)  # what `ibis-jax plan` compiles
        self.settings = AgentSettings.from_train_config(config)

    def initial_state(self):
        key = jax.random.key(self.config.seed)
        return self.program.from_hf(self.config.hf_dir, key) if self.config.hf_dir else self.program.init(key)

    def resumed_state(self, saved, data_state):
        self.data_iter.set_state(data_state)
        return super().resumed_state(saved, data_state)  # the frozen base from where it came

    def prepare_steps(self) -> None:
        """The first batch (its shapes give the batch shardings), the jitted step, the clock."""
        self.layout_cache: dict = {}
        self.batch = self.next_batch()
        self.batch_shardings = self.program.batch_shardings(self.batch, processes=jax.process_count())
        self.step_fn = self.program.train_step(LOSSES["sft"], self.batch_shardings)
        self.peak = peak_flops_per_device(self.config.compute_dtype, self.config.peak_flops) * self.mesh.size
        self.clock = {"last": time.perf_counter(), "step": self.start}

    def next_batch(self) -> dict[str, Any]:
        batch = dict(agree_across_processes(next(self.data_iter), self.pipeline.collate.pad_id))
        batch.pop("num_images")  # a host-side count: the step (and `ibis-jax plan`) never takes it
        batch["pixel_values"] = batch["pixel_values"].astype(image_dtype(self.config))  # half the bytes in bf16
        return with_vision_layout(batch, self.model_config.vision, self.layout_cache)

    def train_step(self, step: int) -> dict[str, Any]:
        """Dispatch the update on the next batch (built, and sent, while the previous step still
        runs on the device)."""
        batch = self.batch if self.batch is not None else self.next_batch()
        self.batch = None
        self.state, metrics = self.step_fn(self.state, to_global(batch, self.batch_shardings))
        shapes, processes = batch["input_ids"].shape, jax.process_count()
        patches = batch["pixel_values"].shape[0] * batch["pixel_values"].shape[1]
        flops = step_flops(
            self.model_config, tokens=shapes[0] * shapes[1] * shapes[2] * processes, seq_len=shapes[2],
            sequences=shapes[0] * shapes[1] * processes, patches=patches * processes,
            freeze_vision=self.config.freeze_vision, image_size=self.config.image_size,
        )
        return {"step": step + 1, "metrics": metrics, "flops": flops, "checksums": row_checksums(batch)}

    def stop_requested(self, record: dict[str, Any]) -> bool:
        """The SIGTERM flag and every process's row checksums, in one collective."""
        sigterm, rows = self.preemption.requested_with(record.pop("checksums"))
        record["fingerprint"] = fingerprint(rows)
        return sigterm

    def step_metrics(self, record: dict[str, Any]) -> dict[str, float]:
        """The step's metrics fetched from the device (a step late: the next step is queued, so
        the host never waits on the device just to log), with throughput and MFU."""
        done = record["step"]
        m = {k: float(v) for k, v in jax.device_get(record["metrics"]).items()}
        now = time.perf_counter()
        dt = (now - self.clock["last"]) / max(1, done - self.clock["step"])
        self.clock["last"], self.clock["step"] = now, done
        m["step_time_s"] = dt
        m["text_tokens_per_s"] = m["text_tokens"] / dt
        m["image_tokens_per_s"] = m["image_tokens"] / dt
        m["mfu"] = record["flops"] / dt / self.peak
        m["data_fingerprint"] = float(record["fingerprint"])
        return m

    def log_due(self, step: int) -> bool:
        return step % self.config.log_every == 0 or step == self.total_steps

    def report(self, step: int, metrics: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['text_tokens_per_s']:.0f}",
                                 img_tok_s=f"{metrics['image_tokens_per_s']:.0f}")

    def data_state(self, step: int) -> Any:
        return self.data_iter.get_state()

    def result(self, step: int, programs: dict[str, int]) -> dict[str, Any]:
        already_finished = self.start >= self.total_steps  # a rerun of a finished run: nothing trained
        return {"step": step, "total_steps": self.total_steps, "finished": step >= self.total_steps,
                "state": self.state, "programs": programs, "program": self.program, "step_fn": self.step_fn,
                "model_def": self.program.model_def,
                "metrics": last_metrics(self.workdir, self.start) if already_finished else self.metrics,
                "tokenizer_dir": self.export_source, "already_finished": already_finished}


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
    return SFTLoop(config, data_dir, workdir, devices=devices, progress=progress, hooks=hooks,
                   stop_at_step=stop_at_step).run()


__all__ = ["train", "SFTLoop", "resolve_model", "with_vision_layout", "to_global", "fingerprint"]
