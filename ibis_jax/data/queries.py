"""User queries in the paper's styles (docs/design.md section 2), filled with target and modality.

First-turn styles: ``direct`` ("Segment the liver in this CT scan."), ``goal`` (states what the
segmentation is for), ``polite``, ``question`` ("Is there any tumor? If yes, segment it."), and
``concise`` ("Structure: liver"). Refinement styles phrase the follow-up turn's nudge: ``check``,
``continue``, ``verify``, ``improve``. Every choice is drawn from a ``numpy`` generator, so a
seed (plus the sample id, see :func:`query_rng`) fixes the text regardless of worker order.

An absent target (empty mask) always gets the ``question`` style: only a question can be answered
with "there is none".
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ibis_jax.data.sources.base import stable_seed

QUERY_STYLES = ("direct", "goal", "polite", "question", "concise")
REFINEMENT_STYLES = ("check", "continue", "verify", "improve")

# {target}, {modality_phrase} ("this CT scan"); {Target} is the capitalised target.
_FIRST_TURN: dict[str, tuple[str, ...]] = {
    "direct": (
        "Segment the {target} in {modality_phrase}.",
        "Outline the {target} in {modality_phrase}.",
        "Delineate the {target}.",
        "Mark the full extent of the {target} in {modality_phrase}.",
    ),
    "goal": (
        "I need to measure the {target}; please produce its segmentation mask in {modality_phrase}.",
        "To assess the {target}, segment it in {modality_phrase}.",
        "For volume estimation, delineate the {target} in {modality_phrase}.",
        "I want to check the shape of the {target}. Segment it.",
    ),
    "polite": (
        "Could you please segment the {target} in {modality_phrase}?",
        "Would you kindly outline the {target} for me?",
        "Please help me delineate the {target} in {modality_phrase}.",
        "Can you mark the {target} in {modality_phrase}, please?",
    ),
    "question": (
        "Is there any {target} in {modality_phrase}? If yes, segment it.",
        "Can you find the {target} here? If it is present, segment it.",
        "Does {modality_phrase} show the {target}? If so, delineate it.",
        "Where is the {target}? If it is visible, segment it.",
    ),
    "concise": (
        "Structure: {target}",
        "Target: {target}",
        "{Target}, {modality}.",
        "Segment: {target}",
    ),
}

_REFINEMENT: dict[str, tuple[str, ...]] = {
    "check": (
        "Look at the current mask. Does it match the {target}, or does it need another point?",
        "Check the green mask against the {target}.",
    ),
    "continue": (
        "Continue refining the {target} mask if it is not finished.",
        "Keep going: refine the mask of the {target} if needed.",
    ),
    "verify": (
        "Verify whether the highlighted region covers the {target} and nothing else.",
        "Is the {target} fully and only covered by the mask?",
    ),
    "improve": (
        "Improve the mask of the {target} where it is wrong, or finish if it fits.",
        "Fix what the mask gets wrong about the {target}, if anything.",
    ),
}

_MODALITY_PHRASES = {
    "CT": "this CT scan",
    "MRI": "this MRI scan",
    "X-Ray": "this X-ray",
    "Ultrasound": "this ultrasound image",
    "Pathology": "this pathology slide",
    "Microscopy": "this microscopy image",
    "Fundus": "this fundus photograph",
    "Dermoscopy": "this dermoscopy image",
    "Endoscopy": "this endoscopy frame",
    "OCT": "this OCT scan",
}


@dataclasses.dataclass(frozen=True)
class Query:
    text: str
    style: str


def modality_phrase(modality: str) -> str:
    """``"CT"`` -> ``"this CT scan"``; unknown modalities read ``"this image"``/``"this <m> image"``."""
    if modality in _MODALITY_PHRASES:
        return _MODALITY_PHRASES[modality]
    if not modality or modality.lower() in ("unknown", "synthetic"):
        return "this image"
    return f"this {modality} image"


def query_rng(seed: int, sample_id: str) -> np.random.Generator:
    """The generator for one sample's texts: depends only on the run seed and the sample id."""
    return np.random.default_rng(stable_seed(seed, "query", sample_id))


def _fill(template: str, target: str, modality: str) -> str:
    return template.format(
        target=target, Target=target[:1].upper() + target[1:], modality=modality,
        modality_phrase=modality_phrase(modality),
    )


def _drawn(table: dict[str, tuple[str, ...]], styles: tuple[str, ...], style: str | None, what: str,
           known: tuple[str, ...], target: str, modality: str, rng: np.random.Generator) -> Query:
    """``style`` (drawn from ``styles`` when ``None``; ``known`` names the valid ones), then one of
    its templates in ``table``, drawn and filled."""
    if style is None:
        style = styles[int(rng.integers(len(styles)))]
    if style not in table:
        raise ValueError(f"unknown {what} {style!r}; choose one of {known}")
    templates = table[style]
    return Query(_fill(templates[int(rng.integers(len(templates)))], target, modality), style)


def make_query(
    target: str,
    modality: str,
    rng: np.random.Generator,
    *,
    style: str | None = None,
    absent: bool = False,
    styles: tuple[str, ...] = QUERY_STYLES,
) -> Query:
    """A first-turn query for ``target``; ``style`` fixed or drawn uniformly from ``styles``."""
    if absent:
        style = "question"
    return _drawn(_FIRST_TURN, styles, style, "query style", QUERY_STYLES, target, modality, rng)


def sample_query(sample, style: str | None = "direct", seed: int = 0) -> str:
    """The first-turn query for a ``Sample`` (a "question" query when its mask is empty),
    deterministic in (seed, sample id): evaluation and GRPO prompts use it."""
    rng = query_rng(seed, sample.sample_id)
    return make_query(sample.target, sample.modality, rng, style=style, absent=not sample.mask.any()).text


def make_refinement(target: str, modality: str, rng: np.random.Generator, *, style: str | None = None) -> Query:
    """The nudge of a refinement turn (the user turn after a mask is shown)."""
    return _drawn(_REFINEMENT, REFINEMENT_STYLES, style, "refinement style", REFINEMENT_STYLES, target, modality,
                  rng)
