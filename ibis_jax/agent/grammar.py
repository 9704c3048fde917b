"""The action grammar of one assistant turn (docs/design.md section 2).

A turn is::

    <think>
    ...reasoning...
    </think>
    <action>
    Positive Point (0.4512, 0.4238)
    </action>

or a ``Terminate`` action followed by ``<answer>\\n...\\n</answer>``. Coordinates are normalised:
x = column / width, y = row / height, both in [0, 1].

``parse_turn(text, strict=False)`` is what the agent loop uses: tolerant of case, whitespace and
decimal count, and it also reads the paper's JSON click form and the released reward code's
``Termination`` word. ``strict=True`` is the format reward's check: the exact layout, the point
form or the terminate word, and a well-formed ``<answer>`` after a terminate. Any malformed input
raises :class:`ActionParseError` with a machine-readable ``reason``; nothing else escapes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Union

TERMINATE_WORDS = ("terminate", "termination")


class ActionParseError(ValueError):
    """A turn does not follow the grammar.

    Attributes:
      reason: one of ``no_action``, ``multiple_actions``, ``bad_action``, ``out_of_range``,
        ``missing_answer``, ``format``.
      detail: a human-readable explanation.
    """

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclasses.dataclass(frozen=True)
class Click:
    """A click at normalised ``(x, y)``; ``positive`` adds region, negative removes it."""

    x: float
    y: float
    positive: bool

    def __post_init__(self):
        for name, value in (("x", self.x), ("y", self.y)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and 0.0 <= value <= 1.0):
                raise ValueError(f"Click.{name} must be a finite number in [0, 1], got {value!r}")

    def pixel(self, width: int, height: int) -> tuple[int, int]:
        """The clicked pixel ``(col, row)``: ``min(int(x * W), W - 1)`` (docs/design.md section 1)."""
        return min(int(self.x * width), width - 1), min(int(self.y * height), height - 1)

    @classmethod
    def from_pixel(cls, row: int, col: int, height: int, width: int, positive: bool) -> "Click":
        """The click at a pixel's centre, rounded to the grammar's four decimals.

        Centres survive the round trip: ``pixel()`` of the result gives back ``(col, row)`` for
        images up to 10,000 pixels a side.
        """
        return cls(round((col + 0.5) / width, 4), round((row + 0.5) / height, 4), positive)


@dataclasses.dataclass(frozen=True)
class Terminate:
    """The policy declares the mask finished."""


@dataclasses.dataclass(frozen=True)
class SliceClick:
    """A click in a volume: normalised ``(x, y)`` on slice ``z`` of the viewing axis.

    ``z`` is normalised like ``x`` and ``y``: slice index / number of slices, so slice ``k`` of
    ``D`` is written ``(k + 0.5) / D`` and read back as ``min(int(z * D), D - 1)``. Text form:
    ``Positive Point (0.4512, 0.4238, 0.5156)``.
    """

    x: float
    y: float
    z: float
    positive: bool

    def __post_init__(self):
        for name, value in (("x", self.x), ("y", self.y), ("z", self.z)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and 0.0 <= value <= 1.0):
                raise ValueError(f"SliceClick.{name} must be a finite number in [0, 1], got {value!r}")

    def voxel(self, depth: int, height: int, width: int) -> tuple[int, int, int]:
        """The clicked voxel ``(slice, row, col)`` in view order."""
        return (min(int(self.z * depth), depth - 1), min(int(self.y * height), height - 1),
                min(int(self.x * width), width - 1))

    @classmethod
    def from_voxel(cls, index: int, row: int, col: int, depth: int, height: int, width: int,
                   positive: bool) -> "SliceClick":
        """The click at a voxel's centre, rounded to four decimals (round-trips up to 5,000 a side)."""
        return cls(round((col + 0.5) / width, 4), round((row + 0.5) / height, 4),
                   round((index + 0.5) / depth, 4), positive)


Action = Union[Click, Terminate, SliceClick]


