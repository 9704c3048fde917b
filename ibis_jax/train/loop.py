"""The one training loop of SFT and GRPO (docs/design.md section 5).

`TrainLoop.run` reads top to bottom: start-up (inputs checked, distributed runtime, workdir),
build (mesh, model, program: `train.program.build_program`), init or restore (Orbax,
`train.checkpoint.Checkpointer`), the steps, the final export. Each step: the trainer's
`train_step`, its metrics written (a step late where the step leaves them on the device, so the
host never waits on it just to log), one host collective that agrees on SIGTERM
(`core.Preemption`), an asynchronous checkpoint on the `checkpoint_every` cadence, at the last
step and before stopping. A trainer subclasses it and fills in the phases that differ: what it
builds, where its batches come from, what one step does, what its metrics and result hold
(`ibis_jax.train.sft.SFTLoop`, `ibis_jax.rl.trainer.GRPOLoop`).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Sequence

from ibis_jax.compilation import CompileCounter
from ibis_jax.train import core
from ibis_jax.train.checkpoint import Checkpointer, export_hf
from ibis_jax.train.config import TrainConfig, to_dict
from ibis_jax.train.metrics import MetricsWriter
from ibis_jax.train.state import TrainState

log = logging.getLogger(__name__)
StepHook = Callable[[int, dict[str, float]], None]


class TrainLoop:
    """Run with :meth:`run`. A subclass sets `name`; its :meth:`build` sets `program`,
    `total_steps`, `export_source` and `settings`; it provides :meth:`initial_state`,
    :meth:`train_step` and :meth:`result`; the other phases have defaults.

    A step's record is a dict with at least ``step`` (the step it ran, 1-based) and, unless
    :meth:`step_metrics` is overridden, ``metrics`` (host floats).
    """

    name = "train"  # the label of the "N programs compiled" line and of the progress bar
    metrics_late = False  # True: a step's metrics are written once the next step is dispatched

    def __init__(self, config: TrainConfig, workdir: str, *, hooks: Sequence[StepHook] = (), progress: bool = False,
                 stop_at_step: int | None = None):
        self.config, self.workdir, self.hooks = config, workdir, tuple(hooks)
        self.progress, self.stop_at_step = progress, stop_at_step
        self.program: Any = None
        self.state: TrainState | None = None
        self.total_steps = 0
        self.start = 0
        self.metrics: dict[str, float] = {}  # the last row written
        self.stopped: str | None = None  # why the loop stopped early: "SIGTERM" or "stop_at_step"
        self.export_dir: str | None = None  # where the final export went
        self.export_source: str | None = None  # the directory whose tokenizer files an export copies
        self.settings = None  # the agent settings an export records (`agent.settings.AGENT_FILE`)

    # ------------------------------------------------------------------ the run
    def run(self) -> dict[str, Any]:
        """Start-up, build, init or restore, the steps, the final export; the trainer's result."""
        self.start_up()
        self.build()
        self.ckpt = Checkpointer(self.workdir, self.config.keep_checkpoints)
        try:
            self.start = self.restore()
            self.prepare_steps()
            step = self.loop()
            self.finish(step)
        finally:
            self.ckpt.close()  # waits for the asynchronous saves
        programs = self.compiles.log(self.name)
        return self.result(step, programs)

    def start_up(self) -> None:
        """Inputs checked before anything is written; the distributed runtime (a no-op when the
        command started it, or alone); the compile counter; the workdir."""
        from ibis_jax.fileio import local_workdir

        self.check_inputs()
        local_workdir(self.workdir)  # a URL is refused: a gs:// workdir trains in its local spool
        core.init_distributed()
        self.compiles = CompileCounter()
        self.check_processes()
        os.makedirs(self.workdir, exist_ok=True)

    def restore(self) -> int:
        """The state of the newest checkpoint that restores, else the trainer's initial state;
        returns the step training starts from."""
        restored = self.ckpt.restore_latest(self.program.abstract)  # logs "resumed from step N"
        if restored is None:
            self.state = self.initial_state()
            return 0
        saved, data_state, _, start = restored
        self.state = self.resumed_state(saved, data_state)
        return start

    def loop(self) -> int:
        """Steps `start + 1` .. `total_steps` (fewer on SIGTERM or at `stop_at_step`); returns the
        last step run."""
        self.preemption = core.Preemption()  # SIGTERM: finish the step, checkpoint (all processes), exit
        self.writer = MetricsWriter(self.workdir, start_step=self.start)
        self.bar = self._progress_bar()
        step, pending = self.start, None
        try:
            while step < self.total_steps:
                record = self.train_step(step)
                step = record["step"]
                if pending is not None:
                    self.log_metrics(pending)  # the previous step's (its hooks may ask to stop: seen just below)
                if not self.metrics_late:
                    self.log_metrics(record)
                sigterm = self.stop_requested(record)  # the step's one host collective
                pending = record if self.metrics_late else None
                if self.bar is not None:
                    self.bar.update(1)
                stop = sigterm or step == self.stop_at_step
                save = step % self.config.checkpoint_every == 0 or step == self.total_steps or stop
                if save and pending is not None:
                    self.log_metrics(pending)
                    pending = None
                if save:
                    self.ckpt.save(step, self.state, self.data_state(step), to_dict(self.config))
                if stop:
                    self.stopped = "SIGTERM" if sigterm else "stop_at_step"
                    log.info("%s: stopping at step %d (%s); checkpoint saved", self.name, step, self.stopped)
                    break
                self.after_step(step)
        finally:
            self.writer.close()
            if self.bar is not None:
                self.bar.close()
            self.preemption.close()
        return step

    def log_metrics(self, record: dict[str, Any]) -> None:
        """A step's metrics to metrics.jsonl and TensorBoard (when due), then to the hooks."""
        step = record["step"]
        m = self.step_metrics(record)
        if not self.log_due(step):
            return
        self.writer.write(step, m)
        self.metrics = m
        for hook in self.hooks:
            hook(step, m)
        self.report(step, m)

    def finish(self, step: int) -> None:
        """After the steps: the final export to WORKDIR/hf (a rerun of a finished run writes it
        only when it is missing)."""
        if self.start >= self.total_steps:
            log.info("%s: already finished at step %d/%d", self.workdir, self.start, self.total_steps)
        final = os.path.join(self.workdir, "hf")
        if self.exports_final(step) and not (self.start >= self.total_steps and os.path.isdir(final)):
            self.export(final)
            self.export_dir = final

    # ------------------------------------------------------------------ phases a trainer provides
    def check_inputs(self) -> None:
        """Refuse missing or empty inputs before anything is written."""

    def check_processes(self) -> None:
        """Refuse what this process count does not support (after the distributed start-up)."""

    def build(self) -> None:
        """Mesh, model, optimizer and program (`self.program`); `self.total_steps`."""
        raise NotImplementedError

    def initial_state(self) -> TrainState:
        """The state of step 0 (no checkpoint)."""
        raise NotImplementedError

    def resumed_state(self, saved: TrainState, data_state: Any) -> TrainState:
        """A restored checkpoint (`frozen=None`) as the state to train on; the data iterator set
        to `data_state`. Default: the frozen parameters from the HF directory, else the seed."""
        import jax

        return self.program.resume(saved, self.config.hf_dir, jax.random.key(self.config.seed))

    def prepare_steps(self) -> None:
        """What the steps need once the state is known: batches, jitted step functions."""

    def train_step(self, step: int) -> dict[str, Any]:
        """Run step `step + 1` (updating `self.state`); its record."""
        raise NotImplementedError

    def step_metrics(self, record: dict[str, Any]) -> dict[str, float]:
        """The metrics row of a step's record (host floats)."""
        return record["metrics"]

    def log_due(self, step: int) -> bool:
        """Whether step `step`'s metrics are written."""
        return True

    def report(self, step: int, metrics: dict[str, float]) -> None:
        """Show a written step (a log line, the progress bar)."""

    def stop_requested(self, record: dict[str, Any]) -> bool:
        """Whether any process got SIGTERM (a collective: all processes stop at the same step).
        With `metrics_late` it may complete the record, whose metrics are written after it."""
        return self.preemption.requested()

    def data_state(self, step: int) -> Any:
        """What the checkpoint of `step` holds of the data order."""
        return {"step": step}

    def after_step(self, step: int) -> None:
        """After step `step` and its checkpoint, unless the loop stopped there."""

    def exports_final(self, step: int) -> bool:
        """Whether the run ends with the final export."""
        return step >= self.total_steps and self.config.export_hf

    def export(self, directory: str) -> None:
        """The trained model as an HF directory (every process calls it)."""
        export_hf(self.program.model_def, self.state, directory, source_dir=self.export_source,
                  settings=self.settings)
        log.info("exported the %s policy to %s", self.name.upper(), directory)

    def result(self, step: int, programs: dict[str, int]) -> dict[str, Any]:
        """What the entry point returns."""
        raise NotImplementedError

    def _progress_bar(self):
        import jax

        if not self.progress or jax.process_index() != 0:
            return None
        from tqdm import tqdm

        return tqdm(total=self.total_steps, initial=self.start, desc=self.name, unit="step", dynamic_ncols=True)


__all__ = ["TrainLoop", "StepHook"]
