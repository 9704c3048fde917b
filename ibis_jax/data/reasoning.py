"""Reasoning text for synthesized turns: templates over oracle facts, phrased as seen on the overlay.

The paper had a large teacher model write each step's reasoning from the oracle's facts (ground
truth, missed and excess regions, the right next action) while sounding as if it only looked at
the overlay (docs/design.md section 3). We compute the same facts (:class:`StepFacts`: where the error
region lies on a 3x3 grid of the image, its size relative to the target, which error dominates,
how much of the target the mask covers) and fill varied templates. A teacher hook
(:data:`TeacherFn`) receives the facts and the template draft and may return any text instead.

Never mentioned: the ground truth, IoU numbers, the click rule. Those are oracle knowledge a policy
looking at the overlay cannot have.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
from scipy import ndimage

_GRID = (
    ("upper-left", "top", "upper-right"),
    ("left", "centre", "right"),
    ("lower-left", "bottom", "lower-right"),
)


def location_words(row: float, col: float, height: int, width: int) -> str:
    """The 3x3 grid cell of a point: ``"upper-left"``, ``"top"``, ..., ``"centre"``, ..."""
    r = min(2, max(0, int(3 * row / max(1, height))))
    c = min(2, max(0, int(3 * col / max(1, width))))
    return _GRID[r][c]


def _in_the(location: str) -> str:
    """``"centre"`` -> ``"in the centre"``, ``"top"`` -> ``"at the top"``, ``"left"`` -> ``"on the
    left side"``, ``"upper-left"`` -> ``"in the upper-left part"``."""
    if location == "centre":
        return "in the centre"
    if location in ("top", "bottom"):
        return f"at the {location}"
    if location in ("left", "right"):
        return f"on the {location} side"
    return f"in the {location} part"


def component_at(region: np.ndarray, row: int, col: int) -> np.ndarray:
    """The 8-connected component of ``region`` (``bool [H, W]``) holding ``(row, col)``; the
    whole region if that pixel is outside it."""
    if not region[row, col]:
        return region
    labels, _ = ndimage.label(region, structure=np.ones((3, 3), dtype=bool))
    return labels == labels[row, col]


@dataclasses.dataclass(frozen=True)
class StepFacts:
    """What the oracle knows before one action; the input of templates and teachers.

    Areas are pixel counts; ``region_*`` describe the connected error region the click goes into
    (missed target for a positive click, excess for a negative one).
    """

    step_index: int
    target: str
    modality: str
    action: str  # "positive" | "negative" | "terminate"
    kind: str  # "oracle" | "wrong" | "correction" | "first" | "final" | "absent"
    height: int
    width: int
    target_area: int
    mask_area: int
    missed_area: int  # FN: target not covered
    excess_area: int  # FP: covered, not target
    coverage: float  # |mask & target| / |target| (0 when no target)
    iou: float
    region_area: int = 0
    region_location: str = ""
    click_location: str = ""
    target_location: str = ""
    reached: bool = True  # terminate: the stop IoU was reached (vs. budget or no progress)
    wrong_effect: str = ""  # correction: "excess" | "missed" | "none" (what the wrong click did)
    wrong_location: str = ""


# A teacher receives the facts and the template's draft and returns the reasoning to use.
TeacherFn = Callable[[StepFacts, str], str]


def compute_facts(
    gt: np.ndarray,
    mask: np.ndarray,
    *,
    step_index: int,
    target: str,
    modality: str,
    action: str,
    kind: str = "oracle",
    click: tuple[int, int] | None = None,
    reached: bool = True,
    wrong_effect: str = "",
    wrong_location: str = "",
) -> StepFacts:
    """Facts for one action from ground truth and current mask (``bool [H, W]``); ``click`` is
    ``(row, col)`` for click actions."""
    gt = np.asarray(gt, dtype=bool)
    mask = np.asarray(mask, dtype=bool)
    height, width = gt.shape
    fn, fp = gt & ~mask, mask & ~gt
    target_area = int(gt.sum())
    inter = int((gt & mask).sum())
    union = int((gt | mask).sum())
    region_area, region_loc, click_loc = 0, "", ""
    if click is not None:
        row, col = click
        click_loc = location_words(row, col, height, width)
        region = component_at(fn if action == "positive" else fp, row, col)
        region_area = int(region.sum())
        if region_area:
            rows, cols = np.nonzero(region)
            region_loc = location_words(rows.mean(), cols.mean(), height, width)
        else:
            region_loc = click_loc
    target_loc = ""
    if target_area:
        rows, cols = np.nonzero(gt)
        target_loc = location_words(rows.mean(), cols.mean(), height, width)
    return StepFacts(
        step_index=step_index, target=target, modality=modality, action=action, kind=kind,
        height=height, width=width, target_area=target_area, mask_area=int(mask.sum()),
        missed_area=int(fn.sum()), excess_area=int(fp.sum()),
        coverage=inter / target_area if target_area else 0.0,
        iou=inter / union if union else 1.0,
        region_area=region_area, region_location=region_loc, click_location=click_loc,
        target_location=target_loc, reached=reached, wrong_effect=wrong_effect, wrong_location=wrong_location,
    )


def _size_of_region(facts: StepFacts) -> str:
    frac = facts.region_area / max(1, facts.target_area)
    return "small" if frac < 0.05 else "moderate" if frac < 0.2 else "large"


