"""The project's own programs (SFT step, GRPO update + old log-prob pass, sampler prefill +
decode), compiled for a target's compile-only devices from abstract state.

Nothing is allocated: the program is `train.program.build_program`'s, the trainers' own (the
model with the config's dtypes, remat policy, scanned layers and LoRA; the abstract train state
with its shardings; the jitted steps), batches are `ShapeDtypeStruct`s of the shapes the pipeline
/ GRPO batch builder / sampler would produce at the config's largest buckets, each with the
sharding the trainers give it. The step functions are the trainers' (`Program.train_step`,
`make_grpo_loss`, `Program.jit_logprobs` over `make_token_logprobs`, the sampler's
`_encode_images` / `_extend` / `_decode` on the decode state `empty_decode_state` builds),
never copies.

Per-device bytes: parameters, optimizer state and KV cache from the shard shapes of their
shardings; temporaries from XLA's `memory_analysis()`; total = arguments + outputs not aliased
to donated arguments + temporaries. FLOPs are counted analytically (`train.metrics.step_flops`:
XLA's cost analysis counts a `lax.scan` body once, not once per layer, and returns nothing for
GPUs); XLA's per-device count is kept alongside as `xla_flops_per_device`.
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ibis_jax.models import family
from ibis_jax.train import mesh as mesh_lib
from ibis_jax.train.mesh import with_shardings
from ibis_jax.train.config import TrainConfig
from ibis_jax.train.metrics import step_flops
from ibis_jax.train.optim import make_optimizer
from ibis_jax.train.program import Program, build_program

PLAN_TOTAL_STEPS = 1000  # the schedule's length when the config names none (it changes no shape)


class DoesNotFit(Exception):
    """XLA refused the program: RESOURCE_EXHAUSTED (needed / available bytes when it says)."""

    def __init__(self, stage: str, needed: int | None, available: int | None, message: str, lower_bound: bool = False):
        super().__init__(message)
        self.stage, self.needed, self.available, self.lower_bound = stage, needed, available, lower_bound


@dataclasses.dataclass
class StageResult:
    name: str
    devices: int
    mesh: dict[str, int]
    bytes: dict[str, int]  # params, optimizer, kv_cache, temp, total (per device)
    hbm_bytes: int
    flops_per_step: float  # analytic, all devices together
    compile_seconds: float
    fits: bool
    step_seconds: float = 0.0  # at the stated MFU (rollout decode: HBM roofline)
    xla_flops_per_device: float | None = None
    shapes: str = ""  # the batch the stage was compiled at, in words
    note: str = ""
    bound: dict[str, int] | None = None  # train stages: the analytic bound's parts (`plan.bound`), bytes per chip
    # rollout: the decode layout's mesh, the collective operand bytes per decoded token (per chip,
    # from the compiled decode loop) and the decode step at the HBM roofline (bytes read / bandwidth)
    decode_mesh: dict[str, int] | None = None
    decode_collective_bytes: int | None = None
    decode_collectives: dict[str, int] | None = None
    decode_roofline_seconds: float | None = None

    @property
    def bound_total(self) -> int | None:
        return None if self.bound is None else int(sum(self.bound.values()))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "fits": self.fits, "devices": self.devices, "mesh": self.mesh,
                "bytes": self.bytes, "hbm_bytes": self.hbm_bytes, "flops_per_step": self.flops_per_step,
                "compile_seconds": round(self.compile_seconds, 2), "step_seconds": self.step_seconds,
                "xla_flops_per_device": self.xla_flops_per_device, "shapes": self.shapes, "note": self.note,
                "analytic_bound_bytes": self.bound_total, "analytic_bound_parts": self.bound,
                "bound_ratio": None if not self.bound else round(self.bytes["total"] / self.bound_total, 3),
                "decode_mesh": self.decode_mesh, "decode_collective_bytes": self.decode_collective_bytes,
                "decode_collectives": self.decode_collectives,
                "decode_roofline_seconds": self.decode_roofline_seconds}


# ---------------------------------------------------------------------------- helpers
def shard_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
    return total


_SIZE = r"([\d.]+)\s*([KMGT])i?B?"
_UNIT = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_PATTERNS = (re.compile(r"Used\s+" + _SIZE + r"\s+of\s+" + _SIZE), re.compile(_SIZE + r"\)?\s+exceeds available HBM\s+\(?" + _SIZE))


def parse_exhausted(message: str) -> tuple[int | None, int | None]:
    """(needed, available) bytes from XLA's RESOURCE_EXHAUSTED text: 'Used 16.76G of 15.75G hbm'
    or 'HLO temporaries (16.76G) exceeds available HBM (15.75G)'; else the first size, None."""
    for pattern in _PATTERNS:
        m = pattern.search(message)
        if m:
            v1, u1, v2, u2 = m.groups()
            return int(float(v1) * _UNIT[u1]), int(float(v2) * _UNIT[u2])
    m = re.search(_SIZE, message)
    return (int(float(m.group(1)) * _UNIT[m.group(2)]) if m else None), None


def compile_program(stage: str, jitted: Callable, args: tuple, mesh, **kwargs):
    """(compiled, seconds); RESOURCE_EXHAUSTED -> DoesNotFit."""
    t0 = time.perf_counter()
    try:
        with jax.set_mesh(mesh):
            compiled = jitted.lower(*args, **kwargs).compile()
    except Exception as e:  # XlaRuntimeError / JaxRuntimeError, by text
        text = str(e)
        if "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text or "exceeds available" in text:
            needed, available = parse_exhausted(text.split("RESOURCE_EXHAUSTED", 1)[-1])
            raise DoesNotFit(stage, needed, available, text.strip().splitlines()[0][:300]) from None
        raise
    return compiled, time.perf_counter() - t0


def memory(compiled) -> dict[str, int]:
    m = compiled.memory_analysis()
    arg, out, alias, temp = (int(getattr(m, f"{k}_size_in_bytes", 0) or 0)
                             for k in ("argument", "output", "alias", "temp"))
    return {"argument": arg, "output": out, "alias": alias, "temp": temp, "peak": arg + out - alias + temp}


def xla_flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def forward_flops(cfg: Any, *, tokens: float, seq_len: int, sequences: float, patches: float,
                  image_size: int) -> float:
    """Forward-only FLOPs, from `step_flops` (train = 3 x text + 1 or 3 x tower + 3 x merger)."""
    kw = dict(seq_len=seq_len, image_size=image_size)
    text = step_flops(cfg, tokens=tokens, sequences=sequences, patches=0, freeze_vision=True, **kw) / 3
    frozen = step_flops(cfg, tokens=0, sequences=0, patches=patches, freeze_vision=True, **kw)  # V + 3M
    trained = step_flops(cfg, tokens=0, sequences=0, patches=patches, freeze_vision=False, **kw)  # 3V + 3M
    tower = (trained - frozen) / 2
    merger = (frozen - tower) / 3
    return text + tower + merger


def analytic_param_count(cfg: Any) -> int:
    """Parameters of Qwen2.5-VL or Qwen3-VL from its config (language model, vision tower, mergers).

    Qwen2.5-VL: q/k/v biases, RMSNorm vision blocks with a gated MLP, one merger. Qwen3-VL: per-head
    q/k RMSNorms instead of the biases, LayerNorm blocks with a two-layer MLP, a patch bias, the
    position table, and a DeepStack merger per tap (its LayerNorm over the 4 merged patches)."""
    t, v = cfg.text, cfg.vision
    d, f, q, k = t.hidden_size, t.intermediate_size, t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    extra = 2 * t.head_dim if t.qk_norm else q + 2 * k  # q/k norms, or q/k/v biases
    layer = d * q + 2 * d * k + q * d + 3 * d * f + 2 * d + extra
    lm = t.vocab_size * d * (1 if cfg.tie_word_embeddings else 2) + t.num_hidden_layers * layer + d
    e, fv, out = v.hidden_size, v.intermediate_size, v.out_hidden_size
    m = e * v.spatial_merge_size**2
    mlp = m * m + m + m * out + out  # fc1 + fc2 of a merger
    attn = 3 * e * e + 3 * e + e * e + e
    taps = getattr(v, "deepstack_visual_indexes", None)
    if taps is None:  # Qwen2.5-VL
        block = attn + 2 * e * fv + 2 * fv + fv * e + e + 2 * e
        return lm + v.patch_dim * e + v.depth * block + e + mlp
    block = attn + e * fv + fv + fv * e + e + 4 * e
    vision = v.patch_dim * e + e + v.num_position_embeddings * e + v.depth * block
    return lm + vision + 2 * e + mlp + len(taps) * (2 * m + mlp)


def _images_layout(cfg: Any, images: int, image_size: int, accum: int | None):
    side = image_size // cfg.vision.patch_size
    grid = np.tile(np.asarray([[1, side, side]], np.int64), (images, 1))
    lay = family(cfg).module.vision_layout(grid, cfg.vision, per_image=True)  # as the trainers lay their images out
    lead = () if accum is None else (accum,)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(lead + x.shape, x.dtype), lay), images * side * side


def _struct(shape, dtype):
    return jax.ShapeDtypeStruct(tuple(int(s) for s in shape), jnp.dtype(dtype))


# ---------------------------------------------------------------------------- train state
@dataclasses.dataclass
class TrainSetup:
    program: Program

    @property
    def state(self):
        return self.program.abstract

    def bytes(self) -> tuple[int, int, int]:
        """(trainable params, frozen params, optimizer state) per device."""
        st = self.state
        return shard_bytes(st.params), shard_bytes(st.frozen), shard_bytes(st.opt_state)

    def check_resident(self, stage: str, hbm: int) -> None:
        """Before compiling: the state plus the step's fp32 gradient sum alone must fit (raises
        DoesNotFit with that lower bound, so a hopeless target costs no compile)."""
        trainable, frozen, opt = self.bytes()
        grads = shard_bytes(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32, sharding=x.sharding),
                                         self.state.params))
        need = trainable + frozen + opt + grads
        if need > hbm:
            raise DoesNotFit(stage, need, hbm, "state + fp32 gradients exceed HBM", lower_bound=True)


def train_setup(config: TrainConfig, model_config: Any, mesh, rl=None) -> TrainSetup:
    """The trainer's program: SFT's optimizer, or with `rl` the GRPO trainer's (its schedule).
    The schedule's length changes no shape; the config's own (max_steps) when it names one, so
    the program is the trainer's constant for constant."""
    if rl is not None:
        from ibis_jax.rl.trainer import grpo_optimizer

        tx, schedule = grpo_optimizer(config, rl)
    else:
        tx, schedule = make_optimizer(config, config.max_steps or PLAN_TOTAL_STEPS)
    return TrainSetup(build_program(config, model_config, mesh, tx, schedule))


