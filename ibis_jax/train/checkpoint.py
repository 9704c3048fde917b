"""Orbax checkpoints of the train state, the data-iterator state and the config; HF export.

Layout: `WORKDIR/checkpoints/<step>/{state,data,config}`. `state` holds params, frozen params,
optimizer state and step (sharded arrays, restored straight into their shardings); `data` the
grain iterator state (JSON; the same on every process); `config` the
TrainConfig. Restoring the state, iterator and config of step k and running on reproduces the
uninterrupted run bit for bit (same data order, same arithmetic).

Faults: Orbax writes a step under a temporary name and renames it when complete, so a kill during a
save leaves the previous steps intact. :meth:`Checkpointer.restore_latest` restores the newest
step that restores; a newer one that does not (corrupt files) is skipped with a warning naming it
and moved to ``WORKDIR/checkpoints-unrestorable/`` so later saves do not collide with it. The HF
export is built in a hidden sibling folder and renamed when complete (``fileio.atomic_dir``).

A ``gs://`` workdir is trained in a local spool (``ibis_jax.storage.spool``): checkpoints go to
the bucket (Orbax commits a step with its own marker), an export is uploaded and committed
(``storage.publish``: the commit marker last, so a killed upload leaves nothing a reader takes).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import jax
import orbax.checkpoint as ocp

from ibis_jax.errors import DataError
from ibis_jax.train.state import ModelDef, TrainState

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, workdir: str, keep: int = 3):
        from ibis_jax.storage import checkpoint_root

        # etils.epath: local, or the gs:// workdir a local spool mirrors (Orbax writes it through TensorStore)
        self.directory = checkpoint_root(workdir) / "checkpoints"
        self.manager = ocp.CheckpointManager(
            self.directory,
            item_names=("state", "data", "config"),
            # Asynchronous: `save` returns once the arrays are copied to host memory; the files are
            # written while training goes on (`close` and the next save wait for it).
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True),
        )

    @property
    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState | Any, data_state: Any, config: dict) -> None:
        """Collective: every process calls it with its shards of `state`. Of a `TrainState` only
        what training changes is written (step, trainable parameters, optimizer state): the frozen
        parameters come back from where the run got them (the HF directory, or the seeded init)
        on resume, so a LoRA checkpoint of a 7B model is megabytes, not 15 GB. The data-iterator
        state is the same on every process (each took the same number of steps from its own
        slice), so process 0's copy is the one written, and any process count restores from it."""
        key = "data"
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_saved(state)),
                data=ocp.args.JsonSave({key: data_state}),
                config=ocp.args.JsonSave(config),
            ),
            force=True,
        )

    def restore(self, abstract_state: TrainState | Any, step: int | None = None) -> tuple[Any, Any, dict, int]:
        """abstract_state: ShapeDtypeStructs with shardings (arrays land sharded). Returns
        (state, data-iterator state, config dict, step); a `TrainState` comes back with
        `frozen=None`, for the caller to fill from the run's source (`Program.frozen`)."""
        step = self.latest_step if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoint to restore")
        self.manager.wait_until_finished()
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_saved(abstract_state)),
                data=ocp.args.JsonRestore(),
                config=ocp.args.JsonRestore(),
            ),
        )
        data = out.data["data"] if "data" in out.data else out.data[f"data_{jax.process_index()}"]  # older layout
        state = out.state
        if isinstance(abstract_state, TrainState):
            state = TrainState(state["step"], state["params"], None, state["opt_state"])
        return state, data, out.config, step

    def restore_latest(self, abstract_state: TrainState) -> tuple[TrainState, Any, dict, int] | None:
        """:meth:`restore` of the newest step that restores, or ``None`` without checkpoints.

        Steps that fail to restore are skipped with a warning naming them and, once an older one
        restored, moved aside (``checkpoints-unrestorable/``). When none restores nothing is moved
        and a :class:`~ibis_jax.errors.DataError` names the folder and the first error.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        failed: list[tuple[int, str]] = []
        for step in steps:
            try:
                out = self.restore(abstract_state, step)
            except Exception as e:  # corrupt or truncated files: Orbax, tensorstore and JSON errors
                reason = " ".join(str(e).split())[:300] or type(e).__name__
                failed.append((step, reason))
                log.warning("checkpoint %s does not restore (%s: %s); skipping it", self._step_dir(step),
                            type(e).__name__, reason)
                continue
            if failed:
                self._set_aside([s for s, _ in failed])
            log.info("resumed from step %d (%s)", step, self._step_dir(step))
            return out
        if failed:
            step, reason = failed[0]
            raise DataError(f"{self.directory}: no checkpoint restores (tried steps {[s for s, _ in failed]}; "
                            f"step {step}: {reason}); fix or delete the folder to start over")
        return None

    def _step_dir(self, step: int):
        return self.directory / str(step)

    def _set_aside(self, steps: list[int]) -> None:
        if jax.process_index() == 0:
            aside = self.directory.parent / "checkpoints-unrestorable"
            aside.mkdir(parents=True, exist_ok=True)
            for step in steps:
                target = aside / f"{step}-{int(time.time())}"
                self._step_dir(step).rename(target)
                log.warning("moved the checkpoint of step %d that does not restore to %s", step, target)
        self.manager.reload()

    def wait(self) -> None:
        """Block until the asynchronous saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _saved(state: Any) -> Any:
    """What a checkpoint holds of `state`: a TrainState without its frozen parameters."""
    if isinstance(state, TrainState):
        return {"step": state.step, "params": state.params, "opt_state": state.opt_state}
    return state


def export_hf(model_def: ModelDef, state: TrainState, directory: str, source_dir: str | None = None,
              settings=None, max_shard_size: int | str = "5GB") -> None:
    """Write the trained model as an HF directory straight from the (sharded, possibly multi-host)
    state: tensor by tensor, LoRA merged into each adapted kernel on the way out, one safetensors
    shard in host memory at a time, written by process 0 (`save_hf_params`) into a folder renamed
    into place when complete; with the agent settings it was trained with
    (`agent.settings.AGENT_FILE`; None: the defaults). Every process must call it."""
    from ibis_jax.agent.settings import AGENT_FILE, HF_DEFAULTS, settings_json
    from ibis_jax.models import family
    from ibis_jax.models.qwen2_5_vl.params import host_tensor
    from ibis_jax.train import lora as lora_lib

    adapters = state.params
    scale = model_def.lora_alpha / max(model_def.lora_rank, 1)

    def merge(entry, w):  # on the host, in numpy: the same bytes on every mesh
        ab = adapters.get(lora_lib.key_of(entry.path))
        if ab is None:
            return w
        return lora_lib.merge_host(w, host_tensor(entry, ab["a"]), host_tensor(entry, ab["b"]), scale)

    if model_def.lora_rank:
        params, transform = state.frozen, merge
    else:
        params, transform = model_def.all_params(state.params, state.frozen), None  # a dict merge: no copy
    family(model_def.config).save_hf_params(params, model_def.config, directory, source_dir=source_dir, max_shard_size=max_shard_size,
                   transform=transform, extra_files={AGENT_FILE: settings_json(settings or HF_DEFAULTS)})
    if jax.process_index() == 0:
        from ibis_jax.storage import publish

        publish(directory)  # inside a gs:// workdir's spool: uploaded, then its commit marker (a no-op elsewhere)
