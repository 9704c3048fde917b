"""The generic update step shared by SFT and GRPO: `train_step(state, batch) -> (state, metrics)`.

Only the loss and the batch differ between algorithms. `make_train_step(model_def, loss_fn, tx,
schedule)` returns the pure step; `jit_train_step` compiles it over a mesh with explicit
in/out shardings and the state donated. Batches carry a leading micro-batch axis [A, ...]; the
step scans over it, summing gradients of the loss *sums* and the denominators, and divides once:
the update equals that of one big batch (token mean stays exact under accumulation).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from ibis_jax.train.loss import LossFn
from ibis_jax.train.state import ModelDef, TrainState

Metrics = dict[str, jax.Array]


def make_train_step(
    model_def: ModelDef, loss_fn: LossFn, tx: optax.GradientTransformation, schedule: optax.Schedule
) -> Callable[[TrainState, dict[str, Any]], tuple[TrainState, Metrics]]:
    """The pure update step for `loss_fn(model, micro_batch) -> (loss_sum, denominator, aux)`."""

    def train_step(state: TrainState, batch: dict[str, Any]) -> tuple[TrainState, Metrics]:
        def micro(grad_sum, mb):
            def f(params):
                loss_sum, denom, aux = loss_fn(model_def.build(params, state.frozen), mb)
                return loss_sum, (denom, aux)

            (loss_sum, (denom, aux)), grads = jax.value_and_grad(f, has_aux=True)(state.params)
            grad_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_sum, grads)
            return grad_sum, (loss_sum, denom, aux)

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        grad_sum, (loss_sums, denoms, auxes) = jax.lax.scan(micro, zeros, batch)
        denom = denoms.sum()
        safe = jnp.where(denom > 0, denom, 1.0)  # a batch without loss tokens: zero update
        grads = jax.tree.map(lambda g, p: (g / safe).astype(p.dtype), grad_sum, state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics: Metrics = {
            "loss": loss_sums.sum() / safe,
            "loss_denominator": denom,
            "grad_norm": optax.global_norm(grads),
            "param_norm": optax.global_norm(params),
            "learning_rate": jnp.asarray(schedule(state.step), jnp.float32),
        }
        for name, value in auxes.items():
            if isinstance(value, tuple):
                num, den = value[0].sum(), value[1].sum()
                metrics[name] = num / jnp.maximum(den, 1)
            elif name.endswith("_max_abs"):  # a maximum over the micro-batches
                metrics[name] = value.max()
            else:
                metrics[name] = value.sum()
        new_state = TrainState(state.step + 1, params, state.frozen, opt_state)
        return new_state, metrics

    return train_step


def jit_train_step(
    step_fn: Callable, state_shardings: Any, batch_shardings: Any, mesh: jax.sharding.Mesh
) -> Callable[[TrainState, dict[str, Any]], tuple[TrainState, Metrics]]:
    """jax.jit with explicit shardings, donated state, and the mesh set for the model's
    activation sharding constraints."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    jitted = jax.jit(
        step_fn, in_shardings=(state_shardings, batch_shardings), out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )

    def run(state, batch):
        with jax.set_mesh(mesh):
            return jitted(state, batch)

    run.jitted = jitted  # for .lower(...) in benchmarks
    return run
