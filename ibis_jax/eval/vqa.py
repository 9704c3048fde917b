"""Closed-ended VQA evaluation (SLAKE / VQA-RAD / PathVQA style), exact-match accuracy.

Input: a JSON list of ``{"image": ..., "question": ..., "answer": ...}`` (``img_name`` /
``image_name`` are accepted for ``image``, as SLAKE and VQA-RAD name it). Images are resolved
against ``image_root`` (default: the JSON file's folder). Only closed-ended questions are kept:
``answer_type`` ``CLOSED`` where the field exists, otherwise yes/no answers.

Each question is one agent episode with no ground-truth mask: the question is the query, the
policy may click (the tool runs) and ends with ``Terminate`` and an ``<answer>``; that answer is
compared with the reference after :func:`normalize_answer`. A missing answer counts as wrong.
"""

from __future__ import annotations

import dataclasses
import json
import string
import time
from collections import Counter
from pathlib import Path
from typing import Any

from ibis_jax.agent.conversation import HistoryMode
from ibis_jax.agent.episode import Episode, EpisodeConfig
from ibis_jax.agent.loop import Policy, run_agent
from ibis_jax.data.records import write_json_atomic
from ibis_jax.data.sources.base import image_to_rgb, read_image_file
from ibis_jax.fileio import atomic_write_text
from ibis_jax.tools.protocol import SegmentationTool

IMAGE_KEYS = ("image", "img_name", "image_name", "img_id")
_ARTICLES = {"a", "an", "the"}


@dataclasses.dataclass(frozen=True)
class VqaItem:
    image: Path
    question: str
    answer: str
    answer_type: str = "CLOSED"
    qid: str = ""


def normalize_answer(text: str | None) -> str:
    """Lower case, punctuation to spaces, articles dropped, whitespace collapsed."""
    if text is None:
        return ""
    text = str(text).lower().translate(str.maketrans({c: " " for c in string.punctuation}))
    return " ".join(w for w in text.split() if w not in _ARTICLES)


def exact_match(prediction: str | None, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference) and bool(normalize_answer(reference))


def load_vqa(path: str | Path, image_root: str | Path | None = None, *, closed_only: bool = True) -> list[VqaItem]:
    """Reads a VQA JSON file into items (see the module docstring)."""
    path = Path(path)
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read VQA JSON ({e})") from None
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a JSON list of {{'image', 'question', 'answer'}} objects")
    root = Path(image_root) if image_root else path.parent
    items = []
    for i, entry in enumerate(entries):
        key = next((k for k in IMAGE_KEYS if k in entry), None)
        if key is None or "question" not in entry or "answer" not in entry:
            raise ValueError(f"{path}: entry {i} needs 'image' (or img_name), 'question' and 'answer' fields")
        answer = str(entry["answer"])
        kind = str(entry.get("answer_type", "")).upper()
        closed = kind == "CLOSED" if kind else normalize_answer(answer) in ("yes", "no")
        if closed_only and not closed:
            continue
        items.append(VqaItem(root / str(entry[key]), str(entry["question"]), answer, kind or "CLOSED",
                             str(entry.get("qid", entry.get("id", i)))))
    return items


def evaluate_vqa(
    policy: Policy,
    tool: SegmentationTool,
    items: list[VqaItem],
    *,
    history: HistoryMode | None = None,
    max_steps: int = 20,
    batch_size: int = 8,
    out_dir: str | Path | None = None,
    policy_name: str = "policy",
) -> dict[str, Any]:
    """Exact-match accuracy of the policy's final answers; writes ``vqa_metrics.json`` and
    ``vqa_cases.jsonl`` under ``out_dir`` when given."""
    if not getattr(policy, "reads_messages", True):
        raise ValueError("the oracle clicks from a ground-truth mask and cannot answer questions; "
                         "evaluate VQA with a model policy (--policy PATH)")
    start = time.perf_counter()
    cases = []
    for offset in range(0, len(items), max(1, batch_size)):
        batch = items[offset: offset + max(1, batch_size)]
        episodes = [Episode(image_to_rgb(read_image_file(it.image), it.image), it.question,
                            config=EpisodeConfig(max_actions=max_steps), episode_id=f"vqa-{offset + i}")
                    for i, it in enumerate(batch)]
        run_agent(policy, tool, episodes, history=history)
        for item, episode in zip(batch, episodes):
            prediction = next((s.answer for s in reversed(episode.steps) if s.answer is not None), None)
            cases.append({"qid": item.qid, "image": str(item.image), "question": item.question,
                          "answer": item.answer, "prediction": prediction, "correct": exact_match(prediction, item.answer),
                          "clicks": len(episode.clicks), "end_reason": episode.end_reason})
    by_answer = Counter(normalize_answer(c["answer"]) for c in cases)
    metrics = {
        "policy": policy_name, "questions": len(cases),
        "accuracy": (sum(c["correct"] for c in cases) / len(cases)) if cases else float("nan"),
        "answered": sum(c["prediction"] is not None for c in cases),
        "reference_answers": dict(by_answer.most_common(10)),
        "seconds": round(time.perf_counter() - start, 2),
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "vqa_cases.jsonl", "".join(json.dumps(case) + "\n" for case in cases))
        write_json_atomic(out / "vqa_metrics.json", metrics)
    return metrics