@dataclasses.dataclass(frozen=True)
class ParsedTurn:
    reasoning: str
    action: Action
    answer: str | None = None
    target: str | None = None  # only the JSON click form names its target


def format_action(action: Action) -> str:
    """Canonical action text: ``Positive Point (0.4512, 0.4238)`` or ``Terminate``."""
    if isinstance(action, Terminate):
        return "Terminate"
    if isinstance(action, Click):
        kind = "Positive" if action.positive else "Negative"
        return f"{kind} Point ({action.x:.4f}, {action.y:.4f})"
    if isinstance(action, SliceClick):
        kind = "Positive" if action.positive else "Negative"
        return f"{kind} Point ({action.x:.4f}, {action.y:.4f}, {action.z:.4f})"
    raise TypeError(f"format_action: expected Click or Terminate, got {type(action).__name__}")


def format_turn(reasoning: str, action: Action, answer: str | None = None) -> str:
    """A whole assistant turn in the canonical layout (passes ``parse_turn(strict=True)``)."""
    text = f"<think>\n{reasoning.strip()}\n</think>\n<action>\n{format_action(action)}\n</action>"
    if isinstance(action, Terminate):
        text += f"\n<answer>\n{(answer or '').strip()}\n</answer>"
    return text


_NUM = r"([+-]?(?:\d+(?:\.\d*)?|\.\d+))"
# Every run of whitespace is matched by one possessive quantifier, so a failed match backtracks in
# linear time (``\s*point\s*[:\s]*`` and ``\s*\.?\s*$`` were quadratic on long runs of spaces).
_POINT_LENIENT = re.compile(
    rf"^\s*+(positive|negative)\s*+point[:\s]*+\(\s*+{_NUM}\s*+,\s*+{_NUM}\s*+\)\s*+(?:\.\s*+)?$", re.I
)
_POINT_STRICT = re.compile(r"^(Positive|Negative) Point \((\d+(?:\.\d+)?), (\d+(?:\.\d+)?)\)$")
_TAG_OPEN = {tag: re.compile(f"<{tag}>", re.I) for tag in ("think", "action", "answer")}
_TAG_CLOSE = {tag: re.compile(f"</{tag}>", re.I) for tag in ("think", "action", "answer")}


# The slice click: the point form with a third coordinate. Kept in its own expressions and
# functions so the 2D forms stay as they are.
# Possessive whitespace as in _POINT_LENIENT: linear in the input (no backtracking over spaces).
_SLICE_POINT_LENIENT = re.compile(
    rf"^\s*+(positive|negative)\s*+point[:\s]*+\(\s*+{_NUM}\s*+,\s*+{_NUM}\s*+,\s*+{_NUM}\s*+\)\s*+(?:\.\s*+)?$",
    re.I,
)
_SLICE_POINT_STRICT = re.compile(
    r"^(Positive|Negative) Point \((\d+(?:\.\d+)?), (\d+(?:\.\d+)?), (\d+(?:\.\d+)?)\)$"
)


def _slice_click(match: re.Match | None) -> SliceClick | None:
    if not match:
        return None
    kind, xs, ys, zs = match.groups()
    return SliceClick(_to_unit(xs, "x"), _to_unit(ys, "y"), _to_unit(zs, "z"), kind.lower() == "positive")


def _parse_slice_point_lenient(content: str) -> SliceClick | None:
    """``Positive Point (x, y, z)`` read leniently, or None when it is not that form."""
    return _slice_click(_SLICE_POINT_LENIENT.match(content))


def _parse_slice_point_strict(content: str) -> SliceClick | None:
    return _slice_click(_SLICE_POINT_STRICT.match(content))


def _tag_spans(text: str, tag: str) -> list[str]:
    """The contents of ``<tag>...</tag>`` blocks, as ``re.findall(r"<tag>(.*?)</tag>", S | I)``
    finds them, in one left-to-right pass (the lazy regex rescans the rest of the text from every
    unclosed opening tag: quadratic). Tags match case-insensitively as in that regex."""
    opening, closing = _TAG_OPEN[tag], _TAG_CLOSE[tag]
    spans, pos = [], 0
    while True:
        start = opening.search(text, pos)
        if start is None:
            return spans
        end = closing.search(text, start.end())
        if end is None:  # no closing tag after this opening one, hence none after any later one
            return spans
        spans.append(text[start.end():end.start()])
        pos = end.end()


