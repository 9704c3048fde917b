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

Checkpoints (Orbax, SFT's ``Checkpointer``) hold the state and the step; prompts are drawn by
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
import numpy as np

from ibis_jax.agent.conversation import Message, turn_messages
from ibis_jax.agent.prompts import AGENT_FILE, load_agent_prompt, system_prompt
from ibis_jax.agent.episode import Episode, EpisodeConfig
from ibis_jax.agent.loop import Policy, run_agent
from ibis_jax.data.queries import sample_query
from ibis_jax.data.sources.base import Sample
from ibis_jax.models.qwen2_5_vl import load_hf
from ibis_jax.models.qwen2_5_vl.processor import Qwen25VLProcessor
from ibis_jax.rl.batch import TurnExample, build_grpo_batch, row_multiple
from ibis_jax.rl.grpo import GRPOConfig, chunked_token_logprobs, group_advantages
from ibis_jax.rl.loss import make_grpo_loss, sampling_logits
from ibis_jax.rl.rewards import PAPER_REWARDS, RewardConfig, RewardContext, score_episode
from ibis_jax.tools.protocol import SegmentationTool
from ibis_jax.train import mesh as mesh_lib
from ibis_jax.train.checkpoint import Checkpointer, abstract_with_shardings
from ibis_jax.train.config import TrainConfig, to_dict
from ibis_jax.train.metrics import MetricsWriter
from ibis_jax.train.optim import make_optimizer
from ibis_jax.train.samples import prepare_image
from ibis_jax.train.sft import to_global, with_vision_layout
from ibis_jax.train.state import ModelDef, split_model, state_from_model, state_specs
from ibis_jax.train.step import jit_train_step, make_train_step

log = logging.getLogger(__name__)

# (model, processor, rl config, seed) -> a Policy that samples with the model's current
# parameters; the trainer passes a different seed every step (the same one on a resumed step).
PolicyFactory = Callable[[Any, Qwen25VLProcessor, "RLConfig", int], Policy]


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


def default_policy_factory(model, processor, rl: RLConfig, seed: int) -> Policy:
    from ibis_jax.generate.policy import ModelPolicy  # the KV-cache sampler (issue 5)

    return ModelPolicy.for_rollouts(model, processor, temperature=rl.temperature,
                                    max_new_tokens=rl.max_new_tokens, history=rl.history, seed=seed)


def rollout_seed(rl: RLConfig, step: int) -> int:
    """The sampling seed of a step: distinct per step and run seed, so no two steps draw the same
    random stream (a fresh policy per step with one fixed seed would replay the same keys)."""
    return int(np.random.SeedSequence([rl.seed, step]).generate_state(1)[0])


def _turn_examples(episodes: Sequence[Episode], traces, advantages: np.ndarray, image_size: int,
                   history: str, system_prompt: str) -> list[TurnExample]:
    examples = []
    for index, (episode, trace, adv) in enumerate(zip(episodes, traces, advantages)):
        observations = [prepare_image(o, image_size) for o in trace.observations]
        assistant = [Message("assistant", t.text, token_ids=t.token_ids) for t in trace.turns]
        for t, turn in enumerate(trace.turns):
            messages = turn_messages(t, episode.query, observations, assistant, history=history,
                                     system_prompt=system_prompt)
            examples.append(TurnExample(messages, turn, float(adv), trajectory=index))
    return examples


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
    os.makedirs(workdir, exist_ok=True)
    # The conversation the model was trained with: its directory's record must agree with the config.
    trained_with = load_agent_prompt(init_dir)
    if trained_with != config.system_prompt:
        raise ValueError(f"{init_dir} was trained with the {trained_with!r} system prompt ({AGENT_FILE}) but the config "
                         f"says system_prompt={config.system_prompt!r}; set the config to {trained_with!r}")
    prompt_text = system_prompt(config.system_prompt)
    # ---------------------------------------------------------------- mesh, model, optimizer
    mesh = mesh_lib.make_mesh(config.mesh_shape)
    tx, schedule = make_optimizer(config, rl.steps)
    model = load_hf(init_dir, mesh=mesh, freeze_vision=config.freeze_vision)
    processor = Qwen25VLProcessor(config.tokenizer_dir or init_dir)
    graphdef, _, _, param_specs = split_model(model, config)
    model_def = ModelDef(graphdef, model.config, config.lora_rank, config.lora_alpha)
    key = jax.random.key(config.seed)
    state = state_from_model(model, config, tx, key)
    shardings = mesh_lib.named(mesh, state_specs(state, param_specs, tx, config))
    state = jax.device_put(state, shardings)
    del model
    # ---------------------------------------------------------------- restore
    ckpt = Checkpointer(workdir, config.keep_checkpoints)
    start = 0
    if ckpt.latest_step is not None:
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
        state, _, _, start = ckpt.restore(abstract_with_shardings(abstract, shardings))
        log.info("resumed GRPO from %s at step %d", ckpt.directory, start)
    # ---------------------------------------------------------------- the update step
    # The default policy never samples the multimodal placeholders (ModelPolicy); the loss scores
    # rollouts under the same distribution.
    suppressed = model_def.config.multimodal_token_ids
    train_step = make_train_step(model_def, make_grpo_loss(rl.grpo, temperature=rl.temperature, suppressed=suppressed),
                                 tx, schedule)
    step_fns: dict = {}
    layout_cache: dict = {}

    @jax.jit
    def old_logprobs(state, batch):
        policy = model_def.build(state.params, state.frozen)
        hidden = policy.hidden_states(batch["input_ids"][0], batch["attention_mask"][0], batch["pixel_values"][0],
                                      batch["image_grid_thw"][0],
                                      vision_layout=jax.tree.map(lambda x: x[0], batch["vision_layout"]))
        return chunked_token_logprobs(sampling_logits(policy, rl.temperature, suppressed), hidden,
                                      batch["targets"][0])[0][None]

    # ---------------------------------------------------------------- the loop
    writer = MetricsWriter(workdir)
    episode_config = EpisodeConfig(max_actions=rl.max_turns)
    summary: dict[str, Any] = {}
    try:
        for step in range(start, rl.steps):
            # The model's activation constraints name mesh axes: every forward runs under the mesh.
            with jax.set_mesh(mesh):
                times: dict[str, float] = {}
                t0 = time.perf_counter()
                policy = policy_factory(model_def.build(state.params, state.frozen), processor, rl,
                                        rollout_seed(rl, step))
                picked = [samples[(step * rl.prompts_per_step + i) % len(samples)] for i in range(rl.prompts_per_step)]
                episodes = [
                    Episode(prepare_image(s.image, config.image_size),
                            sample_query(s, rl.query_style, rl.seed),
                            _resize_mask(s.mask, config.image_size), config=episode_config,
                            episode_id=f"grpo-{step}-{i}-{g}")
                    for i, s in enumerate(picked) for g in range(rl.grpo.group_size)
                ]
                traces = run_agent(policy, tool, episodes, history=rl.history, system_prompt=prompt_text)
                times["time/rollout_s"] = time.perf_counter() - t0
                times["time/generation_s"] = sum(t.generate_seconds for t in traces)
                times["time/tool_s"] = sum(s.tool_seconds for e in episodes for s in e.steps)
                ctx = RewardContext(rl.reward)
                scores = [score_episode(e, rl.rewards, ctx) for e in episodes]
                advantages = np.asarray(group_advantages(
                    np.asarray([s.score for s in scores], np.float32), rl.grpo.group_size,
                    rl.grpo.normalize_std, rl.grpo.std_eps))
                examples = _turn_examples(episodes, traces, advantages, config.image_size, rl.history, prompt_text)
                batch = build_grpo_batch(examples, processor, rl.seq_buckets, pad_rows=row_multiple(
                    mesh.shape["data"] * mesh.shape["fsdp"]))
                arrays = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
                          "targets": batch.targets, "loss_mask": batch.loss_mask, "advantages": batch.advantages,
                          "row_weights": batch.row_weights,
                          "pixel_values": batch.pixel_values, "image_grid_thw": batch.image_grid_thw}
                arrays = with_vision_layout({k: v[None] for k, v in arrays.items()}, model_def.config.vision, layout_cache)
                t1 = time.perf_counter()
                arrays["old_logprobs"] = np.asarray(old_logprobs(state, arrays))
                times["time/old_logprobs_s"] = time.perf_counter() - t1
                shape_key = tuple((k, np.shape(v)) for k, v in arrays.items() if hasattr(v, "shape"))
                if shape_key not in step_fns:
                    batch_shardings = mesh_lib.named(mesh, mesh_lib.batch_specs(arrays, mesh))
                    step_fns[shape_key] = (jit_train_step(train_step, shardings, batch_shardings, mesh), batch_shardings)
                step_fn, batch_shardings = step_fns[shape_key]
                t2 = time.perf_counter()
                state, metrics = step_fn(state, to_global(arrays, batch_shardings))
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                times["time/update_s"] = time.perf_counter() - t2
                m = {**rollout_metrics(episodes, scores), **metrics, **times,
                     "sampler_vs_old_logprob_max_abs": float(np.abs(
                         (arrays["old_logprobs"][0] - batch.sampler_logprobs) * batch.loss_mask).max())}
                writer.write(step + 1, m)
                for hook in hooks:
                    hook(step + 1, m)
                log.info("grpo step %d: reward %.3f iou %.3f steps %.2f", step + 1, m["reward"], m["iou"],
                         m["steps_per_episode"])
                summary = m
                if (step + 1) % config.checkpoint_every == 0 or step + 1 == rl.steps:
                    ckpt.save(step + 1, state, {"step": step + 1}, to_dict(config))
    finally:
        writer.close()
        ckpt.close()
    return {"state": state, "model_def": model_def, "metrics": summary, "processor": processor}


def _resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    import cv2

    return cv2.resize(mask.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST) > 0
