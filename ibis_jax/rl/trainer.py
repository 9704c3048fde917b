"""Agentic GRPO (docs/design.md section 5): one linear ``train_grpo``.

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

On several processes (``--coordinator ...``) each runs a contiguous share of the step's episodes
with a copy of the policy on its own devices (``core.local_replica``, gathered tensor by tensor
each step); the per-episode scores are all-gathered, so a group is normalised together wherever its
episodes ran and every process logs the same rollout metrics (the ``time/*`` ones are process 0's);
each process's turns become its rows of the global update batch, padded to the rows and length of
the largest share. Process 0 alone writes metrics and exports; checkpoints are collective. The
``rollouts`` entry of the result holds every step's scores and advantages.

The final policy is exported as an HF directory to ``WORKDIR/hf`` (``config.export_hf``), with
``rl.export_every`` also to ``WORKDIR/exports/step_N``. Checkpoints (Orbax, SFT's
``Checkpointer``) hold the state and the step; prompts are drawn by
step index, so a resumed run continues with the same prompts.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ibis_jax.agent.settings import AGENT_FILE, AgentSettings, load_agent_settings
from ibis_jax.compilation import CompileCounter
from ibis_jax.agent.episode import Episode
from ibis_jax.agent.volume import episode_for_sample
from ibis_jax.agent.loop import Policy, episode_messages, run_agent
from ibis_jax.data.queries import sample_query
from ibis_jax.data.sources.base import Sample
from ibis_jax.models.qwen2_5_vl.processor import Qwen25VLProcessor, eos_token_ids
from ibis_jax.rl.batch import (TurnExample, agree_micro_batches, inert_rows, micro_batches, row_multiple,
                               trajectory_tokens)
from ibis_jax.rl.grpo import GRPOConfig, compute_advantages, minibatch_indices, nonzero_variance_groups
from ibis_jax.rl.loss import make_grpo_loss, make_token_logprobs
from ibis_jax.rl import rollout_layout
from ibis_jax.rl.rewards import PAPER_REWARDS, RewardConfig, RewardContext, score_episode
from ibis_jax.tools.auto import assign_episode
from ibis_jax.tools.protocol import SegmentationTool
from ibis_jax.train import core
from ibis_jax.train import mesh as mesh_lib
from ibis_jax.train.checkpoint import Checkpointer, export_hf
from ibis_jax.train.config import TrainConfig, to_dict
from ibis_jax.train.metrics import MetricsWriter
from ibis_jax.train.optim import make_optimizer
from ibis_jax.train.sft import image_dtype, to_global, with_vision_layout
from ibis_jax.train.program import build_program
from ibis_jax.train.state import TrainState

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
    # Rollouts decode on a copy of the merged policy resharded once per step (`rl.rollout_layout`):
    # "replicated" (episodes data-parallel over the chips), "tensor" (KV heads over chips where it
    # does not fit), "auto" (replicated when it fits the chip's free HBM).
    rollout_layout: str = "auto"
    prefix_cache: bool = True  # the system turn encoded once per step's policy, not per row and turn
    max_rows: int | None = None  # continuous batching: rows of the agent loop (None: one per episode)

    def __post_init__(self):
        if self.rollout_layout not in rollout_layout.LAYOUTS:
            raise ValueError(f"rl.rollout_layout={self.rollout_layout!r}: use one of {', '.join(rollout_layout.LAYOUTS)}")
        if self.max_rows is not None and self.max_rows < 1:
            raise ValueError(f"rl.max_rows={self.max_rows}: use a row count >= 1, or None for one row per episode")


def grpo_schedule(config: TrainConfig, rl: RLConfig, total_updates: int | None = None):
    """The learning-rate schedule `rl.lr_schedule` names (at `config.lr`), over `total_updates`
    optimizer updates (default `rl.steps`; several updates per rollout batch count each)."""
    from ibis_jax.train.optim import constant_schedule, make_schedule

    if rl.lr_schedule == "constant":
        return constant_schedule(config.lr, rl.warmup_steps)
    if rl.lr_schedule == "cosine":
        return make_schedule(config, total_updates or rl.steps)
    raise ValueError(f"rl.lr_schedule {rl.lr_schedule!r}: use constant or cosine")


def grpo_optimizer(config: TrainConfig, rl: RLConfig):
    """(tx, schedule) of a GRPO run: `config`'s optimizer over every update of the run, at the
    rate `rl.lr_schedule` names (the trainer's and `ibis-jax plan`'s)."""
    updates = rl.steps * resolve_grpo(rl).updates_per_batch
    return make_optimizer(config, updates, grpo_schedule(config, rl, updates))


def default_policy_factory(model, processor, rl: RLConfig, seed: int, settings: AgentSettings) -> Policy:
    from ibis_jax.generate.policy import ModelPolicy  # the KV-cache sampler (issue 5)

    # The decode mesh the trainer set (`rl.rollout_layout`): the sampler shards its cache on it.
    mesh = jax.sharding.get_mesh()
    mesh = None if mesh.empty or mesh.size == 1 else mesh
    return ModelPolicy.for_rollouts(model, processor, temperature=rl.temperature, max_new_tokens=rl.max_new_tokens,
                                    seed=seed, settings=settings, mesh=mesh, prefix_cache=rl.prefix_cache)


def rollout_seed(rl: RLConfig, step: int, process: int = 0) -> int:
    """The sampling seed of a step: distinct per step and run seed, so no two steps draw the same
    random stream (a fresh policy per step with one fixed seed would replay the same keys), and
    per process on several (process 0's is the single-process seed): processes sharing one group's
    prompt must not sample the same completions."""
    return int(np.random.SeedSequence([rl.seed, step] + ([process] if process else [])).generate_state(1)[0])


def _turn_examples(episodes: Sequence[Episode], traces, advantages: np.ndarray, history: str,
                   system_prompt: str, first: int = 0) -> list[TurnExample]:
    """One example per policy turn; ``first``: the step-wide index of ``episodes[0]`` (the
    trajectory index, of this process's share on several)."""
    examples = []
    for index, (episode, trace, adv) in enumerate(zip(episodes, traces, advantages), start=first):
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


def episode_table(episodes: Sequence[Episode], scores, reward_names: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Per-episode numbers, ``float32 [episodes, columns]``: the score (column 0), each reward's
    mean over the steps, the final IoU, the steps, whether it ended on a parse error or a
    terminate. Rows of every process are gathered into one table (``core.gather_rows``)."""
    names = ["reward", *(f"reward/{n}" for n in reward_names), "iou", "steps_per_episode", "parse_failure_rate",
             "terminated_rate"]
    rows = [[s.score, *(s.components[n].mean() for n in reward_names), e.ious[-1], len(e.steps),
             e.end_reason == "parse_error", e.end_reason == "terminate"] for e, s in zip(episodes, scores)]
    return names, np.asarray(rows, np.float32).reshape(len(rows), len(names))


def rollout_metrics(names: Sequence[str], table: np.ndarray) -> dict[str, float]:
    """The step's rollout metrics: each column of the episode table averaged over all episodes."""
    return {name: float(v) for name, v in zip(names, table.mean(axis=0))}


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
    from ibis_jax.fileio import local_workdir

    local_workdir(workdir)
    core.init_distributed()  # no-op when the command did it or alone
    compiles = CompileCounter()
    processes = jax.process_count()
    episodes_per_step = rl.prompts_per_step * rl.grpo.group_size
    if processes > 1 and rl.history != "none":
        raise ValueError("GRPO on several processes needs rl.history=none (one image per policy turn, so the "
                         "processes' rows form one batch)")
    if episodes_per_step < processes:
        raise ValueError(f"rl.prompts_per_step x rl.grpo.group_size = {episodes_per_step} episodes per step for "
                         f"{processes} processes: each needs at least one; raise rl.prompts_per_step")
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
    mesh_lib.check_batch_spans_processes(mesh)
    grpo = resolve_grpo(rl)
    tx, schedule = grpo_optimizer(config, rl)
    from ibis_jax.models.qwen2_5_vl import Qwen25VLConfig

    # The program `ibis-jax plan` compiles: the config's dtypes, remat policy, scanned layers, LoRA.
    program = build_program(config, Qwen25VLConfig.from_hf_config(init_dir), mesh, tx, schedule)
    model_def, shardings, abstract = program.model_def, program.shardings, program.abstract
    processor = Qwen25VLProcessor(config.tokenizer_dir or init_dir)
    key = jax.random.key(config.seed)
    state = program.from_hf(init_dir, key)  # each tensor read into its shard; optimizer state born sharded
    # The frozen initial policy for the KL penalty: a copy (the update donates the state's buffers),
    # taken before any restore, so a resumed run keeps the same reference.
    ref_params = jax.tree.map(jnp.copy, state.params) if grpo.beta > 0 else None
    # ---------------------------------------------------------------- restore
    ckpt = Checkpointer(workdir, config.keep_checkpoints)
    start = 0
    restored = ckpt.restore_latest(abstract)  # logs "resumed from step N"
    if restored is not None:
        saved, _, _, start = restored
        state = TrainState(saved.step, saved.params, state.frozen, saved.opt_state)  # the base: init_dir's
    # ---------------------------------------------------------------- the update step
    # The default policy never samples the multimodal placeholders (ModelPolicy); the loss scores
    # rollouts under the same distribution.
    suppressed = model_def.config.multimodal_token_ids
    grpo_loss_fn = make_grpo_loss(grpo, temperature=rl.temperature, suppressed=suppressed)
    step_fns: dict = {}
    layout_cache: dict = {}

    token_logprobs = make_token_logprobs(model_def, rl.temperature, suppressed)
    # max |old - sampler log-prob| over the policy tokens, from the global arrays (a replicated scalar)
    drift_fn = jax.jit(lambda old, sampler, mask: jnp.max(jnp.abs(old - sampler) * mask))
    fused_old = grpo.updates_per_batch == 1  # see the update batch below
    # ---------------------------------------------------------------- rollouts on several processes
    # Each process runs its share of a step's episodes (`core.process_slice`: contiguous, so a
    # group may span two processes) with a copy of the policy on its own devices: the rollouts of
    # different hosts need no collective, however many turns each takes. The scores are gathered,
    # so each group is normalised together wherever its episodes ran; each process then supplies
    # the rows of its own turns to the global update batch.
    share = core.process_slice(episodes_per_step)
    rollout_mesh = mesh_lib.local_mesh(mesh)
    # The frozen parameters never change: copied once (alone the update's outputs are used: it donates its inputs).
    rollout_frozen = core.local_replica(state.frozen, shardings.frozen, rollout_mesh) if processes > 1 else None
    # The decode layout (`rollout_layout`): over this process's devices, decided once from the
    # merged policy's size in the compute dtype and what a chip has left beside the train state.
    decode_bytes = rollout_layout.tree_bytes(model_def.abstract_params(abstract.params, abstract.frozen),
                                             config.compute_dtype)
    resident = sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
                   for x in jax.tree.leaves(abstract))
    decode_mesh = rollout_layout.decode_mesh(rollout_mesh, rl.rollout_layout, model_def.config.text.num_key_value_heads,
                                             decode_bytes, rollout_layout.chip_budget(resident))
    log.info("rollouts decode on mesh %s (rl.rollout_layout=%s, policy %.2f GiB)", dict(decode_mesh.shape),
             rl.rollout_layout, decode_bytes / 2**30)

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
    # Rows: multiples of the batch divisor; on several processes of the share that, times the
    # process count, splits over the data x fsdp devices.
    ways = mesh.shape["data"] * mesh.shape["fsdp"]
    pad_to = row_multiple(ways // math.gcd(ways, processes), -(-8 // processes))
    summary: dict[str, Any] = {}
    rollouts: list[dict[str, Any]] = []  # per step run: every episode's score and advantage, kept or not
    try:
        for step in range(start, rl.steps):
            # The model's activation constraints name mesh axes: every forward runs under the mesh.
            with jax.set_mesh(mesh):
                times: dict[str, float] = {}
                t0 = time.perf_counter()
                picked = [samples[(step * rl.prompts_per_step + i) % len(samples)] for i in range(rl.prompts_per_step)]
                mine = [(i, g) for i in range(rl.prompts_per_step) for g in range(rl.grpo.group_size)][share]
                episodes = [  # a 2D or a volume episode, as the prompt sample is
                    episode_for_sample(picked[i], sample_query(picked[i], rl.query_style, rl.seed),
                                       episode_id=f"grpo-{step}-{i}-{g}", max_actions=rl.max_turns)
                    for i, g in mine
                ]
                for (i, _), episode in zip(mine, episodes):
                    assign_episode(tool, episode.episode_id, picked[i].modality, picked[i].target)  # `auto`: its preset
                rollout_params = core.local_replica(state.params, shardings.params, rollout_mesh)
                frozen = state.frozen if rollout_frozen is None else rollout_frozen
                # The merged policy (LoRA folded in, compute dtype) resharded on device into the
                # decode layout: no weight is gathered per decoded token.
                decode_params = rollout_layout.decode_policy_params(
                    model_def, rollout_params, frozen, shardings.params, shardings.frozen, decode_mesh,
                    config.compute_dtype)
                with jax.set_mesh(decode_mesh):  # this process's devices alone on several
                    policy = policy_factory(nnx.merge(model_def.graphdef, nnx.State(decode_params)), processor, rl,
                                            rollout_seed(rl, step, jax.process_index()), settings)
                    traces = run_agent(policy, tool, episodes, history=rl.history, system_prompt=prompt_text,
                                       max_rows=rl.max_rows)
                del policy, rollout_params, decode_params
                times["time/rollout_s"] = time.perf_counter() - t0
                times["time/generation_s"] = sum(t.generate_seconds for t in traces)
                times["time/tool_s"] = sum(s.tool_seconds for e in episodes for s in e.steps)
                scores = [score_episode(e, rl.rewards, RewardContext(rl.reward, stop_reasons=tuple(
                    t.stop_reason for t in trace.turns))) for e, trace in zip(episodes, traces)]
                names, table = episode_table(episodes, scores, [n for n in scores[0].components])
                table = core.gather_rows(table, episodes_per_step)  # every process's episodes, in step order
                score_values = table[:, 0].astype(np.float32)
                advantages = np.asarray(compute_advantages(score_values, grpo))
                spread = nonzero_variance_groups(score_values, grpo.group_size)
                keep = spread if grpo.skip_zero_variance else np.ones(episodes_per_step, bool)
                turns = _turn_examples(episodes, traces, advantages[share], rl.history, prompt_text, share.start)
                examples = [ex for ex in turns if keep[ex.trajectory]]
                rollouts.append({"step": step + 1, "scores": score_values.tolist(),
                                 "advantages": advantages.tolist(), "kept": keep.tolist()})
                # On several processes every one supplies rows to every update, kept turns or not:
                # one with none left (skip_zero_variance) supplies its first turn, inert.
                counts_per_process = core.gather_rows(np.asarray([len(examples)]), processes)
                inert = not examples and counts_per_process.sum() > 0
                if inert:
                    examples = turns[:1]
                update_metrics: list[dict[str, float]] = []
                drift = 0.0
                if counts_per_process.sum() > 0:
                    # Mini-batches of turns, fixed for this rollout batch, each cut into grad_accum
                    # micro-batches; old (and reference) log-probs once, sharded, before any update;
                    # then num_iterations passes over them. On several processes each cuts its own
                    # turns into the same number of mini-batches, padded to common shapes.
                    counts = trajectory_tokens(examples)
                    minis = []
                    t1 = time.perf_counter()
                    parts = minibatch_indices(len(examples), min(grpo.mini_batches, int(counts_per_process.min()) or 1),
                                              rollout_seed(rl, step))
                    for part in parts:
                        arrays, sampler_lp = micro_batches([examples[i] for i in part], processor, rl.seq_buckets,
                                                           config.grad_accum, eos_ids, config.image_size, counts,
                                                           pad_to)
                        if inert:
                            arrays = inert_rows(arrays)
                        if processes > 1:
                            arrays, sampler_lp = agree_micro_batches(arrays, sampler_lp)
                        arrays["pixel_values"] = arrays["pixel_values"].astype(image_dtype(config))
                        arrays = with_vision_layout(arrays, model_def.config.vision, layout_cache)
                        shape_key = tuple((k, np.shape(v)) for k, v in arrays.items() if hasattr(v, "shape"))
                        if shape_key not in step_fns:
                            batch_shardings = mesh_lib.named(mesh, mesh_lib.batch_specs(arrays, mesh, processes))
                            lp_fn = program.jit_logprobs(token_logprobs, batch_shardings)
                            # One update per rollout batch: the ratio's denominator is the update's
                            # own log-probs (stop-gradient), no separate pass; the loss reports the
                            # sampler drift from the sampler's log-probs.
                            extra = {"sampler_logprobs" if fused_old else "old_logprobs": batch_shardings["targets"]}
                            if ref_params is not None:
                                extra["ref_logprobs"] = batch_shardings["targets"]
                            step_shardings = {**batch_shardings, **extra}
                            step_fns[shape_key] = (program.train_step(grpo_loss_fn, step_shardings), lp_fn,
                                                   batch_shardings)
                        step_fn, lp_fn, batch_shardings = step_fns[shape_key]
                        inputs = to_global(arrays, batch_shardings)  # what the log-prob passes take
                        global_batch = dict(inputs)
                        sampler_global = to_global(sampler_lp, batch_shardings["targets"])
                        if fused_old:
                            global_batch["sampler_logprobs"] = sampler_global
                        else:
                            global_batch["old_logprobs"] = lp_fn(state.params, state.frozen, inputs)
                            drift = max(drift, float(drift_fn(global_batch["old_logprobs"], sampler_global,
                                                              global_batch["loss_mask"])))
                        if ref_params is not None:
                            global_batch["ref_logprobs"] = lp_fn(ref_params, state.frozen, inputs)
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
                metrics["micro_batches"] = float(minis[0][2]) if update_metrics else 0.0
                if not fused_old:  # else the update measured it (the loss's metric of the same name)
                    metrics["sampler_vs_old_logprob_max_abs"] = drift
                metrics.setdefault("sampler_vs_old_logprob_max_abs", 0.0)
                m = {**rollout_metrics(names, table), **metrics, **times}
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
    programs = compiles.log("grpo")
    return {"state": state, "model_def": model_def, "metrics": summary, "processor": processor, "programs": programs,
            "program": program,
            "step": max(start, rl.steps), "already_finished": start >= rl.steps, "export_dir": export_dir,
            "rollouts": rollouts}