def _to_unit(value: str, axis: str) -> float:
    number = float(value)
    if not (math.isfinite(number) and 0.0 <= number <= 1.0):
        raise ActionParseError("out_of_range", f"{axis}={value} is not a normalised coordinate in [0, 1]")
    return number


def _parse_json_click(content: str) -> tuple[Click, str | None]:
    try:
        obj = json.loads(content)
    except (ValueError, RecursionError) as e:
        raise ActionParseError("bad_action", f"action looks like JSON but does not parse: {e}") from None
    if isinstance(obj, list) and len(obj) == 1:
        obj = obj[0]
    if not isinstance(obj, dict):
        raise ActionParseError("bad_action", "a JSON click must be an object")
    keys = {str(k).lower().replace("_", " "): v for k, v in obj.items()}
    attribute = str(keys.get("attribute", "")).strip()
    if attribute not in ("1", "-1", "1.0", "-1.0"):
        raise ActionParseError("bad_action", f'JSON click "Attribute" must be "1" or "-1", got {attribute!r}')
    coord = keys.get("coordinate 2d", keys.get("coordinate"))
    if isinstance(coord, str):
        try:
            coord = json.loads(coord)
        except ValueError:
            raise ActionParseError("bad_action", f'JSON click "Coordinate 2d" unreadable: {coord!r}') from None
    if not (isinstance(coord, list) and len(coord) == 2):
        raise ActionParseError("bad_action", 'JSON click needs "Coordinate 2d": "[x, y]"')
    try:
        x, y = (_to_unit(str(float(c)), axis) for c, axis in zip(coord, "xy"))
    except (TypeError, ValueError, OverflowError) as e:
        if isinstance(e, ActionParseError):
            raise
        raise ActionParseError("bad_action", f"JSON click coordinates are not numbers: {coord!r}") from None
    target = keys.get("target")
    return Click(x, y, attribute.startswith("1")), (str(target) if target is not None else None)


def _parse_action_lenient(content: str) -> tuple[Action, str | None]:
    stripped = content.strip()
    if stripped.lower().rstrip(".") in TERMINATE_WORDS:
        return Terminate(), None
    if stripped.startswith(("{", "[")):
        return _parse_json_click(stripped)
    match = _POINT_LENIENT.match(stripped)
    if not match:
        if (slice_click := _parse_slice_point_lenient(stripped)) is not None:
            return slice_click, None
        raise ActionParseError(
            "bad_action",
            f"expected 'Positive Point (x, y)', 'Negative Point (x, y)' or 'Terminate', got {stripped[:80]!r}",
        )
    kind, xs, ys = match.groups()
    return Click(_to_unit(xs, "x"), _to_unit(ys, "y"), kind.lower() == "positive"), None


_TAG = re.compile(r"</?(think|action|answer)>")


def _no_nested_tags(content: str, block: str) -> None:
    """A strict block holds no grammar tag: a lazy match would otherwise swallow a second turn
    (``...</answer>`` closing ``<answer>a</think><action>...<answer>b``), which the lenient parser
    rejects as two actions, so the format reward and the episode would disagree."""
    tag = _TAG.search(content)
    if tag:
        raise ActionParseError("format", f"<{block}> holds the tag {tag.group(0)!r}; write each block once")


