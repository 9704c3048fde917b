"""The tiny offline model kit: a small Qwen-style tokenizer/processor directory and the tiny
config whose token ids match it.

The CPU trainers (``configs/tiny_cpu.py``: a tokenizer fitted to the dataset's texts) and the tests
use it to get a complete local "model directory" without the hub:

    tok_dir = make_tokenizer_dir(tmp / "tok")              # tokenizer + chat template + processor
    cfg = tiny_config(tok_dir)                             # Qwen25VLConfig with matching token ids

Random Hugging Face models for parity tests and benchmarks live in ``testing.py``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable

from .config import Qwen25VLConfig

# Qwen2/2.5-VL special tokens in their released order (ids follow the base vocabulary here).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# The Qwen2.5-VL chat template (system default, text and image parts, generation prompt).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = """\
The policy looks at the image and clicks on the target. A positive point adds a region; a
negative point removes a region. Segment the liver. Segment the left kidney. Is there a tumor?
If yes, segment it. Structure: spleen. The mask missed a part of the object, place another point.
<think>
The green mask covers most of the target but misses the lower part.
</think>
<action>
Positive Point (0.4512, 0.4238)
</action>
<action>
Negative Point (0.1250, 0.9000)
</action>
<action>
Terminate
</action>
<answer>
The liver is segmented.
</answer>
You are a helpful assistant. What is shown in this picture? Describe the image in one sentence.
0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 0.5 0.25 0.75 0.0001 0.9999 1.0000
the of and to in is it that this with for on as are was be by at an or from not but all
CT MRI X-ray ultrasound pathology dermoscopy endoscopy fundus OCT brain heart lung kidney
"""


# The agent grammar's tags with the newlines around them (docs/design.md section 2), as one token each.
GRAMMAR_TOKENS = ("<think>\n", "\n</think>\n", "<action>\n", "\n</action>", "\n<answer>\n", "\n</answer>")


def build_tokenizer(vocab_size: int = 400, corpus: Iterable[str] = (), grammar_tokens: bool = False):
    """A byte-level BPE `tokenizers.Tokenizer` trained on a small built-in corpus (plus `corpus`,
    e.g. a dataset's texts, so that they encode compactly), then Qwen's special tokens (appended
    after the BPE vocabulary). Encodes any text (bytes fall back).

    grammar_tokens: also add :data:`GRAMMAR_TOKENS` as ordinary (non-special) added tokens, so a
    canonical turn's layout is a chain of single tokens (``"\\n</think>\\n"`` -> ``"<action>\\n"`` ->
    ``"Positive"``): a two-layer model then learns the layout from next-token statistics alone,
    where with the tags split into ``</``, ``think``, ``>``, newline it must first learn to look
    several tokens back (the tiny CPU model did not, in 300 steps). They decode to their text, so
    parsing is unchanged.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # Digits one by one, as Qwen2's tokenizer splits them: coordinates are learnable digit-wise.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [line for text in (_CORPUS, *corpus) for line in text.splitlines()]
    tok.train_from_iterator(lines, trainer=trainer)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    if grammar_tokens:
        tok.add_tokens([AddedToken(t, single_word=False, lstrip=False, rstrip=False, normalized=False, special=False)
                        for t in GRAMMAR_TOKENS])
    return tok


def make_tokenizer_dir(
    directory: str | os.PathLike,
    *,
    vocab_size: int = 400,
    corpus: Iterable[str] = (),
    grammar_tokens: bool = False,
    min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 1280,
) -> str:
    """Write an HF tokenizer (tokenizer.json, tokenizer_config.json with the chat template) and
    a Qwen2-VL `preprocessor_config.json` into `directory` (`grammar_tokens`: see
    :func:`build_tokenizer`). Needs transformers, not torch."""
    from transformers import PreTrainedTokenizerFast

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(vocab_size, corpus, grammar_tokens),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in ("<|im_end|>", "<|endoftext|>")],
        model_max_length=32768,
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
    )
    fast.save_pretrained(directory)
    with open(os.path.join(directory, "chat_template.jinja"), "w") as f:
        f.write(CHAT_TEMPLATE)
    from .processor import write_processor_config

    write_processor_config(directory, min_pixels=min_pixels, max_pixels=max_pixels)
    return directory


def special_token_ids(tokenizer_dir: str | os.PathLike) -> dict[str, int]:
    """The config fields image_token_id / video_token_id / vision_start_token_id /
    vision_end_token_id as assigned by the tokenizer in `tokenizer_dir`."""
    with open(os.path.join(os.fspath(tokenizer_dir), "tokenizer.json")) as f:
        added = {t["content"]: t["id"] for t in json.load(f)["added_tokens"]}
    return {
        "image_token_id": added["<|image_pad|>"],
        "video_token_id": added["<|video_pad|>"],
        "vision_start_token_id": added["<|vision_start|>"],
        "vision_end_token_id": added["<|vision_end|>"],
    }


def tiny_config(tokenizer_dir: str | os.PathLike | None = None, **overrides: Any) -> Qwen25VLConfig:
    """`Qwen25VLConfig.tiny()` with the special token ids of `tokenizer_dir` (if given) and a
    vocabulary that holds all of its tokens (`ibis_jax.models.preset_config("tiny", ...)`)."""
    from ibis_jax.models import preset_config

    return preset_config("tiny", tokenizer_dir, **overrides)


def tokenizer_size(tokenizer_dir: str | os.PathLike) -> int:
    """Number of token ids `tokenizer.json` in `tokenizer_dir` can produce (BPE vocab + added)."""
    with open(os.path.join(os.fspath(tokenizer_dir), "tokenizer.json")) as f:
        data = json.load(f)
    ids = list(data["model"]["vocab"].values()) + [t["id"] for t in data["added_tokens"]]
    return max(ids) + 1