def _bound(setup: TrainSetup, config: TrainConfig, model_config: Any, mesh, *, tokens: int, rows: int,
           seq: int, images: int) -> dict[str, int]:
    from ibis_jax.models.attention import resolve_backend
    from ibis_jax.plan.bound import batch_ways, train_step_bound
    from ibis_jax.train.state import platform_of

    trainable, frozen, opt = setup.bytes()
    grads = shard_bytes(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32, sharding=x.sharding),
                                     setup.state.params))
    backend = resolve_backend(config.attention, platform_of(mesh))
    return train_step_bound(
        model_config, resident=trainable + frozen + opt, gradients=grads, tokens=tokens, rows=rows, seq=seq,
        batch_ways=batch_ways(dict(mesh.shape)), images=images, image_size=config.image_size,
        compute_bytes=jnp.dtype(config.compute_dtype).itemsize, fused_attention=backend != "xla",
        freeze_vision=config.freeze_vision, mlp_chunk=config.mlp_chunk,
        images_at_once=getattr(family(model_config).model_class.vision_tower, "IMAGES_AT_ONCE", images)).parts


def _sharded_batch(batch: dict, mesh) -> tuple[dict, Any]:
    shardings = mesh_lib.named(mesh, mesh_lib.batch_specs(batch, mesh))
    return with_shardings(batch, shardings), shardings