def _strict_blocks(text: str) -> tuple[str, str, str] | None:
    """``(reasoning, action, rest)`` of ``<think>\\n(.*?)\\n</think>\\n\\s*<action>\\n(.*?)\\n</action>``
    matched at the start of ``text``, or ``None``, by string search in linear time.

    Only the first ``\\n</think>\\n`` is tried as the end of the reasoning: the lazy regex would go
    on to later ones (quadratic on many of them), but a reasoning reaching past the first one holds
    ``</think>``, which the caller rejects as a nested tag anyway, with the same reason."""
    head = "<think>\n"
    if not text.startswith(head):
        return None
    think_end = text.find("\n</think>\n", len(head))
    if think_end < 0:
        return None
    after = think_end + len("\n</think>\n")
    action_at = after + (len(text) - after - len(text[after:].lstrip()))
    if not text.startswith("<action>\n", action_at):
        return None
    content_at = action_at + len("<action>\n")
    content_end = text.find("\n</action>", content_at)
    if content_end < 0:
        return None
    rest = text[content_end + len("\n</action>"):]
    return text[len(head):think_end], text[content_at:content_end], rest


def _strict_answer(rest: str) -> str | None:
    """The group of ``\\s*<answer>\\n(.*?)\\n</answer>\\s*`` fullmatched on ``rest``, or ``None``.

    Only the last ``\\n</answer>`` can be followed by nothing but whitespace, so the lazy group ends
    there whenever the fullmatch succeeds."""
    body = rest.lstrip()
    head = "<answer>\n"
    if not body.startswith(head):
        return None
    end = body.rfind("\n</answer>", len(head))
    if end < 0 or body[end + len("\n</answer>"):].strip():
        return None
    return body[len(head):end]


def _parse_strict(text: str) -> ParsedTurn:
    blocks = _strict_blocks(text.lstrip())
    if blocks is None:
        raise ActionParseError(
            "format", "expected '<think>\\n...\\n</think>\\n<action>\\n...\\n</action>' at the start"
        )
    reasoning, content, rest = blocks
    _no_nested_tags(reasoning, "think")
    if content in ("Terminate", "Termination"):
        answer = _strict_answer(rest)
        if answer is None:
            raise ActionParseError("missing_answer", "a terminate must be followed by '<answer>\\n...\\n</answer>'")
        _no_nested_tags(answer, "answer")
        return ParsedTurn(reasoning, Terminate(), answer)
    if rest.strip():
        raise ActionParseError("format", "text after </action> (only a terminate is followed by an answer)")
    point = _POINT_STRICT.match(content)
    if not point:
        if (slice_click := _parse_slice_point_strict(content)) is not None:
            return ParsedTurn(reasoning, slice_click)
        raise ActionParseError("bad_action", f"strict action must be the point form or 'Terminate', got {content[:80]!r}")
    kind, xs, ys = point.groups()
    return ParsedTurn(reasoning, Click(_to_unit(xs, "x"), _to_unit(ys, "y"), kind == "Positive"))


def _parse_lenient(text: str) -> ParsedTurn:
    actions = _tag_spans(text, "action")
    if not actions:
        raise ActionParseError("no_action", "no <action>...</action> block")
    if len(actions) > 1:
        raise ActionParseError("multiple_actions", f"{len(actions)} <action> blocks; write exactly one")
    action, target = _parse_action_lenient(actions[0])
    thinks = _tag_spans(text, "think")
    answers = _tag_spans(text, "answer")
    return ParsedTurn(
        reasoning=thinks[0].strip() if thinks else "",
        action=action,
        answer=answers[-1].strip() if answers else None,
        target=target,
    )


def is_well_formed(text: str) -> bool:
    """Whether a turn passes the strict format check (the format reward, docs/design.md section 2)."""
    try:
        parse_turn(text, strict=True)
    except ActionParseError:
        return False
    return True


def parse_turn(text: str, strict: bool = False) -> ParsedTurn:
    """Parses one assistant turn; raises :class:`ActionParseError` on any malformed input."""
    if not isinstance(text, str):
        raise ActionParseError("format", f"expected text, got {type(text).__name__}")
    try:
        return _parse_strict(text) if strict else _parse_lenient(text)
    except ActionParseError:
        raise
    except (ValueError, OverflowError, TypeError, RecursionError) as e:  # e.g. float('1e999999')
        raise ActionParseError("bad_action", f"unreadable action: {e}") from None
