"""Agentic GRPO (SPEC section 5): one linear ``train_grpo``.

Sections: mesh, model + optimizer (SFT's), init (an HF dir, e.g. the SFT export) or restore,
the update step (SFT's ``make_train_step`` with the ``grpo`` loss), and the loop. Each step:

1. rollouts: ``prompts_per_step`` samples x ``group_size`` episodes, run together through the
   agent loop with the current policy and the tool (multi-turn, tool in the loop);
2. rewards: the configured per-step rewards, aggregated per trajectory (``ibis_jax.rl.rewards``);
3. advantages: normalised within each prompt's group;
4. batch: one sequence per policy turn, the sampler's own ids, loss only on them;
5. old log-probs recomputed under the parameters that sampled (the ratio's denominator);
6. the jitted update; metrics per reward component, IoU, steps, parse failures, clip fraction,
   ratio, KL, entropy and seconds per phase, as JSONL + TensorBoard.

The final policy is exported as an HF directory to ``WORKDIR/hf`` (``config.export_hf``), with
``rl.export_every`` also to ``WORKDIR/exports/step_N``. Checkpoints (Orbax, SFT's
``Checkpointer``) hold the state and the step; prompts are drawn by
step index, so a resumed run continues with the same prompts.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ibis_jax.agent.settings import AGENT_FILE, AgentSettings, load_agent_settings
from ibis_jax.agent.episode import Episode, EpisodeConfig
from ibis_jax.agent.loop import Policy, episode_messages, run_agent
from ibis_jax.data.queries import sample_query
from ibis_jax.data.sources.base import Sample
from ibis_jax.models.qwen2_5_vl import load_hf
from ibis_jax.models.qwen2_5_vl.processor import Qwen25VLProcessor, eos_token_ids
from ibis_jax.rl.batch import TurnExample, build_grpo_batch, row_bucket, row_multiple, trajectory_tokens
from ibis_jax.rl.grpo import GRPOConfig, compute_advantages, minibatch_indices, nonzero_variance_groups
from ibis_jax.rl.loss import make_grpo_loss, make_token_logprobs
from ibis_jax.rl.rewards import PAPER_REWARDS, RewardConfig, RewardContext, score_episode
from ibis_jax.tools.auto import assign_episode
from ibis_jax.tools.protocol import SegmentationTool
from ibis_jax.train import core
from ibis_jax.train import lora as lora_lib
from ibis_jax.train import mesh as mesh_lib
from ibis_jax.train.checkpoint import Checkpointer, abstract_with_shardings, export_hf
from ibis_jax.train.config import TrainConfig, to_dict
from ibis_jax.train.metrics import MetricsWriter
from ibis_jax.train.optim import make_optimizer
from ibis_jax.train.sft import to_global, with_vision_layout
from ibis_jax.train.state import ModelDef, TrainState, split_model, state_specs
from ibis_jax.train.step import jit_train_step, make_train_step

log = logging.getLogger(__name__)

# (model, processor, rl config, seed, agent settings) -> a Policy that samples with the model's
# current parameters; the trainer passes a different seed every step (the same one on a resumed
# step) and the settings the model was trained with (system prompt, image size, overlay).
PolicyFactory = Callable[[Any, Qwen25VLProcessor, "RLConfig", int, AgentSettings], Policy]


@dataclasses.dataclass(frozen=True)
class RLConfig:
    steps: int = 10
    prompts_per_step: int = 2
    max_turns: int = 6  # actions per episode (the episode's max_actions)
    history: str = "none"
    rewards: tuple[str, ...] = PAPER_REWARDS
    reward: RewardConfig = RewardConfig()
    grpo: GRPOConfig = GRPOConfig()
    temperature: float = 1.0
    max_new_tokens: int = 96
    seq_buckets: tuple[int, ...] = (1024, 2048)
    query_style: str | None = "direct"  # first-turn query style; None: drawn per prompt as in synthesis
    seed: int = 0
    # learning rate (TrainConfig.lr): "constant" (the paper's RL) after `warmup_steps` of linear
    # warmup, or "cosine" = SFT's warmup-cosine over the run's updates (warmup_frac, end_lr_frac)
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    export_every: int = 0  # > 0: also export the policy every N steps to WORKDIR/exports/step_N


def grpo_schedule(config: TrainConfig, rl: RLConfig, total_updates: int | None = None):
    """The learning-rate schedule `rl.lr_schedule` names (at `config.lr`), over `total_updates`
    optimizer updates (default `rl.steps`; several updates per rollout batch count each)."""
    from ibis_jax.train.optim import constant_schedule, make_schedule

    if rl.lr_schedule == "constant":
        return constant_schedule(config.lr, rl.warmup_steps)
    if rl.lr_schedule == "cosine":
        return make_schedule(config, total_updates or rl.steps)
    raise ValueError(f"rl.lr_schedule {rl.lr_schedule!r}: use constant or cosine")


def default_policy_factory(model, processor, rl: RLConfig, seed: int, settings: AgentSettings) -> Policy:
    from ibis_jax.generate.policy import ModelPolicy  # the KV-cache sampler (issue 5)

    return ModelPolicy.for_rollouts(model, processor, temperature=rl.temperature,
                                    max_new_tokens=rl.max_new_tokens, seed=seed, settings=settings)


def rollout_seed(rl: RLConfig, step: int) -> int:
    """The sampling seed of a step: distinct per step and run seed, so no two steps draw the same
    random stream (a fresh policy per step with one fixed seed would replay the same keys)."""
    return int(np.random.SeedSequence([rl.seed, step]).generate_state(1)[0])


def _turn_examples(episodes: Sequence[Episode], traces, advantages: np.ndarray, history: str,
                   system_prompt: str) -> list[TurnExample]:
    examples = []
    for index, (episode, trace, adv) in enumerate(zip(episodes, traces, advantages)):
        for t, turn in enumerate(trace.turns):
            messages = episode_messages(episode, trace, t, history=history, system_prompt=system_prompt)
            examples.append(TurnExample(messages, turn, float(adv), trajectory=index))
    return examples


def resolve_grpo(rl: RLConfig) -> GRPOConfig:
    """The GRPO config with its run-dependent defaults filled in (dr_grpo's constant: the token
    budget of a trajectory, ``max_new_tokens * max_turns``)."""
    if rl.grpo.dr_grpo_norm > 0:
        return rl.grpo
    return dataclasses.replace(rl.grpo, dr_grpo_norm=float(rl.max_new_tokens * rl.max_turns))


def mean_update_metrics(per_update: Sequence[dict[str, float]]) -> dict[str, float]:
    """Several optimizer updates per rollout batch: the mean of each metric over them, plus the
    last update's clip fraction and ratio deviation (the first update's are 0 by construction)."""
    out = {k: float(np.mean([m[k] for m in per_update])) for k in per_update[0]}
    for k in ("clip_fraction", "ratio_abs_dev", "kl"):
        if k in per_update[-1]:
            out[f"{k}_last"] = per_update[-1][k]
    out["updates"] = float(len(per_update))
    return out


def rollout_metrics(episodes: Sequence[Episode], scores) -> dict[str, float]:
    out: dict[str, float] = {"reward": float(np.mean([s.score for s in scores]))}
    for name in scores[0].components:
        out[f"reward/{name}"] = float(np.mean([s.components[name].mean() for s in scores]))
    out["iou"] = float(np.mean([e.ious[-1] for e in episodes]))
    out["steps_per_episode"] = float(np.mean([len(e.steps) for e in episodes]))
    out["parse_failure_rate"] = float(np.mean([e.end_reason == "parse_error" for e in episodes]))
    out["terminated_rate"] = float(np.mean([e.end_reason == "terminate" for e in episodes]))
    return out


def train_grpo(
    config: TrainConfig,
    rl: RLConfig,
    samples: Sequence[Sample],
    tool: SegmentationTool,
    workdir: str,
    *,
    init_dir: str,
    policy_factory: PolicyFactory = default_policy_factory,
    hooks: Sequence[Callable[[int, dict[str, float]], None]] = (),
) -> dict[str, Any]:
    """Runs ``rl.steps`` GRPO steps from the HF dir ``init_dir`` (resuming from ``workdir``)."""
    if not samples:
        raise ValueError("GRPO needs at least one prompt sample")
    core.init_distributed()  # no-op when the command did it or alone
    if jax.process_count() > 1:
        raise NotImplementedError("GRPO on several processes is not supported yet (rollouts are not yet spread "
                                  "over processes); run it as one process over all local devices")
    os.makedirs(workdir, exist_ok=True)
    # The conversation the model was trained with: its directory's record must agree with the config.
    settings = dataclasses.replace(AgentSettings.from_train_config(config), history=rl.history)
    if os.path.exists(os.path.join(init_dir, AGENT_FILE)):
        recorded = load_agent_settings(init_dir)
        for field in ("system_prompt", "image_size", "overlay_color", "overlay_alpha"):
            want, have = getattr(recorded, field), getattr(settings, field)
            if want != have:
                raise ValueError(f"{init_dir} was trained with {field}={want!r} ({AGENT_FILE}) but the config says "
                                 f"{field}={have!r}; set the config to {want!r}")
    prompt_text = settings.system_text
    # ---------------------------------------------------------------- mesh, model, optimizer
    mesh = mesh_lib.make_mesh(config.mesh_shape)
    grpo = resolve_grpo(rl)
    tx, schedule = make_optimizer(config, rl.steps * grpo.updates_per_batch,
                                  grpo_schedule(config, rl, rl.steps * grpo.updates_per_batch))
    model = load_hf(init_dir, mesh=mesh, freeze_vision=config.freeze_vision)  # each tensor placed sharded
    processor = Qwen25VLProcessor(config.tokenizer_dir or init_dir)
    graphdef, trainable, frozen, param_specs = split_model(model, config)
    model_def = ModelDef(graphdef, model.config, config.lora_rank, config.lora_alpha)
    del model
    key = jax.random.key(config.seed)

    def from_loaded(trainable, frozen, key):
        if config.lora_rank:
            trainable = lora_lib.init_lora(frozen, config.lora_targets, config.lora_rank, jax.random.fold_in(key, 1))
        return TrainState(jnp.zeros((), jnp.int32), trainable, frozen, tx.init(trainable))

    abstract = jax.eval_shape(from_loaded, trainable, frozen, key)
    shardings = mesh_lib.named(mesh, state_specs(abstract, param_specs, tx, config))
    state = jax.jit(from_loaded, out_shardings=shardings)(trainable, frozen, key)  # optimizer state born sharded
    del trainable, frozen
    # The frozen initial policy for the KL penalty: a copy (the update donates the state's buffers),
    # taken before any restore, so a resumed run keeps the same reference.
    ref_params = jax.tree.map(jnp.copy, state.params) if grpo.beta > 0 else None
    # ---------------------------------------------------------------- restore
    ckpt = Checkpointer(workdir, config.keep_checkpoints)
    start = 0
    restored = ckpt.restore_latest(abstract_with_shardings(abstract, shardings))  # logs "resumed from step N"
    if restored is not None:
        state, _, _, start = restored
    # ---------------------------------------------------------------- the update step
    # The default policy never samples the multimodal placeholders (ModelPolicy); the loss scores
    # rollouts under the same distribution.
    suppressed = model_def.config.multimodal_token_ids
    train_step = make_train_step(model_def, make_grpo_loss(grpo, temperature=rl.temperature, suppressed=suppressed),
                                 tx, schedule)
    step_fns: dict = {}
    layout_cache: dict = {}

    token_logprobs = make_token_logprobs(model_def, rl.temperature, suppressed)

    def export(state, directory: str) -> None:
        """The policy as an HF directory with the agent settings SFT writes (``ibis_agent.json``)."""
        export_hf(model_def, state, directory, source_dir=config.tokenizer_dir or init_dir, settings=settings)
        log.info("exported the GRPO policy to %s", directory)

    # ---------------------------------------------------------------- the loop
    writer = MetricsWriter(workdir, start_step=start)
    preemption = core.Preemption()  # SIGTERM: finish the step, checkpoint, exit
    export_dir = None
    stopped = False
    eos_ids = eos_token_ids(processor.tokenizer, model_def.config.text)
    pad_to = row_multiple(mesh.shape["data"] * mesh.shape["fsdp"])  # rows: multiples of the batch divisor
    episode_config = EpisodeConfig(max_actions=rl.max_turns)
    summary: dict[str, Any] = {}
    try:
        for step in range(start, rl.steps):
            # The model's activation constraints name mesh axes: every forward runs under the mesh.
            with jax.set_mesh(mesh):
                times: dict[str, float] = {}
                t0 = time.perf_counter()
                policy = policy_factory(model_def.build(state.params, state.frozen), processor, rl,
                                        rollout_seed(rl, step), settings)
                picked = [samples[(step * rl.prompts_per_step + i) % len(samples)] for i in range(rl.prompts_per_step)]
                episodes = [
                    Episode(s.image, sample_query(s, rl.query_style, rl.seed), s.mask, config=episode_config,
                            episode_id=f"grpo-{step}-{i}-{g}")
                    for i, s in enumerate(picked) for g in range(rl.grpo.group_size)
                ]
                for sample, episode in zip([s for s in picked for _ in range(rl.grpo.group_size)], episodes):
                    assign_episode(tool, episode.episode_id, sample.modality, sample.target)  # `auto`: its preset
                traces = run_agent(policy, tool, episodes, history=rl.history, system_prompt=prompt_text)
                times["time/rollout_s"] = time.perf_counter() - t0
                times["time/generation_s"] = sum(t.generate_seconds for t in traces)
                times["time/tool_s"] = sum(s.tool_seconds for e in episodes for s in e.steps)
                scores = [score_episode(e, rl.rewards, RewardContext(rl.reward, stop_reasons=tuple(
                    t.stop_reason for t in trace.turns))) for e, trace in zip(episodes, traces)]
                score_values = np.asarray([s.score for s in scores], np.float32)
                advantages = np.asarray(compute_advantages(score_values, grpo))
                spread = nonzero_variance_groups(score_values, grpo.group_size)
                keep = spread if grpo.skip_zero_variance else np.ones(len(episodes), bool)
                examples = [ex for ex in _turn_examples(episodes, traces, advantages, rl.history, prompt_text)
                            if keep[ex.trajectory]]
                update_metrics: list[dict[str, float]] = []
                drift = 0.0
                if examples:
                    # Mini-batches of turns, fixed for this rollout batch, each cut into grad_accum
                    # micro-batches; old (and reference) log-probs once, sharded, before any update;
                    # then num_iterations passes over them.
                    counts = trajectory_tokens(examples)
                    minis = []
                    t1 = time.perf_counter()
                    for part in minibatch_indices(len(examples), grpo.mini_batches, rollout_seed(rl, step)):
                        arrays, sampler_lp = micro_batches([examples[i] for i in part], processor, rl.seq_buckets,
                                                           config.grad_accum, eos_ids, config.image_size, counts,
                                                           pad_to)
                        arrays = with_vision_layout(arrays, model_def.config.vision, layout_cache)
                        shape_key = tuple((k, np.shape(v)) for k, v in arrays.items() if hasattr(v, "shape"))
                        if shape_key not in step_fns:
                            batch_shardings = mesh_lib.named(mesh, mesh_lib.batch_specs(arrays, mesh))
                            lp_fn = jax.jit(token_logprobs,
                                            in_shardings=(shardings.params, shardings.frozen, batch_shardings),
                                            out_shardings=batch_shardings["targets"])
                            extra = {"old_logprobs": batch_shardings["targets"]}
                            if ref_params is not None:
                                extra["ref_logprobs"] = batch_shardings["targets"]
                            step_shardings = {**batch_shardings, **extra}
                            step_fns[shape_key] = (jit_train_step(train_step, shardings, step_shardings, mesh), lp_fn,
                                                   batch_shardings)
                        step_fn, lp_fn, batch_shardings = step_fns[shape_key]
                        global_batch = to_global(arrays, batch_shardings)
                        global_batch["old_logprobs"] = lp_fn(state.params, state.frozen, global_batch)
                        if ref_params is not None:
                            global_batch["ref_logprobs"] = lp_fn(ref_params, state.frozen, global_batch)
                        old_lp = core.host_global(global_batch["old_logprobs"])
                        drift = max(drift, float(np.abs((old_lp - sampler_lp) * arrays["loss_mask"]).max()))
                        minis.append((step_fn, global_batch, int(arrays["input_ids"].shape[0])))
                    times["time/old_logprobs_s"] = time.perf_counter() - t1
                    t2 = time.perf_counter()
                    order_rng = np.random.default_rng(rollout_seed(rl, step) + 1)
                    for _ in range(grpo.num_iterations):
                        for index in order_rng.permutation(len(minis)):
                            step_fn, global_batch, _ = minis[index]
                            state, metrics = step_fn(state, global_batch)
                            update_metrics.append({k: float(v) for k, v in jax.device_get(metrics).items()})
                    times["time/update_s"] = time.perf_counter() - t2
                else:
                    log.info("grpo step %d: every group has equal scores; no update", step + 1)
                metrics = mean_update_metrics(update_metrics) if update_metrics else {"updates": 0.0}
                metrics["kept_group_fraction"] = float(keep.mean())
                metrics["zero_variance_group_fraction"] = 1.0 - float(spread.mean())  # groups with advantage 0
                metrics["micro_batches"] = float(minis[0][2]) if examples else 0.0
                m = {**rollout_metrics(episodes, scores), **metrics, **times, "sampler_vs_old_logprob_max_abs": drift}
                writer.write(step + 1, m)
                for hook in hooks:
                    hook(step + 1, m)
                log.info("grpo step %d: reward %.3f iou %.3f steps %.2f", step + 1, m["reward"], m["iou"],
                         m["steps_per_episode"])
                summary = m
                stop = preemption.requested()
                if (step + 1) % config.checkpoint_every == 0 or step + 1 == rl.steps or stop:
                    ckpt.save(step + 1, state, {"step": step + 1}, to_dict(config))
                if stop:
                    log.info("SIGTERM: stopping after GRPO step %d; checkpoint saved", step + 1)
                    stopped = True
                    break
                if rl.export_every > 0 and (step + 1) % rl.export_every == 0 and step + 1 < rl.steps:
                    export(state, os.path.join(workdir, "exports", f"step_{step + 1}"))
        # The final policy (a rerun of a finished run writes it only when it is missing).
        final_dir = os.path.join(workdir, "hf")
        if config.export_hf and not stopped and not (start >= rl.steps and os.path.isdir(final_dir)):
            export(state, final_dir)
            export_dir = final_dir
    finally:
        preemption.close()
        writer.close()
        ckpt.close()
    return {"state": state, "model_def": model_def, "metrics": summary, "processor": processor,
            "step": max(start, rl.steps), "already_finished": start >= rl.steps, "export_dir": export_dir}


BATCH_KEYS = ("input_ids", "attention_mask", "targets", "loss_mask", "advantages", "row_weights", "pixel_values",
              "image_grid_thw")


def micro_batches(examples: Sequence[TurnExample], processor, buckets: Sequence[int], grad_accum: int,
                  eos_ids: Sequence[int], image_size: int, tokens_per_trajectory: dict[int, int] | None = None,
                  pad_to: int = 8) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The turns as `grad_accum` micro-batches [A, ...] of one sequence length and row count
    (contiguous groups of turns; padding rows carry no loss), and the sampler log-probs [A, b, S].
    The loss is a sum over rows with per-row weights, so the update equals one batch.
    tokens_per_trajectory: N_i of the whole rollout batch when ``examples`` is a mini-batch of it."""
    counts = tokens_per_trajectory if tokens_per_trajectory is not None else trajectory_tokens(examples)
    whole = build_grpo_batch(examples, processor, buckets, eos_ids, pad_to, image_size=image_size,
                             tokens_per_trajectory=counts)
    if grad_accum == 1:
        parts = [whole]
    else:
        per = -(-len(examples) // grad_accum)
        rows = row_bucket(per, max(1, whole.input_ids.shape[0] // grad_accum))
        groups = [examples[i * per:(i + 1) * per] for i in range(grad_accum)]
        if any(not g for g in groups):
            raise ValueError(f"{len(examples)} policy turns do not fill grad_accum={grad_accum} micro-batches")
        parts = [build_grpo_batch(g, processor, (whole.input_ids.shape[1],), eos_ids, pad_rows=rows,
                                  image_size=image_size, tokens_per_trajectory=counts) for g in groups]
    shapes = {np.shape(getattr(p, "pixel_values")) for p in parts}
    if len(shapes) > 1:
        raise ValueError("grad_accum > 1 needs the same number of images in every micro-batch (history=none)")
    arrays = {k: np.stack([getattr(p, k) for p in parts]) for k in BATCH_KEYS}
    return arrays, np.stack([p.sampler_logprobs for p in parts])
