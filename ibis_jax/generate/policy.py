"""The Flax model as the agent loop's `Policy`: messages -> chat-template ids + images -> sampler.

Prompt ids: the chat template of the request's messages (`to_chat`), images expanded to one
`<|image_pad|>` per visual token. Assistant messages that carry the sampler's `token_ids` enter the
prompt as those ids (never decoded and re-encoded): the template's text for that turn is split
out and the ids are spliced in (a trailing eos is dropped, the template writes `<|im_end|>` itself).
Special tokens delimit the parts, so tokenizing them apart equals tokenizing the whole.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from ibis_jax.agent.conversation import HistoryMode, Message, to_chat
from ibis_jax.agent.loop import PolicyTurn, TurnRequest
from ibis_jax.agent import prompts
from ibis_jax.agent.prompts import SYSTEM_PROMPT
from ibis_jax.generate.sampler import Sampler, SamplerConfig
from ibis_jax.models.qwen2_5_vl.processor import IMAGE_PAD, Qwen25VLProcessor

_SLOT = "\x00ASSISTANT_{}\x00"


def encode_messages(messages: Sequence[Message], processor: Qwen25VLProcessor, eos_ids: Sequence[int] = ()
                    ) -> tuple[np.ndarray, list[np.ndarray]]:
    """(prompt ids int32 [S] with the generation prompt, the user images in order)."""
    spliced: dict[int, tuple[int, ...]] = {}
    chat_messages = []
    for i, m in enumerate(messages):
        if m.role == "assistant" and m.token_ids is not None:
            ids = tuple(m.token_ids)
            while ids and ids[-1] in eos_ids:
                ids = ids[:-1]
            spliced[i] = ids
            m = Message("assistant", _SLOT.format(i))
        chat_messages.append(m)
    text = processor.render(to_chat(chat_messages), add_generation_prompt=True)
    images = [m.image for m in messages if m.image is not None]
    if images:
        _, grid = processor.images(images)
        text = processor.expand_image_pads(text, grid)
    elif IMAGE_PAD in text:
        raise ValueError(f"a message text contains {IMAGE_PAD} but no message has an image")
    tok = processor.tokenizer
    pieces: list[np.ndarray] = []
    rest = text
    for i, ids in spliced.items():
        before, rest = rest.split(_SLOT.format(i), 1)
        pieces += [np.asarray(tok.encode(before, add_special_tokens=False), np.int32), np.asarray(ids, np.int32)]
    pieces.append(np.asarray(tok.encode(rest, add_special_tokens=False), np.int32))
    return np.concatenate(pieces), images


class ModelPolicy:
    """`Policy` over a `Qwen25VL` with the KV-cache sampler.

    history: how the caller builds the conversation ("none" | "full"); kept for the record (the
    requests already carry the messages). The model's multimodal placeholder ids are never
    sampled (unless `sampler_config.suppress_token_ids` names others). seed: the PRNG seed; each `generate` call draws a fresh
    key from it, so a run is reproducible. Each request is encoded afresh (a cached continuation
    for history "full" is `Sampler.extend`; see the README).
    """

    def __init__(self, model, processor: Qwen25VLProcessor, sampler_config: SamplerConfig = SamplerConfig(), *,
                 history: HistoryMode = "none", mesh: jax.sharding.Mesh | None = None, seed: int = 0,
                 system_prompt: str = SYSTEM_PROMPT, prefix_cache: bool = False):
        self.processor = processor
        self.history = history
        self.system_prompt = system_prompt  # run_agent builds the conversations with it
        # Encode the system turn, shared by every prompt, once and keep its cache (Sampler.prefill_shared).
        self.prefix_cache = prefix_cache
        self._im_start = processor.tokenizer.convert_tokens_to_ids("<|im_start|>")
        if not sampler_config.suppress_token_ids:
            sampler_config = dataclasses.replace(sampler_config,
                                                 suppress_token_ids=model.config.multimodal_token_ids)
        self.sampler = Sampler(model, processor.tokenizer, sampler_config, mesh=mesh)
        self._key = jax.random.key(seed)
        self._calls = 0

    @classmethod
    def from_pretrained_dir(cls, directory: str, *, sampler_config: SamplerConfig | None = None,
                            **kwargs: Any) -> "ModelPolicy":
        """Load an HF Qwen2.5-VL directory (weights + tokenizer) as a greedy evaluation policy, with
        the system prompt the directory records (`agent.prompts.AGENT_FILE`; none: the full one)."""
        from ibis_jax.models.qwen2_5_vl import load_hf

        kwargs.setdefault("system_prompt", prompts.system_prompt(prompts.load_agent_prompt(directory)))
        return cls(load_hf(directory), Qwen25VLProcessor(directory), sampler_config or SamplerConfig(), **kwargs)

    @classmethod
    def for_rollouts(cls, model, processor: Qwen25VLProcessor, *, temperature: float = 1.0,
                     max_new_tokens: int = 256, history: HistoryMode = "none", seed: int = 0,
                     **kwargs: Any) -> "ModelPolicy":
        """A sampling policy for GRPO rollouts (no truncation: log-probs are the model's)."""
        cfg = SamplerConfig(max_new_tokens=max_new_tokens, temperature=temperature)
        return cls(model, processor, cfg, history=history, seed=seed, **kwargs)

    def generate(self, requests: Sequence[TurnRequest]) -> list[PolicyTurn]:
        if not requests:
            return []
        prompts, images = [], []
        for r in requests:
            ids, imgs = encode_messages(r.messages, self.processor, self.sampler.eos_ids)
            prompts.append(ids)
            images += imgs
        pixel_values = grid = None
        if images:
            pixel_values, grid = self.processor.images(images)
        key = jax.random.fold_in(self._key, self._calls)
        self._calls += 1
        prefix = self._shared_prefix(prompts) if self.prefix_cache else 0
        completions = self.sampler.generate([p[prefix:] for p in prompts], pixel_values, grid, key=key,
                                            prefix=prompts[0][:prefix] if prefix else None)
        return [PolicyTurn(c.text, c.token_ids, c.logprobs, c.stop_reason) for c in completions]

    def _shared_prefix(self, prompts: Sequence[np.ndarray]) -> int:
        """Length of the first turn (up to the second ``<|im_start|>``) when every prompt starts
        with the same one, else 0."""
        first = prompts[0]
        starts = np.flatnonzero(first == self._im_start)
        if len(starts) < 2:
            return 0
        n = int(starts[1])
        return n if all(len(p) > n and np.array_equal(p[:n], first[:n]) for p in prompts[1:]) else 0
