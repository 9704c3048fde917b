"""The train state (params, frozen params, optimizer state, step) and how a model is built from it.

The model is split functionally (big_vision style): a static graph definition plus plain nested
dicts of arrays, so shapes come from `jax.eval_shape`, shardings from the model's PartitionSpecs,
and init runs under `jax.jit` with `out_shardings` (nothing is materialised unsharded).
  - full fine-tuning: params = the `trainable_filter` parameters, frozen = the rest (the vision
    tower when `freeze_vision`);
  - LoRA: params = the adapters {kernel path: {a, b}}, frozen = every model parameter.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

from ibis_jax.models import family
from ibis_jax.models.qwen2_5_vl import ShardingConfig
from ibis_jax.models.qwen2_5_vl.vlm import VisionLanguageModel
from ibis_jax.train import lora as lora_lib
from ibis_jax.train.config import TrainConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any  # trainable, nested dict of arrays
    frozen: Any  # not trained, nested dict of arrays (may be empty)
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class ModelDef:
    """Static description: builds the NNX model from (params, frozen)."""

    graphdef: Any
    config: Any  # the model config (Qwen25VLConfig or Qwen3VLConfig)
    lora_rank: int = 0
    lora_alpha: float = 16.0

    def all_params(self, params: Any, frozen: Any) -> dict:
        """Every model parameter as one nested dict (LoRA merged into the weights)."""
        if self.lora_rank:
            return lora_lib.merge_lora(frozen, params, self.lora_alpha, self.lora_rank)
        return _deep_merge(frozen, params)

    def abstract_params(self, params: Any, frozen: Any) -> dict:
        """`all_params` of abstract (ShapeDtypeStruct) trees: a merged kernel has its base's shape,
        dtype and sharding, so with LoRA that is the frozen tree itself."""
        return frozen if self.lora_rank else _deep_merge(frozen, params)

    def build(self, params: Any, frozen: Any, *, merged: bool = False) -> VisionLanguageModel:
        """The model over (params, frozen). With LoRA the adapters act on the activations
        (training, scoring); merged=True folds them into the kernels instead (the rollouts'
        sampler, which reads plain kernels)."""
        if self.lora_rank and not merged:
            model = nnx.merge(self.graphdef, nnx.State(frozen))
            lora_lib.attach(model, params, self.lora_alpha, self.lora_rank)
            return model
        return nnx.merge(self.graphdef, nnx.State(self.all_params(params, frozen)))


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if k in out and isinstance(v, dict) else v
    return out


def _dtype(name: str):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]


def platform_of(mesh: jax.sharding.Mesh | None) -> str:
    """The platform a program is built for: its mesh's devices' (libtpu's compile-only TPUs under
    `ibis-jax plan`, on a CPU host), else the default backend's."""
    if mesh is not None:
        return mesh.devices.flat[0].platform
    return jax.default_backend()


def model_options(config: TrainConfig, platform: str = "cpu") -> dict[str, Any]:
    """The one place a config becomes the model's build options (dtypes, remat policy, scanned
    layers, attention backend for `platform`, frozen vision, sharding names): random init,
    `load_hf` and `plan` all take these."""
    from ibis_jax.models.attention import resolve_backend

    return dict(dtype=_dtype(config.compute_dtype), param_dtype=_dtype(config.param_dtype),
                sharding=ShardingConfig.fsdp_tensor(), remat=config.remat_name, scan_layers=config.scan_layers,
                attention=resolve_backend(config.attention, platform), mlp_chunk=config.mlp_chunk,
                freeze_vision=config.freeze_vision)


def make_model(config: TrainConfig, model_config: Any, key: jax.Array, platform: str = "cpu") -> VisionLanguageModel:
    """A randomly initialised model of `model_config`'s family with the config's build options."""
    return family(model_config).model_class(model_config, **model_options(config, platform), rngs=nnx.Rngs(key))


def load_model(config: TrainConfig, directory: str, mesh: jax.sharding.Mesh | None) -> VisionLanguageModel:
    """An HF directory (either family) loaded with the config's build options (each tensor placed
    sharded on `mesh`)."""
    from ibis_jax.models import load_hf

    opts = model_options(config, platform_of(mesh))
    if mesh is None:  # one device: no sharding names (their constraints would need a mesh)
        opts["sharding"] = ShardingConfig.no_sharding()
    return load_hf(directory, opts.pop("param_dtype"), mesh, compute_dtype=opts.pop("dtype"), **opts)