def _step_seconds(flops: float, devices: int, peak: float, mfu: float) -> float:
    return flops / (devices * peak * mfu)


# ---------------------------------------------------------------------------- SFT
def sft_batch(config: TrainConfig, model_config: Any, mesh) -> tuple[dict, Any, int, int]:
    """(the SFT batch at the largest bucket as sharded ShapeDtypeStructs, its shardings, patches,
    images per micro-batch): what the pipeline feeds the trainer's step."""
    from ibis_jax.train.sft import image_dtype

    a, b, s = config.grad_accum, config.micro_batch, max(config.seq_buckets)
    images = b * config.max_images_per_sample
    layout, patches = _images_layout(model_config, images, config.image_size, a)
    batch = {
        "input_ids": _struct((a, b, s), jnp.int32), "attention_mask": _struct((a, b, s), jnp.int32),
        "targets": _struct((a, b, s), jnp.int32), "weights": _struct((a, b, s), jnp.float32),
        "action_mask": _struct((a, b, s), jnp.float32),
        "pixel_values": _struct((a, patches, model_config.vision.patch_dim), image_dtype(config)),
        "image_grid_thw": _struct((a, images, 3), jnp.int32), "vision_layout": layout,
    }
    batch, batch_shardings = _sharded_batch(batch, mesh)
    return batch, batch_shardings, patches, images


