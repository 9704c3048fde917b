"""The conversation text around the policy's turns, shared by SFT, rollouts and evaluation.

docs/design.md section 2: the system prompt explains the click task and the grammar; the first user turn is
the query; each later user turn restates the query, shows the new mask and asks whether it needs
more work. The wording is ours; the grammar (``<think>``, ``<action>``, ``<answer>``, four-decimal
normalised points, ``Terminate``) is the paper's and is what ``ibis_jax.agent.grammar`` parses.

The image itself is not part of these strings: the chat template puts the observation image (the
original image on turn 0, the overlay afterwards) in front of each user turn's text.
"""

from __future__ import annotations


SYSTEM_PROMPT = """\
You are a biomedical image segmentation agent. You segment the target the user asks for by \
placing points on the image, one point per turn; a segmentation tool turns all your points so \
far into a mask, which is shown to you as a green overlay on the image.

How to place points:
- If no mask is shown yet, place a positive point on a clearly visible part of the target.
- If a green mask is shown, compare it with the target. Place a positive point where the mask \
misses part of the target, or a negative point where the mask covers something that is not the \
target. Fix the largest error first.
- When the mask fits the target well, stop.

Answer format, every turn:
<think>
your reasoning about what the image and the current mask show
</think>
<action>
Positive Point (x, y)
</action>

Use "Positive Point (x, y)" to add a region and "Negative Point (x, y)" to remove one; x and y \
are the point's column and row divided by the image width and height, in [0, 1], written with \
four decimals, e.g. Positive Point (0.4512, 0.4238). Write exactly one action per turn.

To finish, write "Terminate" as the action and then summarise the result:
<think>
why the mask is complete
</think>
<action>
Terminate
</action>
<answer>
a short description of what was segmented
</answer>"""

# The same task in one line, for a small model trained from scratch: a constant 330-token preamble
# is nothing such a model can read, and it buries the query. `bench/grounding_probe.py --probes
# copy`: a fresh tiny model repeats the query's shape name with accuracy 1.00 after 300 steps
# without a system prompt, 0.82 behind the full one; the SFT model behind it named the target at
# chance (13 / 64), and with this prompt by 1,500 steps (64 / 64).
SHORT_SYSTEM_PROMPT = "Segment the requested target with points on the image; the mask is shown in green."

SYSTEM_PROMPTS = {"full": SYSTEM_PROMPT, "short": SHORT_SYSTEM_PROMPT}

REFINEMENT_TEMPLATE = """\
Original request: {query}
The image now shows the current mask in green. {nudge} \
If the mask needs more work, place one point; if it fits the target, terminate and give your answer."""


def system_prompt(name: str) -> str:
    """The text of a named system prompt (``full``: the agent instructions; ``short``: one line)."""
    if name not in SYSTEM_PROMPTS:
        raise ValueError(f"system prompt {name!r}: choose from {sorted(SYSTEM_PROMPTS)} (config field `system_prompt`)")
    return SYSTEM_PROMPTS[name]


def first_user_turn(query: str) -> str:
    """The user text of turn 0 (the image is the original, no mask)."""
    return query.strip()


def refinement_user_turn(query: str, nudge: str = "") -> str:
    """The user text of turn t >= 1: restates ``query`` and asks for the next point or the end."""
    return REFINEMENT_TEMPLATE.format(query=query.strip(), nudge=nudge.strip()).replace("  ", " ")


def user_turn(step_index: int, query: str, nudge: str = "") -> str:
    """The user text before the policy's turn ``step_index`` (0 = first turn)."""
    return first_user_turn(query) if step_index == 0 else refinement_user_turn(query, nudge)
