"""The program builder: one function from a config and a mesh to what a trainer runs.

`build_program(config, model_config, mesh, tx, schedule)` gives the model definition (dtypes,
remat policy, scanned layers, LoRA, frozen vision: `state.model_options`), the abstract train
state with its shardings, and the step functions. `ibis-jax sft`, `ibis-jax grpo` and
`ibis-jax plan` all build their programs here, so what `plan` compiles for a TPU or GPU target
is the program the trainers run (a test lowers both and compares them).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import optax

from ibis_jax.train import mesh as mesh_lib
from ibis_jax.train.config import TrainConfig
from ibis_jax.train.state import (ModelDef, TrainState, abstract_train_state, init_fn_for, load_model, new_state,
                                  platform_of, split_model)
from ibis_jax.train.step import jit_train_step, make_train_step


@dataclasses.dataclass
class Program:
    config: TrainConfig
    model_config: Any  # Qwen25VLConfig or Qwen3VLConfig: the family follows from it
    mesh: jax.sharding.Mesh
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    model_def: ModelDef
    abstract: TrainState  # ShapeDtypeStructs carrying their shardings
    shardings: TrainState  # NamedShardings

    # ------------------------------------------------------------------ the state
    def init(self, key: jax.Array) -> TrainState:
        """A randomly initialised state, born sharded."""
        init = init_fn_for(self.config, self.model_config, self.tx, platform_of(self.mesh))
        return jax.jit(init, out_shardings=self.shardings)(key)

    def from_hf(self, directory: str, key: jax.Array) -> TrainState:
        """The state around an HF directory's weights, loaded with the config's dtypes and options
        (each tensor read into its shard), adapters and optimizer state born sharded."""
        model = load_model(self.config, directory, self.mesh)
        _, trainable, frozen, _ = split_model(model, self.config)
        del model
        make = lambda trainable, frozen, key: new_state(self.config, self.tx, trainable, frozen, key)
        return jax.jit(make, out_shardings=self.shardings)(trainable, frozen, key)

    def frozen_params(self, directory: str | None, key: jax.Array) -> Any:
        """The frozen parameters from where the run got them (a checkpoint holds none): the HF
        directory, else the seeded random init (deterministic: the same values as at step 0)."""
        if directory:
            _, _, frozen, _ = split_model(load_model(self.config, directory, self.mesh), self.config)
            return jax.device_put(frozen, self.shardings.frozen)
        init = init_fn_for(self.config, self.model_config, self.tx, platform_of(self.mesh))
        return jax.jit(lambda k: init(k).frozen, out_shardings=self.shardings.frozen)(key)

    def resume(self, saved: TrainState, directory: str | None, key: jax.Array) -> TrainState:
        """A restored checkpoint (`frozen=None`) completed with its frozen parameters."""
        return TrainState(saved.step, saved.params, self.frozen_params(directory, key), saved.opt_state)

    # ------------------------------------------------------------------ the steps
    def train_step(self, loss_fn: Callable, batch_shardings: Any):
        """The jitted update `(state, batch) -> (state, metrics)` for `loss_fn` (state donated)."""
        step = make_train_step(self.model_def, loss_fn, self.tx, self.schedule)
        return jit_train_step(step, self.shardings, batch_shardings, self.mesh)

    def jit_logprobs(self, fn: Callable, batch_shardings: Any):
        """`fn(params, frozen, batch) -> [A, b, S]` (the old / reference log-prob pass) jitted
        with the state's and the batch's shardings."""
        return jax.jit(fn, in_shardings=(self.shardings.params, self.shardings.frozen, batch_shardings),
                       out_shardings=batch_shardings["targets"])

    def batch_shardings(self, batch: Any, processes: int = 1) -> Any:
        return mesh_lib.named(self.mesh, mesh_lib.batch_specs(batch, self.mesh, processes=processes))


def build_program(config: TrainConfig, model_config: Any, mesh: jax.sharding.Mesh,
                  tx: optax.GradientTransformation, schedule: optax.Schedule) -> Program:
    model_def, abstract, specs = abstract_train_state(config, model_config, tx, jax.random.key(config.seed),
                                                      platform_of(mesh))
    shardings = mesh_lib.named(mesh, specs)
    abstract = mesh_lib.with_shardings(abstract, shardings)
    return Program(config, model_config, mesh, tx, schedule, model_def, abstract, shardings)


__all__ = ["Program", "build_program"]