def sft_stage(config: TrainConfig, model_config: Any, mesh, hbm: int, peak: float, mfu: float) -> StageResult:
    from ibis_jax.train.loss import LOSSES

    setup = train_setup(config, model_config, mesh)
    setup.check_resident("sft", hbm)
    a, b, s = config.grad_accum, config.micro_batch, max(config.seq_buckets)
    batch, batch_shardings, patches, images = sft_batch(config, model_config, mesh)
    step = setup.program.train_step(LOSSES["sft"], batch_shardings)
    compiled, seconds = compile_program("sft", step.jitted, (setup.state, batch), mesh)
    mem = memory(compiled)
    trainable, frozen, opt = setup.bytes()
    flops = step_flops(model_config, tokens=a * b * s, seq_len=s, sequences=a * b, patches=a * patches,
                       freeze_vision=config.freeze_vision, image_size=config.image_size)
    return StageResult(
        "sft", mesh.size, dict(mesh.shape),
        {"params": trainable + frozen, "optimizer": opt, "kv_cache": 0, "temp": mem["temp"], "total": mem["peak"]},
        hbm, flops, seconds, mem["peak"] <= hbm, _step_seconds(flops, mesh.size, peak, mfu), xla_flops(compiled),
        f"{a} x {b} x {s} tokens, {images} images of {config.image_size}px per micro-batch",
        bound=_bound(setup, config, model_config, mesh, tokens=b * s, rows=b, seq=s, images=images),
    )


# ---------------------------------------------------------------------------- GRPO
def grpo_rows(rl) -> int:
    """Rows of the GRPO update at its worst: every episode runs max_turns policy turns."""
    from ibis_jax.rl.batch import row_bucket

    return row_bucket(rl.prompts_per_step * rl.grpo.group_size * rl.max_turns)


