"""The Flax model as the agent loop's `Policy`: messages -> the one conversation encoder ->
the sampler.

Prompt ids come from :func:`ibis_jax.agent.encoding.encode_conversation` (the encoder SFT and the
GRPO batch use): assistant turns that carry the sampler's ``token_ids`` enter the prompt as those
ids, never decoded and re-encoded, and every image is resized to the policy's training
``image_size`` (``AgentSettings``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from ibis_jax.agent.encoding import encode_conversation
from ibis_jax.agent.loop import PolicyTurn, TurnRequest
from ibis_jax.agent.settings import HF_DEFAULTS, AgentSettings, load_agent_settings
from ibis_jax.generate.sampler import Sampler, SamplerConfig
from ibis_jax.models import family, image_multiple


class ModelPolicy:
    """`Policy` over a `Qwen25VL` or `Qwen3VL` (with its family's processor) and the KV-cache sampler.

    settings: what the model was trained to see (system prompt, image size, overlay, history);
    `run_agent` builds the conversations with them. The model's multimodal placeholder ids are never
    sampled (unless `sampler_config.suppress_token_ids` names others). seed: the PRNG seed; each `generate` call draws a fresh
    key from it, so a run is reproducible. Each request is encoded afresh (a cached continuation
    for history "full" is `Sampler.extend`; see the README).
    """

    def __init__(self, model, processor, sampler_config: SamplerConfig = SamplerConfig(), *,
                 settings: AgentSettings = HF_DEFAULTS, mesh: jax.sharding.Mesh | None = None, seed: int = 0,
                 prefix_cache: bool = False):
        self.processor = processor
        self.settings = settings
        self.patch_size = model.config.vision.patch_size
        if settings.image_size % image_multiple(model.config):
            raise ValueError(f"agent settings image_size {settings.image_size}: {type(model).__name__} needs a multiple "
                             f"of {image_multiple(model.config)} (patch size x 2 x 2 merge); set image_size in the "
                             "model directory's agent settings or the config")
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
                            dtype: str = "float32", mesh_shape: tuple[int, int, int] | None = None,
                            **kwargs: Any) -> "ModelPolicy":
        """Load an HF Qwen2.5-VL or Qwen3-VL directory (weights + tokenizer) as a greedy evaluation policy, with
        the agent settings the directory records (`agent.settings.AGENT_FILE`; none: HF defaults).

        dtype: parameters and compute ("bfloat16" halves the memory); mesh_shape: (data, fsdp,
        tensor) over this process's devices (e.g. (1, 1, 4): tensor-parallel), each tensor loaded
        into its shard; None: one device."""
        from jax.sharding import Mesh

        from ibis_jax.models.attention import resolve_backend
        from ibis_jax.models.qwen2_5_vl import ShardingConfig

        mesh = None
        if mesh_shape:
            devices = jax.local_devices()
            if int(np.prod(mesh_shape)) != len(devices):
                raise ValueError(f"mesh_shape {tuple(mesh_shape)} needs {int(np.prod(mesh_shape))} devices, this process "
                                 f"has {len(devices)}")
            mesh = Mesh(np.asarray(devices).reshape(mesh_shape), ("data", "fsdp", "tensor"))
        jdtype = {"float32": jax.numpy.float32, "bfloat16": jax.numpy.bfloat16}[dtype]
        platform = devices[0].platform if mesh is not None else jax.default_backend()
        fam = family(directory)
        model = fam.load_hf(directory, jdtype, mesh, compute_dtype=jdtype, attention=resolve_backend("auto", platform),
                        sharding=ShardingConfig.fsdp_tensor() if mesh is not None else ShardingConfig.no_sharding())
        kwargs.setdefault("settings", load_agent_settings(directory))
        return cls(model, fam.processor(directory), sampler_config or SamplerConfig(), mesh=mesh, **kwargs)

    @classmethod
    def for_rollouts(cls, model, processor, *, temperature: float = 1.0,
                     max_new_tokens: int = 256, seed: int = 0, **kwargs: Any) -> "ModelPolicy":
        """A sampling policy for GRPO rollouts (no truncation: log-probs are the model's)."""
        cfg = SamplerConfig(max_new_tokens=max_new_tokens, temperature=temperature)
        return cls(model, processor, cfg, seed=seed, **kwargs)

    def encode(self, messages):
        """The prompt of one request, exactly as the sampler gets it (``EncodedConversation``)."""
        return encode_conversation(messages, self.processor.tokenizer, self.settings.image_size,
                                   add_generation_prompt=True, eos_ids=self.sampler.eos_ids, patch_size=self.patch_size)

    def generate(self, requests: Sequence[TurnRequest]) -> list[PolicyTurn]:
        if not requests:
            return []
        prompts, images = [], []
        for r in requests:
            enc = self.encode(r.messages)
            prompts.append(enc.input_ids)
            images += enc.images
        pixel_values = grid = None
        if images:
            pixel_values, grid = self.processor.prepared_images(images)
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