def split_model(model: VisionLanguageModel, config: TrainConfig) -> tuple[Any, dict, dict, dict]:
    """model -> (graphdef, trainable dict, frozen dict, PartitionSpec dict of all params)."""
    graphdef, state = nnx.split(model)
    all_params = nnx.to_pure_dict(state)
    specs = nnx.to_pure_dict(nnx.get_partition_spec(state))
    if config.lora_rank:
        return graphdef, {}, all_params, specs
    train_state = nnx.state(model, type(model).trainable_filter(config.freeze_vision))
    trainable = nnx.to_pure_dict(train_state)
    frozen = _subtract(all_params, trainable)
    return graphdef, trainable, frozen, specs


def _subtract(a: dict, b: dict) -> dict:
    out = {}
    for k, v in a.items():
        if k not in b:
            out[k] = v
        elif isinstance(v, dict):
            sub = _subtract(v, b[k])
            if sub:
                out[k] = sub
    return out


def _select(specs: dict, like: dict) -> dict:
    return {k: _select(specs[k], v) if isinstance(v, dict) else specs[k] for k, v in like.items()}


def state_specs(state: TrainState, param_specs: dict, tx: optax.GradientTransformation, config: TrainConfig) -> TrainState:
    """PartitionSpecs of every leaf of `state` (abstract or concrete): params and frozen from the
    model's annotations (LoRA adapters from their kernels), optimizer moments like their params."""
    if config.lora_rank:
        p_specs = lora_lib.lora_specs(param_specs, state.params)
    else:
        p_specs = _select(param_specs, state.params)
    f_specs = _select(param_specs, state.frozen)
    is_spec = lambda x: isinstance(x, P)
    opt_specs = optax.tree_map_params(
        tx, lambda _, s: s, state.opt_state, p_specs, transform_non_params=lambda _: P(), is_leaf=is_spec
    )
    return TrainState(step=P(), params=p_specs, frozen=f_specs, opt_state=opt_specs)


def new_state(config: TrainConfig, tx: optax.GradientTransformation, trainable: dict, frozen: dict,
              key: jax.Array) -> TrainState:
    """The step-0 TrainState around a model's parameters: with LoRA, fresh float32 adapters over
    the frozen base; the optimizer state of what trains."""
    if config.lora_rank:
        trainable = lora_lib.init_lora(frozen, config.lora_targets, config.lora_rank, jax.random.fold_in(key, 1))
    return TrainState(jnp.zeros((), jnp.int32), trainable, frozen, tx.init(trainable))


def init_fn_for(
    config: TrainConfig, model_config: Any, tx: optax.GradientTransformation, platform: str = "cpu"
) -> Callable[[jax.Array], TrainState]:
    """key -> TrainState of a freshly initialised model (jit it with out_shardings)."""

    def init(key: jax.Array) -> TrainState:
        model = make_model(config, model_config, key, platform)
        _, trainable, frozen, _ = split_model(model, config)
        return new_state(config, tx, trainable, frozen, key)

    return init


def abstract_train_state(
    config: TrainConfig, model_config: Any, tx: optax.GradientTransformation, key: jax.Array,
    platform: str = "cpu",
) -> tuple[ModelDef, TrainState, TrainState]:
    """(model def, abstract TrainState of ShapeDtypeStructs, its PartitionSpecs), nothing
    allocated: what `init_fn_for` would build, for jitting with out_shardings or compiling for
    a target without its devices (`ibis-jax plan`)."""
    abstract_model = nnx.eval_shape(lambda: make_model(config, model_config, key, platform))
    graphdef, _, _, param_specs = split_model(abstract_model, config)
    model_def = ModelDef(graphdef, model_config, config.lora_rank, config.lora_alpha)
    abstract = jax.eval_shape(init_fn_for(config, model_config, tx, platform), key)
    return model_def, abstract, state_specs(abstract, param_specs, tx, config)