def grpo_batch(config: TrainConfig, rl, model_config: Any) -> tuple[dict, int, int]:
    """(the GRPO update batch at its worst as ShapeDtypeStructs, patches, images): every
    episode runs max_turns policy turns, one micro-batch, the largest sequence bucket."""
    from ibis_jax.train.sft import image_dtype

    r, s = grpo_rows(rl), max(rl.seq_buckets)
    images = r * (1 if rl.history == "none" else rl.max_turns)
    layout, patches = _images_layout(model_config, images, config.image_size, 1)
    batch = {
        "input_ids": _struct((1, r, s), jnp.int32), "attention_mask": _struct((1, r, s), jnp.int32),
        "targets": _struct((1, r, s), jnp.int32), "loss_mask": _struct((1, r, s), jnp.float32),
        "advantages": _struct((1, r), jnp.float32), "row_weights": _struct((1, r), jnp.float32),
        "pixel_values": _struct((1, patches, model_config.vision.patch_dim), image_dtype(config)),
        "image_grid_thw": _struct((1, images, 3), jnp.int32), "vision_layout": layout,
    }
    return batch, patches, images


def grpo_stage(config: TrainConfig, rl, model_config: Any, mesh, hbm: int, peak: float, mfu: float) -> StageResult:
    from ibis_jax.rl.loss import make_grpo_loss, make_token_logprobs

    setup = train_setup(config, model_config, mesh, rl)
    setup.check_resident("grpo", hbm)
    r, s = grpo_rows(rl), max(rl.seq_buckets)
    batch, patches, images = grpo_batch(config, rl, model_config)
    suppressed = model_config.multimodal_token_ids
    # As the trainer: a separate old (or reference) log-prob pass only when a rollout batch feeds
    # several updates or a KL term; with one update the loss holds its own log-probs as pi_old.
    separate_pass = rl.grpo.updates_per_batch > 1 or rl.grpo.beta > 0
    programs_ = []
    if separate_pass:
        old_batch, old_shardings = _sharded_batch(batch, mesh)
        old_fn = setup.program.jit_logprobs(make_token_logprobs(setup.program.model_def, rl.temperature, suppressed),
                                            old_shardings)
        programs_.append(compile_program("grpo (old log-probs)", old_fn,
                                         (setup.state.params, setup.state.frozen, old_batch), mesh))
    # the update: the shared train step with the grpo loss
    extra = {("old_logprobs" if rl.grpo.updates_per_batch > 1 else "sampler_logprobs"): _struct((1, r, s), jnp.float32)}
    if rl.grpo.beta > 0:
        extra["ref_logprobs"] = _struct((1, r, s), jnp.float32)
    full, full_shardings = _sharded_batch({**batch, **extra}, mesh)
    loss = make_grpo_loss(rl.grpo, temperature=rl.temperature, suppressed=suppressed)
    step = setup.program.train_step(loss, full_shardings)
    programs_.insert(0, compile_program("grpo", step.jitted, (setup.state, full), mesh))
    mems = [memory(c) for c, _ in programs_]
    seconds = sum(t for _, t in programs_)
    trainable, frozen, opt = setup.bytes()
    kw = dict(tokens=r * s, seq_len=s, sequences=r, patches=patches, image_size=config.image_size)
    update = step_flops(model_config, freeze_vision=config.freeze_vision, **kw)
    forward = forward_flops(model_config, **kw) if separate_pass else 0.0
    xf = [xla_flops(c) for c, _ in programs_]
    peak_bytes = max(m["peak"] for m in mems)
    return StageResult(
        "grpo", mesh.size, dict(mesh.shape),
        {"params": trainable + frozen, "optimizer": opt, "kv_cache": 0, "temp": max(m["temp"] for m in mems),
         "total": peak_bytes},
        hbm, update + forward, seconds, peak_bytes <= hbm,
        _step_seconds(update + forward, mesh.size, peak, mfu), None if None in xf else sum(xf),
        f"{r} turn rows x {s} tokens ({rl.prompts_per_step} prompts x G={rl.grpo.group_size} x "
        f"{rl.max_turns} turns, one micro-batch as the trainer runs it)",
        ("update + old log-prob pass" if separate_pass else "update (pi_old = its own log-probs: one update per "
         "rollout batch)") + "; the rollouts are the rollout stage",
        bound=_bound(setup, config, model_config, mesh, tokens=r * s, rows=r, seq=s, images=images),
    )


