"""Agentic GRPO (docs/design.md section 5): ``train_grpo``.

`GRPOLoop` is the shared training loop (``ibis_jax.train.loop``: init or restore, the steps,
SIGTERM, metrics, checkpoints, export) with GRPO's phases. It starts from an HF dir (e.g. the SFT
export) and updates with SFT's step (``Program.train_step``) under the ``grpo`` loss. Each step
(`GRPOLoop.train_step`):

1. rollouts (`rollout`): ``prompts_per_step`` samples x ``group_size`` episodes, run together
   through the agent loop with the current policy and the tool (multi-turn, tool in the loop);
2. rewards (`score`): the configured per-step rewards, aggregated per trajectory
   (``ibis_jax.rl.rewards``); advantages normalised within each prompt's group;
3. batch (`update_batches`): one sequence per policy turn, the sampler's own ids, loss only on
   them (``ibis_jax.rl.batch``); old log-probs recomputed under the parameters that sampled (the
   ratio's denominator);
4. the jitted updates (`update`); metrics per reward component, IoU, steps, parse failures, clip
   fraction, ratio, KL, entropy and seconds per phase, as JSONL + TensorBoard.

On several processes (``--coordinator ...``) each runs a contiguous share of the step's episodes
with a copy of the policy on its own devices (``core.local_replica``, gathered tensor by tensor
each step); the per-episode scores are all-gathered, so a group is normalised together wherever its
episodes ran and every process logs the same rollout metrics (the ``time/*`` ones are process 0's);
each process's turns become its rows of the global update batch, padded to the rows and length of
the largest share. Process 0 alone writes metrics and exports; checkpoints are collective. The
``rollouts`` entry of the result holds every step's scores and advantages.

The final policy is exported as an HF directory to ``WORKDIR/hf`` (``config.export_hf``), with
``rl.export_every`` also to ``WORKDIR/exports/step_N``. Checkpoints (Orbax, SFT's
``Checkpointer``) hold the state and the step; prompts are drawn by step index, so a resumed run
continues with the same prompts.
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
from ibis_jax.agent.episode import Episode
from ibis_jax.agent.volume import episode_for_sample
from ibis_jax.agent.loop import Policy, episode_messages, run_agent
from ibis_jax.data.queries import sample_query
from ibis_jax.data.sources.base import Sample
from ibis_jax.models import family, model_config_from_hf
from ibis_jax.models.qwen2_5_vl.processor import eos_token_ids
from ibis_jax.rl.batch import (TurnExample, agree_micro_batches, inert_rows, micro_batches, row_multiple,
                               trajectory_tokens)
from ibis_jax.rl.config import RLConfig, grpo_optimizer, grpo_schedule, resolve_grpo
from ibis_jax.rl.grpo import compute_advantages, minibatch_indices, nonzero_variance_groups
from ibis_jax.rl.loss import make_grpo_loss, make_token_logprobs
from ibis_jax.rl import rollout_layout
from ibis_jax.rl.rewards import RewardContext, score_episode
from ibis_jax.tools.auto import assign_episode
from ibis_jax.tools.protocol import SegmentationTool
from ibis_jax.train import core
from ibis_jax.train import mesh as mesh_lib
from ibis_jax.train.config import TrainConfig
from ibis_jax.train.loop import StepHook, TrainLoop
from ibis_jax.train.sft import image_dtype, to_global, with_vision_layout
from ibis_jax.train.program import build_program
from ibis_jax.train.state import TrainState

log = logging.getLogger(__name__)

# (model, processor, rl config, seed, agent settings) -> a Policy that samples with the model's
# current parameters; the trainer passes a different seed every step (the same one on a resumed
# step) and the settings the model was trained with (system prompt, image size, overlay).
PolicyFactory = Callable[[Any, Any, RLConfig, int, AgentSettings], Policy]  # (model, processor, ...)


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


class GRPOLoop(TrainLoop):
    """GRPO in the shared loop (`ibis_jax.train.loop`): each step rolls out, scores and
    normalises a batch of episodes, then updates on their policy turns; metrics are written as
    the step ends (they are host numbers by then)."""

    name = "grpo"

    def __init__(self, config: TrainConfig, rl: RLConfig, samples: Sequence[Sample], tool: SegmentationTool,
                 workdir: str, *, init_dir: str, policy_factory: PolicyFactory, hooks: Sequence[StepHook] = ()):
        super().__init__(config, workdir, hooks=hooks)
        self.rl, self.samples, self.tool, self.init_dir = rl, samples, tool, init_dir
        self.policy_factory = policy_factory
        self.total_steps = rl.steps
        self.episodes_per_step = rl.prompts_per_step * rl.grpo.group_size
        self.rollouts: list[dict[str, Any]] = []  # per step run: every episode's score and advantage, kept or not

    def check_inputs(self) -> None:
        if not self.samples:
            raise ValueError("GRPO needs at least one prompt sample")

    def check_processes(self) -> None:
        processes = jax.process_count()
        if processes > 1 and self.rl.history != "none":
            raise ValueError("GRPO on several processes needs rl.history=none (one image per policy turn, so the "
                             "processes' rows form one batch)")
        if self.episodes_per_step < processes:
            raise ValueError(f"rl.prompts_per_step x rl.grpo.group_size = {self.episodes_per_step} episodes per step "
                             f"for {processes} processes: each needs at least one; raise rl.prompts_per_step")

    # ------------------------------------------------------------------ build, init, restore
    def build(self) -> None:
        """The agent settings (checked against the model's record), mesh, program, the initial
        state from `init_dir` and the frozen reference policy of the KL penalty."""
        config, rl = self.config, self.rl
        self.settings = agent_settings(config, rl, self.init_dir)
        self.mesh = mesh_lib.make_mesh(config.mesh_shape)
        mesh_lib.check_batch_spans_processes(self.mesh)
        self.grpo = resolve_grpo(rl)
        tx, schedule = grpo_optimizer(config, rl)

        # The program `ibis-jax plan` compiles: the config's dtypes, remat policy, scanned layers, LoRA.
        self.program = build_program(config, model_config_from_hf(self.init_dir), self.mesh, tx, schedule)
        self.processor = family(self.init_dir).processor(config.tokenizer_dir or self.init_dir)
        self.export_source = config.tokenizer_dir or self.init_dir
        # each tensor read into its shard; optimizer state born sharded
        self.state = self.program.from_hf(self.init_dir, jax.random.key(config.seed))
        # The frozen initial policy for the KL penalty: a copy (the update donates the state's buffers),
        # taken before any restore, so a resumed run keeps the same reference.
        self.ref_params = jax.tree.map(jnp.copy, self.state.params) if self.grpo.beta > 0 else None

    def initial_state(self) -> TrainState:
        return self.state

    def resumed_state(self, saved: TrainState, data_state: Any) -> TrainState:
        """Prompts are drawn by step index: the step alone resumes the data; the base is init_dir's."""
        return TrainState(saved.step, saved.params, self.state.frozen, saved.opt_state)

    def prepare_steps(self) -> None:
        """The loss, the log-prob passes, where rollouts decode, the row padding."""
        rl, model_def = self.rl, self.program.model_def
        # The default policy never samples the multimodal placeholders (ModelPolicy); the loss scores
        # rollouts under the same distribution.
        suppressed = model_def.config.multimodal_token_ids
        self.loss_fn = make_grpo_loss(self.grpo, temperature=rl.temperature, suppressed=suppressed)
        self.token_logprobs = make_token_logprobs(model_def, rl.temperature, suppressed)
        # max |old - sampler log-prob| over the policy tokens, from the global arrays (a replicated scalar)
        self.drift_fn = jax.jit(lambda old, sampler, mask: jnp.max(jnp.abs(old - sampler) * mask))
        self.fused_old = self.grpo.updates_per_batch == 1  # see `update_batches`
        self.step_fns: dict = {}
        self.layout_cache: dict = {}
        self.prepare_rollouts()
        self.eos_ids = eos_token_ids(self.processor.tokenizer, model_def.config.text)
        # Rows: multiples of the batch divisor; on several processes of the share that, times the
        # process count, splits over the data x fsdp devices.
        processes = jax.process_count()
        ways = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        self.pad_to = row_multiple(ways // math.gcd(ways, processes), -(-8 // processes))

    def prepare_rollouts(self) -> None:
        """Rollouts on several processes: each runs its share of a step's episodes
        (`core.process_slice`: contiguous, so a group may span two) with a copy of the policy on
        its own devices, so the rollouts of different hosts need no collective, however many
        turns each takes. The scores are gathered, so each group is normalised together wherever
        its episodes ran; each process then supplies the rows of its own turns to the global
        update batch. The decode layout (`rollout_layout`) over this process's devices is decided
        once, from the merged policy's size in the compute dtype and what a chip has left beside
        the train state."""
        shardings, abstract, model_def = self.program.shardings, self.program.abstract, self.program.model_def
        self.share = core.process_slice(self.episodes_per_step)
        self.rollout_mesh = mesh_lib.local_mesh(self.mesh)
        # The frozen parameters never change: copied once (alone the update's outputs are used: it donates its inputs).
        self.rollout_frozen = (core.local_replica(self.state.frozen, shardings.frozen, self.rollout_mesh)
                               if jax.process_count() > 1 else None)
        decode_bytes = rollout_layout.tree_bytes(model_def.abstract_params(abstract.params, abstract.frozen),
                                                 self.config.compute_dtype)
        resident = sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
                       for x in jax.tree.leaves(abstract))
        self.decode_mesh = rollout_layout.decode_mesh(
            self.rollout_mesh, self.rl.rollout_layout, model_def.config.text.num_key_value_heads, decode_bytes,
            rollout_layout.chip_budget(resident))
        log.info("rollouts decode on mesh %s (rl.rollout_layout=%s, policy %.2f GiB)", dict(self.decode_mesh.shape),
                 self.rl.rollout_layout, decode_bytes / 2**30)

    # ------------------------------------------------------------------ one step
    def train_step(self, step: int) -> dict[str, Any]:
        """GRPO step `step + 1`: rollouts, scores, advantages, then the updates on the kept turns."""
        grpo = self.grpo
        # The model's activation constraints name mesh axes: every forward runs under the mesh.
        with jax.set_mesh(self.mesh):
            times: dict[str, float] = {}
            episodes, traces = self.rollout(step, times)
            names, table = self.score(episodes, traces)
            score_values = table[:, 0].astype(np.float32)
            advantages = np.asarray(compute_advantages(score_values, grpo))
            spread = nonzero_variance_groups(score_values, grpo.group_size)
            keep = spread if grpo.skip_zero_variance else np.ones(self.episodes_per_step, bool)
            turns = _turn_examples(episodes, traces, advantages[self.share], self.rl.history,
                                   self.settings.system_text, self.share.start)
            self.rollouts.append({"step": step + 1, "scores": score_values.tolist(),
                                  "advantages": advantages.tolist(), "kept": keep.tolist()})
            per_update, micro, drift = self.update(step, turns, keep, times)
        metrics = mean_update_metrics(per_update) if per_update else {"updates": 0.0}
        metrics["kept_group_fraction"] = float(keep.mean())
        metrics["zero_variance_group_fraction"] = 1.0 - float(spread.mean())  # groups with advantage 0
        metrics["micro_batches"] = micro
        if not self.fused_old:  # else the update measured it (the loss's metric of the same name)
            metrics["sampler_vs_old_logprob_max_abs"] = drift
        metrics.setdefault("sampler_vs_old_logprob_max_abs", 0.0)
        return {"step": step + 1, "metrics": {**rollout_metrics(names, table), **metrics, **times}}

    def rollout(self, step: int, times: dict[str, float]) -> tuple[list[Episode], list]:
        """This process's share of the step's episodes, run through the agent loop with the
        current policy (merged, resharded into the decode layout) and the tool."""
        rl, model_def, shardings = self.rl, self.program.model_def, self.program.shardings
        t0 = time.perf_counter()
        picked = [self.samples[(step * rl.prompts_per_step + i) % len(self.samples)]
                  for i in range(rl.prompts_per_step)]
        mine = [(i, g) for i in range(rl.prompts_per_step) for g in range(rl.grpo.group_size)][self.share]
        episodes = [  # a 2D or a volume episode, as the prompt sample is
            episode_for_sample(picked[i], sample_query(picked[i], rl.query_style, rl.seed),
                               episode_id=f"grpo-{step}-{i}-{g}", max_actions=rl.max_turns)
            for i, g in mine
        ]
        for (i, _), episode in zip(mine, episodes):
            assign_episode(self.tool, episode.episode_id, picked[i].modality, picked[i].target)  # `auto`: its preset
        rollout_params = core.local_replica(self.state.params, shardings.params, self.rollout_mesh)
        frozen = self.state.frozen if self.rollout_frozen is None else self.rollout_frozen
        # The merged policy (LoRA folded in, compute dtype) resharded on device into the decode
        # layout: no weight is gathered per decoded token.
        decode_params = rollout_layout.decode_policy_params(
            model_def, rollout_params, frozen, shardings.params, shardings.frozen, self.decode_mesh,
            self.config.compute_dtype)
        with jax.set_mesh(self.decode_mesh):  # this process's devices alone on several
            policy = self.policy_factory(nnx.merge(model_def.graphdef, nnx.State(decode_params)), self.processor, rl,
                                         rollout_seed(rl, step, jax.process_index()), self.settings)
            traces = run_agent(policy, self.tool, episodes, history=rl.history,
                               system_prompt=self.settings.system_text, max_rows=rl.max_rows)
        del policy, rollout_params, decode_params
        times["time/rollout_s"] = time.perf_counter() - t0
        times["time/generation_s"] = sum(t.generate_seconds for t in traces)
        times["time/tool_s"] = sum(s.tool_seconds for e in episodes for s in e.steps)
        return episodes, traces

    def score(self, episodes: Sequence[Episode], traces) -> tuple[list[str], np.ndarray]:
        """The configured rewards per episode, as the episode table of every process's episodes
        in step order (a collective)."""
        rl = self.rl
        scores = [score_episode(e, rl.rewards, RewardContext(rl.reward, stop_reasons=tuple(
            t.stop_reason for t in trace.turns))) for e, trace in zip(episodes, traces)]
        names, table = episode_table(episodes, scores, [n for n in scores[0].components])
        return names, core.gather_rows(table, self.episodes_per_step)

    def update(self, step: int, turns: list[TurnExample], keep: np.ndarray,
               times: dict[str, float]) -> tuple[list[dict[str, float]], float, float]:
        """The updates on the kept turns: mini-batches fixed for this rollout batch (old and
        reference log-probs once, before any update), then `num_iterations` passes over them.
        Returns each update's metrics, the micro-batches of an update and the sampler drift."""
        examples = [ex for ex in turns if keep[ex.trajectory]]
        # On several processes every one supplies rows to every update, kept turns or not:
        # one with none left (skip_zero_variance) supplies its first turn, inert.
        counts_per_process = core.gather_rows(np.asarray([len(examples)]), jax.process_count())
        inert = not examples and counts_per_process.sum() > 0
        if inert:
            examples = turns[:1]
        per_update: list[dict[str, float]] = []
        minis, drift = [], 0.0
        if counts_per_process.sum() > 0:
            t1 = time.perf_counter()
            minis, drift = self.update_batches(step, examples, inert, int(counts_per_process.min()))
            times["time/old_logprobs_s"] = time.perf_counter() - t1
            t2 = time.perf_counter()
            order_rng = np.random.default_rng(rollout_seed(self.rl, step) + 1)
            for _ in range(self.grpo.num_iterations):
                for index in order_rng.permutation(len(minis)):
                    step_fn, global_batch, _ = minis[index]
                    self.state, metrics = step_fn(self.state, global_batch)
                    per_update.append({k: float(v) for k, v in jax.device_get(metrics).items()})
            times["time/update_s"] = time.perf_counter() - t2
        else:
            log.info("grpo step %d: every group has equal scores; no update", step + 1)
        return per_update, float(minis[0][2]) if per_update else 0.0, drift

    def update_batches(self, step: int, examples: list[TurnExample], inert: bool,
                       fewest: int) -> tuple[list[tuple[Callable, dict, int]], float]:
        """The turns cut into mini-batches (each into `grad_accum` micro-batches) as global
        batches with their old (and reference) log-probs: (step function, batch, micro-batches)
        each, and the largest sampler drift. On several processes each cuts its own turns into
        the same number of mini-batches (`fewest`: the fewest turns of a process), padded to
        common shapes."""
        config, processes = self.config, jax.process_count()
        counts = trajectory_tokens(examples)
        minis, drift = [], 0.0
        for part in minibatch_indices(len(examples), min(self.grpo.mini_batches, fewest or 1),
                                      rollout_seed(self.rl, step)):
            arrays, sampler_lp = micro_batches([examples[i] for i in part], self.processor, self.rl.seq_buckets,
                                               config.grad_accum, self.eos_ids, config.image_size, counts, self.pad_to)
            if inert:
                arrays = inert_rows(arrays)
            if processes > 1:
                arrays, sampler_lp = agree_micro_batches(arrays, sampler_lp)
            arrays["pixel_values"] = arrays["pixel_values"].astype(image_dtype(config))
            arrays = with_vision_layout(arrays, self.program.model_def.config.vision, self.layout_cache)
            step_fn, lp_fn, batch_shardings = self.step_functions(arrays)
            inputs = to_global(arrays, batch_shardings)  # what the log-prob passes take
            global_batch = dict(inputs)
            sampler_global = to_global(sampler_lp, batch_shardings["targets"])
            if self.fused_old:
                global_batch["sampler_logprobs"] = sampler_global
            else:
                global_batch["old_logprobs"] = lp_fn(self.state.params, self.state.frozen, inputs)
                drift = max(drift, float(self.drift_fn(global_batch["old_logprobs"], sampler_global,
                                                       global_batch["loss_mask"])))
            if self.ref_params is not None:
                global_batch["ref_logprobs"] = lp_fn(self.ref_params, self.state.frozen, inputs)
            minis.append((step_fn, global_batch, int(arrays["input_ids"].shape[0])))
        return minis, drift

    def step_functions(self, arrays: dict[str, Any]) -> tuple[Callable, Callable, dict]:
        """(update, log-prob pass, batch shardings) for the batch's shapes, jitted once per shape."""
        shape_key = tuple((k, np.shape(v)) for k, v in arrays.items() if hasattr(v, "shape"))
        if shape_key not in self.step_fns:
            batch_shardings = mesh_lib.named(self.mesh, mesh_lib.batch_specs(arrays, self.mesh, jax.process_count()))
            lp_fn = self.program.jit_logprobs(self.token_logprobs, batch_shardings)
            # One update per rollout batch: the ratio's denominator is the update's own log-probs
            # (stop-gradient), no separate pass; the loss reports the sampler drift from the
            # sampler's log-probs.
            extra = {"sampler_logprobs" if self.fused_old else "old_logprobs": batch_shardings["targets"]}
            if self.ref_params is not None:
                extra["ref_logprobs"] = batch_shardings["targets"]
            self.step_fns[shape_key] = (self.program.train_step(self.loss_fn, {**batch_shardings, **extra}), lp_fn,
                                        batch_shardings)
        return self.step_fns[shape_key]

    # ------------------------------------------------------------------ after a step, the result
    def report(self, step: int, m: dict[str, float]) -> None:
        log.info("grpo step %d: reward %.3f iou %.3f steps %.2f", step, m["reward"], m["iou"], m["steps_per_episode"])

    def after_step(self, step: int) -> None:
        """`rl.export_every`: the policy also to WORKDIR/exports/step_N (the last step's is the final export)."""
        if self.rl.export_every > 0 and step % self.rl.export_every == 0 and step < self.rl.steps:
            self.export(os.path.join(self.workdir, "exports", f"step_{step}"))

    def exports_final(self, step: int) -> bool:
        return super().exports_final(step) and self.stopped is None  # not after a SIGTERM, even at the last step

    def result(self, step: int, programs: dict[str, int]) -> dict[str, Any]:
        return {"state": self.state, "model_def": self.program.model_def, "metrics": self.metrics,
                "processor": self.processor, "programs": programs, "program": self.program,
                "step": max(self.start, self.rl.steps), "already_finished": self.start >= self.rl.steps,
                "export_dir": self.export_dir, "rollouts": self.rollouts}


def agent_settings(config: TrainConfig, rl: RLConfig, init_dir: str) -> AgentSettings:
    """The conversation the model was trained with: the config's settings (with `rl.history`),
    refused where the record in `init_dir` (`AGENT_FILE`) says otherwise."""
    settings = dataclasses.replace(AgentSettings.from_train_config(config), history=rl.history)
    if os.path.exists(os.path.join(init_dir, AGENT_FILE)):
        recorded = load_agent_settings(init_dir)
        for field in ("system_prompt", "image_size", "overlay_color", "overlay_alpha"):
            want, have = getattr(recorded, field), getattr(settings, field)
            if want != have:
                raise ValueError(f"{init_dir} was trained with {field}={want!r} ({AGENT_FILE}) but the config says "
                                 f"{field}={have!r}; set the config to {want!r}")
    return settings


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
    return GRPOLoop(config, rl, samples, tool, workdir, init_dir=init_dir, policy_factory=policy_factory,
                    hooks=hooks).run()


__all__ = ["train_grpo", "GRPOLoop", "RLConfig", "PolicyFactory", "default_policy_factory", "rollout_seed",
           "grpo_schedule", "grpo_optimizer", "resolve_grpo", "agent_settings", "micro_batches", "inert_rows",
           "agree_micro_batches"]
