"""Stop strings as a token-level automaton, so the jitted decode loop checks them with one gather.

Rule (the same as transformers' ``StopStringCriteria``): a row stops at the first sampled token
whose bytes *complete* an occurrence of a stop string in the generated text. The stop string may
span several tokens, and the completing token may run past the end of the stop string (``">\\n"``
completes ``"</action>"``). Matching runs over the UTF-8 bytes of the tokens (byte-level BPE ids
map to exact bytes), and special tokens (``<|im_end|>``, ...) are not text: they reset the match.
Matches never reach into the prompt: the automaton starts empty at the first generated token.

The automaton's states are the prefixes of the stop strings (a trie with Aho-Corasick fall-back);
``table[state, token]`` is the state after the token's bytes, or ``MATCH`` (the last row) when
the token completes a stop string. Built once per (tokenizer, stop strings) on the host.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable unicode char -> byte value."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_bytes(tokenizer, vocab_size: int) -> list[bytes | None]:
    """Bytes of every id in [0, vocab_size); None for special tokens and ids the tokenizer lacks.

    Byte-level BPE tokens map exactly through GPT-2's alphabet; other tokenizers fall back to
    decoding each id alone (exact for ASCII stop strings, which is what the agent uses)."""
    dec = _byte_decoder()
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    special |= {i for i, t in added.items() if getattr(t, "special", False)}
    n_tok = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(min(n_tok, vocab_size))))
    out: list[bytes | None] = []
    for i in range(vocab_size):
        if i >= n_tok or i in special or pieces[i] is None:
            out.append(None)
            continue
        piece = pieces[i]
        if all(c in dec for c in piece):
            out.append(bytes(dec[c] for c in piece))
        else:
            out.append(tokenizer.decode([i]).encode("utf-8"))
    return out


class StopAutomaton:
    """table int32 [num_states + 1, vocab]: next state; state 0 = nothing matched; the last
    state (``match_state``) = a stop string completed (absorbing)."""

    def __init__(self, stop_strings: Sequence[str], tokens: Sequence[bytes | None]):
        stops = [s.encode("utf-8") for s in stop_strings if s]
        prefixes = sorted({b""} | {s[:i] for s in stops for i in range(len(s))}, key=lambda p: (len(p), p))
        index = {p: i for i, p in enumerate(prefixes)}  # b"" is state 0
        self.match_state = len(prefixes)
        self.num_states = len(prefixes) + 1

        def step(p: bytes, c: int) -> int:
            s = p + bytes([c])
            if any(s.endswith(t) for t in stops):
                return self.match_state
            for j in range(len(s)):  # longest suffix that is a prefix of some stop string
                if s[j:] in index:
                    return index[s[j:]]
            return 0

        delta = np.zeros((len(prefixes), 256), np.int32)
        for p, q in index.items():
            for c in range(256):
                delta[q, c] = step(p, c)

        def run(q: int, data: bytes) -> int:
            for c in data:
                q = int(delta[q, c])
                if q == self.match_state:
                    return q
            return q

        vocab = len(tokens)
        table = np.zeros((self.num_states, vocab), np.int32)
        table[self.match_state] = self.match_state
        if stops:
            from_zero = np.array([0 if t is None else run(0, t) for t in tokens], np.int32)
            table[0] = from_zero
            by_first: dict[int, list[int]] = {}
            for i, t in enumerate(tokens):
                if t:
                    by_first.setdefault(t[0], []).append(i)
            for q in range(1, len(prefixes)):
                table[q] = from_zero
                # Runs from q and from 0 coincide once they reach the same state: only tokens whose
                # first byte leads q somewhere else than 0 leads need their own run.
                for c in np.nonzero(delta[q] != delta[0])[0]:
                    for i in by_first.get(int(c), []):
                        table[q, i] = run(q, tokens[i])
        self.table = table

    @classmethod
    def for_tokenizer(cls, tokenizer, stop_strings: Sequence[str], vocab_size: int) -> "StopAutomaton":
        return _cached(tokenizer, tuple(stop_strings), vocab_size)

    def run_tokens(self, ids: Sequence[int]) -> int | None:
        """Host reference: index of the token that completes a stop string, or None."""
        q = 0
        for n, i in enumerate(ids):
            q = int(self.table[q, i])
            if q == self.match_state:
                return n
        return None


_CACHE: dict[tuple, StopAutomaton] = {}


def _cached(tokenizer, stop_strings: tuple[str, ...], vocab_size: int) -> StopAutomaton:
    key = (id(tokenizer), stop_strings, vocab_size)
    if key not in _CACHE:
        _CACHE[key] = StopAutomaton(stop_strings, token_bytes(tokenizer, vocab_size))
    return _CACHE[key]