# ---------------------------------------------------------------------------- rollout
def rollout_shapes(rl) -> tuple[int, int, int]:
    """(batch rows, prefill chunk, cache slots) of one rollout turn at the sampler's buckets: all
    episodes of a step decode together; the prompt is what the update's largest sequence bucket
    leaves after max_new_tokens, and the cache holds prompt + max_new_tokens."""
    from ibis_jax.generate.sampler import SamplerConfig, bucket

    sc = SamplerConfig()
    b = bucket(rl.prompts_per_step * rl.grpo.group_size, sc.batch_buckets)
    room = max(rl.seq_buckets) - rl.max_new_tokens
    fitting = [c for c in sc.chunk_buckets if c <= room]
    chunk = max(fitting) if fitting else min(sc.chunk_buckets)
    return b, chunk, bucket(chunk + rl.max_new_tokens, sc.cache_buckets)


def decode_program(program: Program, rl, hbm: int | None = None):
    """(decode mesh, abstract merged parameters on it): the layout the GRPO trainer reshards its
    policy into before a step's rollouts (`rl.rollout_layout`, `rl.rollout_layout` module),
    from the program's abstract state; hbm: the chip's (None: unknown, `auto` is replicated)."""
    from ibis_jax.rl import rollout_layout

    config, model_def, state = program.config, program.model_def, program.abstract
    compute = jnp.dtype(config.compute_dtype)
    merged = model_def.abstract_params(state.params, state.frozen)
    resident = shard_bytes(state)
    budget = None if hbm is None else rollout_layout.chip_budget(resident, hbm)
    dmesh = rollout_layout.decode_mesh(program.mesh, rl.rollout_layout, model_def.config.text.num_key_value_heads,
                                       rollout_layout.tree_bytes(merged, compute), budget)
    specs = rollout_layout.decode_specs(model_def.abstract_params(program.shardings.params, program.shardings.frozen))
    cast = lambda a: compute if jnp.issubdtype(a.dtype, jnp.floating) else a.dtype
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, cast(a), sharding=NamedSharding(dmesh, s)),
                          merged, specs)
    return dmesh, nnx.State(params)


