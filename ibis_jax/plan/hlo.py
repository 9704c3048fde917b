"""What a compiled while loop moves between chips, read from the compiled HLO text.

`loop_collectives(hlo_text)` finds the outermost while loops of the entry computation (the
sampler's decode loop: one iteration is one decoded token) and sums, per iteration, the operand
bytes of every collective (all-gather, all-reduce, reduce-scatter, collective-permute,
all-to-all, their async `-start` forms) in the loop's body and condition and in every
computation they call. A nested while (the scan over decoder layers) counts its known trip count
times (XLA's `known_trip_count`; once when unknown). Operand bytes are per chip: the HLO is the
partitioned (per-device) program.
"""

from __future__ import annotations

import dataclasses
import re

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")
_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 1, "u4": 1, "bf16": 2, "f16": 2,
             "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
_SHAPE = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9]\w*)?)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([a-z][\w\-]*)\((.*)$")
_CALLS = re.compile(r"\b(calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


def shape_bytes(type_text: str) -> int:
    """Bytes of an HLO type (`f32[8,64]{1,0}`, a tuple of them)."""
    total = 0
    for dtype, dims in _SHAPE.findall(type_text):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _ITEMSIZE.get(dtype, 4)
    return total


@dataclasses.dataclass
class _Instr:
    name: str
    type_text: str
    opcode: str
    operands: list[str]
    rest: str


def _split_operands(text: str) -> tuple[list[str], str]:
    """`a, b), attrs...` (the text after the opcode's parenthesis) -> (operand names, attrs)."""
    depth, i = 1, 0
    while i < len(text) and depth:
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        i += 1
    inside, rest = text[:i - 1], text[i:]
    names = re.findall(r"%([\w.\-]+)", inside)
    return names, rest


def parse(hlo_text: str) -> tuple[dict[str, list[_Instr]], str | None]:
    """(computation name -> its instructions, the entry computation's name)."""
    comps: dict[str, list[_Instr]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = header.group(2)
            comps[current] = []
            if header.group(1):
                entry = current
            continue
        if line.strip() == "}":
            current = None
            continue
        if current is None:
            continue
        m = _INSTR.match(line)
        if m:
            operands, rest = _split_operands(m.group(4))
            comps[current].append(_Instr(m.group(1), m.group(2), m.group(3), operands, rest))
    return comps, entry


@dataclasses.dataclass
class LoopCollectives:
    """Per iteration of the outermost while loop(s): operand bytes and op counts by collective."""

    bytes: dict[str, int]
    counts: dict[str, int]
    loops: int  # outermost while loops found

    @property
    def total_bytes(self) -> int:
        return int(sum(self.bytes.values()))


def _kind(opcode: str) -> str | None:
    base = opcode.removesuffix("-start")
    return base if base in COLLECTIVES else None


def loop_collectives(hlo_text: str) -> LoopCollectives:
    comps, entry = parse(hlo_text)
    types = {i.name: i.type_text for body in comps.values() for i in body}
    memo: dict[str, tuple[dict[str, int], dict[str, int]]] = {}

    def called(instr: _Instr) -> list[str]:
        names = [n for _, n in _CALLS.findall(instr.rest)]
        for group in _BRANCHES.findall(instr.rest):
            names += re.findall(r"%?([\w.\-]+)", group)
        return [n for n in names if n in comps]

    def add(into, other, times):
        for k, v in other.items():
            into[k] = into.get(k, 0) + v * times

    def walk(name: str, stack: tuple = ()) -> tuple[dict[str, int], dict[str, int]]:
        if name in memo:
            return memo[name]
        nbytes: dict[str, int] = {}
        counts: dict[str, int] = {}
        for instr in comps.get(name, []):
            kind = _kind(instr.opcode)
            if kind:
                add(nbytes, {kind: sum(shape_bytes(types.get(o, "")) for o in instr.operands)}, 1)
                add(counts, {kind: 1}, 1)
            times = 1
            if instr.opcode == "while":
                trip = _TRIP.search(instr.rest)
                times = int(trip.group(1)) if trip else 1
            for sub in called(instr):
                if sub in stack:
                    continue
                b, c = walk(sub, stack + (name,))
                add(nbytes, b, times)
                add(counts, c, times)
        memo[name] = (nbytes, counts)
        return memo[name]

    # The outermost whiles: those reachable from the entry through no other while.
    outer: list[_Instr] = []

    def find(name: str, seen: set) -> None:
        for instr in comps.get(name, []):
            if instr.opcode == "while":
                outer.append(instr)
                continue
            for sub in called(instr):
                if sub not in seen:
                    seen.add(sub)
                    find(sub, seen)

    if entry is not None:
        find(entry, {entry})
    nbytes: dict[str, int] = {}
    counts: dict[str, int] = {}
    for w in outer:
        for sub in called(w):  # body and condition: both run once per iteration
            b, c = walk(sub)
            add(nbytes, b, 1)
            add(counts, c, 1)
    return LoopCollectives(nbytes, counts, len(outer))


__all__ = ["COLLECTIVES", "LoopCollectives", "loop_collectives", "parse", "shape_bytes"]