def _size_of_target(facts: StepFacts) -> str:
    frac = facts.target_area / max(1, facts.height * facts.width)
    return "small" if frac < 0.02 else "medium-sized" if frac < 0.15 else "large"


def _coverage_words(facts: StepFacts) -> str:
    c = facts.coverage
    return "only a small part" if c < 0.3 else "roughly half" if c < 0.6 else "most" if c < 0.85 else "nearly all"


def _if_dominant(error: float, other: float, sentence: str) -> str:
    """``sentence`` when ``error`` is more than twice the ``other`` error, else nothing."""
    return sentence if error > 2 * other else ""


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def template_reasoning(facts: StepFacts, rng: np.random.Generator) -> str:
    """The template reasoning for one action (see the module docstring)."""
    t = facts.target
    if facts.kind == "absent":
        return _pick(rng, (
            f"I look over the whole image for the {t}, but no structure here has its appearance. "
            "There is nothing to segment, so I stop without placing a point.",
            f"Scanning the image, I cannot find the {t} anywhere. No point is needed; the answer is that it is absent.",
        ))
    if facts.kind == "first":
        size, where = _size_of_target(facts), _in_the(facts.target_location)
        return _pick(rng, (
            f"No mask is shown yet. The {t} appears as a {size} structure {where} of the image. "
            "I place a positive point well inside it, on a clearly visible part, to start the mask.",
            f"There is no mask so far. I can see the {t} {where}; it is {size}. "
            "A positive point near its centre gives the tool a reliable seed.",
            f"Nothing is segmented yet. The {t} lies {where} and looks {size}. "
            "I start with a positive point inside it.",
        ))
    if facts.kind == "wrong":
        where = _in_the(facts.click_location)
        if facts.action == "positive":
            return f"The mask seems to miss part of the {t} {where}. I add a positive point there."
        return f"The mask seems to cover tissue that is not the {t} {where}. I place a negative point there."
    if facts.kind == "correction":
        where = _in_the(facts.wrong_location or facts.region_location)
        if facts.wrong_effect == "excess":
            effect = f"the mask now spreads over tissue {where} that is not the {t}"
        elif facts.wrong_effect == "missed":
            effect = f"the mask lost part of the {t} {where}"
        else:
            effect = "it did not help the mask"
        fix = "a negative point to remove that region" if facts.action == "negative" else "a positive point to bring that part back"
        if facts.wrong_effect == "none":
            fix = "a " + facts.action + " point where the mask is actually wrong, " + _in_the(facts.region_location)
        return _pick(rng, (
            f"My previous point was a mistake: {effect}. I correct it with {fix}.",
            f"Looking at the new mask, the last point was misplaced: {effect}. I fix this with {fix}.",
        ))
    if facts.kind == "final":
        if facts.reached:
            return _pick(rng, (
                f"The green mask now follows the boundary of the {t} closely, with no visible missed part "
                "or spill-over. The segmentation is complete.",
                f"The mask covers the {t} and stays inside its outline; only negligible border differences "
                "remain. No further point is needed.",
                f"Comparing the overlay with the {t}, the mask fits well. I finish here.",
            ))
        spill = (
            ", though it still reaches over the boundary in places"
            if facts.excess_area > 0.1 * max(1, facts.target_area) else ""
        )
        return _pick(rng, (
            f"The mask covers {_coverage_words(facts)} of the {t}{spill}. The remaining differences are "
            "along the boundary, where further points would barely change the mask, so I stop here.",
            f"The mask now captures {_coverage_words(facts)} of the {t}{spill}; more points are unlikely to "
            "improve it noticeably. I finish.",
        ))
    where, size = _in_the(facts.region_location), _size_of_region(facts)
    cover = _coverage_words(facts)
    if facts.action == "positive":
        dominance = _if_dominant(facts.missed_area, facts.excess_area,
                                 " The missing area is a bigger problem than any excess.")
        return _pick(rng, (
            f"The green mask covers {cover} of the {t}, but a {size} part {where} is still not covered.{dominance} "
            "I add a positive point in the middle of that missed part.",
            f"The mask misses a {size} region of the {t} {where}.{dominance} "
            "A positive point there should extend the mask to include it.",
            f"Part of the {t} {where} is outside the mask; the gap is {size}. "
            "I place a positive point inside the gap.",
        ))
    dominance = _if_dominant(facts.excess_area, facts.missed_area, " The spill-over is now the main error.")
    return _pick(rng, (
        f"The green mask spreads beyond the {t}: a {size} region {where} is covered but is not part of it.{dominance} "
        "I place a negative point there to remove it.",
        f"The mask covers {cover} of the {t} but also leaks {where} into surrounding tissue ({size} region).{dominance} "
        "A negative point in the leaked area should cut it away.",
        f"There is a {size} false region {where}, outside the {t}. I remove it with a negative point.",
    ))


def template_answer(facts: StepFacts, rng: np.random.Generator) -> str:
    """The ``<answer>`` after a terminate: what was segmented and where (no numbers from the GT)."""
    if facts.kind == "absent":
        return f"No {facts.target} is visible in this image, so nothing was segmented."
    share = facts.mask_area / max(1, facts.height * facts.width)
    where = _in_the(facts.target_location)
    return _pick(rng, (
        f"The {facts.target} is segmented; it lies {where} of the image and covers about {100 * share:.0f}% of it.",
        f"Segmented the {facts.target} {where} of the image (about {100 * share:.0f}% of the image area).",
    ))