def rollout_stage(config: TrainConfig, rl, model_config: Any, mesh, hbm: int, peak: float, mfu: float,
                  hbm_bandwidth: float) -> StageResult:
    from ibis_jax.generate import sampler as sampler_lib
    from ibis_jax.plan.hlo import loop_collectives

    setup = train_setup(config, model_config, mesh, rl)  # resident during rollouts
    program = setup.program
    key = jax.random.key(config.seed)
    # The policy the trainer samples with: the merged parameters resharded into the decode layout.
    graphdef = program.model_def.graphdef
    dmesh, params = decode_program(program, rl, hbm)
    t = model_config.text
    b, chunk, slots = rollout_shapes(rl)
    spec = sampler_lib.cache_spec(dmesh, t.num_key_value_heads, b)
    rep = NamedSharding(dmesh, P())
    compute = jnp.dtype(config.compute_dtype)
    # On a TPU / GPU the sampler decodes with the model's own (stacked) kernels and a cache
    # stacked like them; the packed-weight path is the CPU's (`Sampler.stacked_cache`).
    decode_state = sampler_lib.empty_decode_state(t, compute, b, slots, stacked=config.scan_layers, mesh=dmesh,
                                                  spec=spec, abstract=True)
    rs = lambda shape, dt: jax.ShapeDtypeStruct(shape, jnp.dtype(dt), sharding=rep)
    # 1. the vision tower on every episode's observation
    layout, patches = _images_layout(model_config, b, config.image_size, None)
    layout = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), layout)
    enc, enc_s = compile_program("rollout (vision)", sampler_lib._encode_images, (graphdef, params,
                                 rs((patches, model_config.vision.patch_dim), jnp.float32), layout), dmesh)
    feats = sampler_lib.bucket(patches // model_config.vision.spatial_merge_size**2, sampler_lib.SamplerConfig().visual_buckets)
    # 2. prefill: the prompt chunk into the cache
    taps = len(getattr(model_config.vision, "deepstack_visual_indexes", ()))  # Qwen3-VL's DeepStack features
    pre, pre_s = compile_program(
        "rollout (prefill)", sampler_lib._extend,
        (graphdef, params, None, decode_state, rs((b, chunk), jnp.int32), rs((b, chunk), jnp.bool_),
         rs((3, b, chunk), jnp.int32), rs((b,), jnp.int32), rs((feats, t.hidden_size), compute)), dmesh,
        cache_spec=spec, deepstack=rs((taps, feats, t.hidden_size), compute) if taps else None)
    # 3. decode: the sampler's while loop (its body is one token step)
    cfg = sampler_lib.SamplerConfig(max_new_tokens=rl.max_new_tokens, temperature=rl.temperature,
                                    suppress_token_ids=model_config.multimodal_token_ids)
    key_struct = jax.ShapeDtypeStruct((), key.dtype, sharding=rep)
    dec, dec_s = compile_program(
        "rollout (decode)", sampler_lib._decode,
        (graphdef, params, None, decode_state, key_struct, rs((b,), jnp.bool_), rs((16, t.vocab_size), jnp.int32),
         rs((2,), jnp.int32)), dmesh, cfg=cfg, cache_spec=spec)
    moved = loop_collectives(dec.as_text())  # per decoded token, per chip
    mems = [memory(c) for c in (enc, pre, dec)]
    param_bytes, cache_bytes = shard_bytes(params), shard_bytes(decode_state.k) * 2
    trainable, frozen, opt = setup.bytes()
    # Resident besides the sampler's arguments: the train state (the sampler reads a resharded copy).
    extra_params = trainable + frozen
    peak_prog = max(m["peak"] for m in mems)
    total = peak_prog + opt + extra_params
    prefill = forward_flops(model_config, tokens=b * chunk, seq_len=chunk, sequences=b, patches=patches,
                            image_size=config.image_size)
    d, hq = t.hidden_size, t.num_attention_heads * t.head_dim
    per_layer = d * hq * 2 + d * t.num_key_value_heads * t.head_dim * 2 + 3 * d * t.intermediate_size
    per_token = 2 * (t.num_hidden_layers * per_layer + d * t.vocab_size) * b + 4 * t.num_hidden_layers * hq * slots * b
    flops = prefill + rl.max_new_tokens * per_token
    roofline = (param_bytes + cache_bytes) / hbm_bandwidth  # a decode step reads every weight and the cache
    token_s = max(per_token / (dmesh.size * peak * mfu), roofline)
    seconds = prefill / (dmesh.size * peak * mfu) + rl.max_new_tokens * token_s
    xf = [xla_flops(c) for c in (enc, pre, dec)]
    return StageResult(
        "rollout", mesh.size, dict(mesh.shape),
        {"params": param_bytes + extra_params, "optimizer": opt, "kv_cache": cache_bytes,
         "temp": max(m["temp"] for m in mems), "total": total},
        hbm, flops, enc_s + pre_s + dec_s, total <= hbm, seconds, None if None in xf else sum(xf),
        f"{b} episodes, prefill chunk {chunk}, cache {slots} slots, {rl.max_new_tokens} new tokens (one turn)",
        f"one turn on the decode mesh {dict(dmesh.shape)} (rl.rollout_layout={rl.rollout_layout}): vision + "
        "prefill at the MFU, decode tokens at max(MFU, HBM roofline of params + cache); the train state stays "
        "resident beside the decode copy",
        decode_mesh=dict(dmesh.shape), decode_collective_bytes=moved.total_bytes, decode_collectives=moved.bytes,
        decode_roofline_seconds=roofline,
    )


def lora_or_full(config: TrainConfig) -> str:
    return f"LoRA r{config.lora_rank}" if config.lora_rank else "full"


__all__ = ["DoesNotFit", "StageResult", "sft_stage", "grpo_stage", "rollout_stage", "analytic_param_count",
           "parse_exhausted", "rollout_shapes", "grpo_rows", "decode_program"]
