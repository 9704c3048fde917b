"""The one conversation encoder: messages -> token ids, loss weights, the policy-token mask and the
prepared images. SFT samples, the rollout policy and the GRPO batch all encode through
:func:`encode_conversation`, so the ids a model is trained on are the ids it was prompted with.

The Qwen2.5-VL chat template is rendered piece by piece (special tokens delimit the pieces, so
encoding them apart equals encoding the rendered whole):

    <|im_start|>{role}\\n[<|vision_start|><|image_pad|> x n<|vision_end|>]{text}<|im_end|>\\n
    <|im_start|>assistant\\n{assistant text}<|im_end|>\\n
    [<|im_start|>assistant\\n]                          (add_generation_prompt)

An assistant message given as text (SFT) is tokenized, and its text and ``<|im_end|>`` carry the
message's ``loss_weight``. An assistant message given as ``token_ids`` (what the sampler drew) is
spliced in exactly as sampled, never decoded and re-encoded; those ids are the policy's tokens
(``policy_token_mask``). A turn that ended on EOS already holds its end token, so only the
newline follows; a turn cut at a stop string gets the template's ``<|im_end|>`` (not a policy
token). No turn ever carries two end tokens.

Every image is resized to the square ``image_size`` (a multiple of 28) before encoding, the one
image preparation of training and inference alike: normalised click coordinates (x = col / width)
keep their meaning under a plain resize, and every image has the same ``(image_size / 28)^2``
visual tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from ibis_jax.agent.conversation import Message
from ibis_jax.models.qwen2_5_vl.processor import IMAGE_PAD, image_tokens, prepare_image

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"


@dataclasses.dataclass
class EncodedConversation:
    """One encoded conversation; every array is ``[S]``.

    input_ids int32; loss_weights float32: the SFT weight of token i as a *target* (the assistant
    text turns' weight, 0 elsewhere); policy_token_mask bool: token i was sampled by the policy
    (assistant turns given as ids); action_mask bool: token i lies in the ``<action>`` block of a
    weighted text turn; images: RGB uint8 ``[image_size, image_size, 3]`` in order of appearance.
    """

    input_ids: np.ndarray
    loss_weights: np.ndarray
    policy_token_mask: np.ndarray
    action_mask: np.ndarray
    images: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.input_ids)


def _action_span(text: str) -> tuple[int, int]:
    start, end = text.find("<action>"), text.find("</action>")
    return (start, end + len("</action>")) if start >= 0 and end >= 0 else (0, 0)


class _Builder:
    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.ids: list[np.ndarray] = []
        self.weights: list[np.ndarray] = []
        self.policy: list[np.ndarray] = []
        self.actions: list[np.ndarray] = []

    def text(self, text: str, weight: float = 0.0, action_span: tuple[int, int] = (0, 0)) -> None:
        offsets = action_span != (0, 0)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=offsets)
        tok = np.asarray(enc["input_ids"], np.int32)
        if offsets:
            off = np.asarray(enc["offset_mapping"]).reshape(-1, 2)
            action = (off[:, 0] < action_span[1]) & (off[:, 1] > action_span[0])
        else:
            action = np.zeros(len(tok), bool)
        self._add(tok, np.full(len(tok), weight, np.float32), np.zeros(len(tok), bool), action)

    def sampled(self, ids: Sequence[int]) -> None:
        tok = np.asarray(ids, np.int32)
        self._add(tok, np.zeros(len(tok), np.float32), np.ones(len(tok), bool), np.zeros(len(tok), bool))

    def _add(self, ids, weights, policy, actions) -> None:
        self.ids.append(ids)
        self.weights.append(weights)
        self.policy.append(policy)
        self.actions.append(actions)

    def build(self, images: list[np.ndarray]) -> EncodedConversation:
        cat = lambda parts, dtype: np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)
        return EncodedConversation(cat(self.ids, np.int32), cat(self.weights, np.float32),
                                   cat(self.policy, bool), cat(self.actions, bool), images)


def encode_conversation(
    messages: Sequence[Message],
    tokenizer: Any,
    image_size: int,
    *,
    add_generation_prompt: bool = False,
    eos_ids: Sequence[int] = (),
    patch_size: int = 14,
) -> EncodedConversation:
    """Encodes ``messages`` (see the module docstring).

    Args:
      tokenizer: the model's Hugging Face tokenizer (``processor.tokenizer``).
      image_size: every user image is resized to ``image_size`` square.
      add_generation_prompt: end with ``<|im_start|>assistant\\n`` (a prompt for the policy).
      eos_ids: the ids that end a sampled turn (the sampler's); a turn given as ids that ends on
        one of them gets no second ``<|im_end|>``.
      patch_size: the vision tower's patch side (14 Qwen2.5-VL, 16 Qwen3-VL; merged 2 x 2), so
        ``image_size`` is a multiple of twice it and an image takes ``(image_size / 2 patch)^2`` tokens.
    """
    pads = IMAGE_PAD * image_tokens(image_size, patch_size)
    out = _Builder(tokenizer)
    images: list[np.ndarray] = []
    eos = set(int(i) for i in eos_ids) | set(tokenizer.convert_tokens_to_ids([IM_END]))
    for m in messages:
        if m.role == "assistant":
            out.text(f"{IM_START}assistant\n")
            if m.token_ids is not None:
                ids = [int(i) for i in m.token_ids]
                out.sampled(ids)
                out.text("\n" if ids and ids[-1] in eos else f"{IM_END}\n")
            else:
                span = _action_span(m.text) if m.loss_weight > 0 else (0, 0)
                out.text(m.text + IM_END, m.loss_weight, span)
                out.text("\n")
            continue
        head = f"{IM_START}{m.role}\n"
        if m.image is not None:
            images.append(prepare_image(m.image, image_size, multiple=2 * patch_size))
            head += VISION_START + pads + VISION_END
        out.text(head + m.text + IM_END + "\n")
    if add_generation_prompt:
        out.text(f"{IM_START}assistant\n")
    return out.build(images)
