"""Seconds per case of the whole agent: ibis-jax against the official IBISAgent design, one run.

Both sides run the same model, tool and cases:
  - model: the "medium" random Qwen2.5-VL of bench/forward_vs_transformers.py (vision 8 x 384,
    text 8 x 768, vocab 32k; fp32 CPU), saved by transformers and loaded by ibis-jax, with a local
    byte-level BPE tokenizer trained so that the full system prompt is 333 tokens, as with Qwen's;
  - tool: MedSAM2's architecture (SAM2.1 Hiera-T at 512 px, seeded random weights) behind the gRPC
    tool bridge on loopback, its server on a thread of this process;
  - cases: --cases synthetic images of --side pixels; case i makes 1 + (3 i mod --clicks) clicks
    (so at most --clicks, lengths differ) and then terminates: every turn is the model decoding
    exactly --new-tokens tokens greedily (no stop), after which the scripted turn is applied (a
    random-weight model writes no clicks; this fixes the work to be the same on both sides).

ibis-jax: `run_agent` with continuous episode batching over --rows sampler rows (a finished
episode's row takes the next case), the jitted KV-cache sampler with the shared system turn
encoded once (`ModelPolicy(prefix_cache=True)`), the bridge's per-episode feature
cache (the image is encoded once per case), the round's tool calls in flight together (the server
batches them); --overlap splits the rows into two cohorts so that the tool answers one while the
sampler writes the other's turns. Timed after one warm-up pass over the same cases (jit compiles
excluded: a serving process compiles once).

official: one case at a time; each turn is transformers `generate` on the whole prompt (its KV
cache, batch 1); each click is a separate stateless request (`Segment`: the server encodes the
image again, then decodes with the clicks so far and the previous logits). The released code talks
to a MedSAM2 HTTP server; the same gRPC server stands in here, so the difference is the design,
not the transport.

    python bench/agent_case.py                 # 16 cases, up to 5 clicks, 8 rows
    python bench/agent_case.py --quick         # smoke run (seconds)
    python bench/agent_case.py --breakdown     # + our side's vision / prefill / decode split
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ibis_jax.agent import Episode  # noqa: E402
from ibis_jax.agent.conversation import turn_messages  # noqa: E402
from ibis_jax.agent.episode import EpisodeConfig  # noqa: E402
from ibis_jax.agent.grammar import Click, Terminate, format_turn  # noqa: E402
from ibis_jax.agent.loop import AgentStats, PolicyTurn, run_agent  # noqa: E402
from ibis_jax.agent.prompts import SYSTEM_PROMPT  # noqa: E402


def tokenizer_helpers():
    """(make_tokenizer_dir, special_token_ids): the tiny-tokenizer builders."""
    from ibis_jax.models.qwen2_5_vl.tiny import make_tokenizer_dir, special_token_ids

    return make_tokenizer_dir, special_token_ids


# ---------------------------------------------------------------------------- cases and the script
@dataclasses.dataclass(frozen=True)
class Case:
    image: np.ndarray
    mask: np.ndarray
    query: str
    clicks: tuple[Click, ...]


def make_cases(count: int, side: int, max_clicks: int, seed: int = 0) -> list[Case]:
    from ibis_jax.data.shapes import synthetic_shapes

    cases = []
    for i, s in enumerate(synthetic_shapes(count, size=side, seed=seed)):
        rng = np.random.default_rng([seed, i])
        rows, cols = np.nonzero(s.mask) if s.mask.any() else np.nonzero(np.ones_like(s.mask))
        n = 1 + (3 * i) % max_clicks
        picks = rng.integers(0, len(rows), n)
        clicks = tuple(Click.from_pixel(int(rows[p]), int(cols[p]), side, side, positive=k != 2)
                       for k, p in enumerate(picks))
        cases.append(Case(s.image, s.mask, f"Segment the shape in case {i}.", clicks))
    return cases


def scripted_turn(case: Case, step: int) -> str:
    if step < len(case.clicks):
        return format_turn(f"Refine the mask, click {step + 1}.", case.clicks[step])
    return format_turn("The mask fits the target.", Terminate(), "The target is segmented.")


def episodes_for(cases: Sequence[Case], tag: str) -> list[Episode]:
    config = EpisodeConfig(max_actions=max(len(c.clicks) for c in cases) + 1)
    return [Episode(c.image, c.query, c.mask, config=config, episode_id=f"{tag}{i}") for i, c in enumerate(cases)]


class ScriptedModelPolicy:
    """The model writes every turn (a fixed number of greedy tokens), the script picks the action."""

    def __init__(self, policy, cases: Sequence[Case]):
        self.policy, self.cases = policy, cases
        self.settings = policy.settings

    def generate(self, requests):
        turns = self.policy.generate(requests)
        return [PolicyTurn(scripted_turn(self.cases[int(r.episode.episode_id.lstrip("abcdefghijklmnopqrstuvwxyz"))],
                                         len(r.episode.steps)), t.token_ids, t.logprobs, t.stop_reason)
                for r, t in zip(requests, turns)]


class StatelessTool:
    """The per-click HTTP design as a `SegmentationTool`: every segment re-sends and re-encodes the
    image; the previous logits travel with the request and come back with the answer."""

    def __init__(self, client):
        self.client, self.images = client, {}

    def open(self, episode_id, image):
        self.images[episode_id] = image

    def segment(self, episode_id, points, labels, prev_logits=None):
        return self.client.segment_image(self.images[episode_id], points, labels, prev_logits)

    def close(self, episode_id):
        self.images.pop(episode_id, None)


class PieceTimer:
    """Seconds in the sampler's pieces (vision tower, prompt prefill with it, decode), each call
    waited on so that its time is its own; installed on the `Sampler` class for one pass."""

    PIECES = {"_features": "vision", "prefill_shared": "prefill", "prefill": "prefill", "decode": "decode"}

    def __init__(self):
        self.seconds = dict.fromkeys(("vision", "prefill", "decode"), 0.0)
        self._saved = {}

    def __enter__(self):
        import jax

        from ibis_jax.generate.sampler import Sampler

        for name, piece in self.PIECES.items():
            fn = self._saved[name] = getattr(Sampler, name)

            def timed(*args, _fn=fn, _piece=piece, **kwargs):
                t = time.perf_counter()
                out = _fn(*args, **kwargs)
                jax.block_until_ready(out)
                self.seconds[_piece] += time.perf_counter() - t
                return out

            setattr(Sampler, name, timed)
        return self

    def __exit__(self, *exc):
        from ibis_jax.generate.sampler import Sampler

        for name, fn in self._saved.items():
            setattr(Sampler, name, fn)

    def summary(self, cases: int) -> dict:
        """Per case; prefill without the vision tower inside it."""
        s = self.seconds
        return dict(vision_s_per_case=s["vision"] / cases, prefill_s_per_case=(s["prefill"] - s["vision"]) / cases,
                    decode_s_per_case=s["decode"] / cases)


class TimedTool:
    def __init__(self, tool):
        self.tool, self.seconds, self.calls = tool, 0.0, 0

    def open(self, episode_id, image):
        self.tool.open(episode_id, image)

    def segment(self, *args):
        t = time.perf_counter()
        try:
            return self.tool.segment(*args)
        finally:
            self.seconds += time.perf_counter() - t
            self.calls += 1

    def close(self, episode_id):
        self.tool.close(episode_id)


# ---------------------------------------------------------------------------- the two designs
def run_ours(policy, client, cases, rows: int, overlap: bool, tag: str):
    episodes = episodes_for(cases, tag)
    stats = AgentStats()
    t = time.perf_counter()
    traces = run_agent(policy, client, episodes, history="none", max_rows=rows, overlap=overlap,
                       tool_workers=rows or len(cases), stats=stats)
    return time.perf_counter() - t, stats, episodes, traces


def run_official(tm, processor, client, cases, new_tokens: int, tag: str, system_prompt: str, device: str = "cpu"):
    """One case at a time, transformers generate per turn, a stateless tool request per click (the
    prompt encoded as ours is, images at the cases' side, so both sides decode the same ids)."""
    import torch

    from ibis_jax.agent.encoding import encode_conversation

    tool = TimedTool(StatelessTool(client))
    gen_s, tokens = 0.0, []
    t0 = time.perf_counter()
    for i, (case, episode) in enumerate(zip(cases, episodes_for(cases, tag))):
        tool.open(episode.episode_id, episode.image)
        observations, turns = [], []
        while not episode.done:
            observations.append(episode.observation())
            messages = turn_messages(len(episode.steps), episode.query, observations, history="none",
                                     system_prompt=system_prompt)
            t = time.perf_counter()
            enc = encode_conversation(messages, processor.tokenizer, cases[0].image.shape[0], add_generation_prompt=True)
            ids, images = enc.input_ids, enc.images
            pixel_values, grid = processor.prepared_images(images)
            with torch.no_grad():
                out = tm.generate(torch.tensor(ids[None], dtype=torch.long, device=device),
                                  attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                                  pixel_values=torch.tensor(pixel_values, device=device),
                                  image_grid_thw=torch.tensor(grid, device=device),
                                  max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)
            gen_s += time.perf_counter() - t
            turns.append(tuple(out[0, len(ids):].cpu().tolist()))
            episode.step_text(scripted_turn(case, len(episode.steps)), tool)
        tool.close(episode.episode_id)
        tokens.append(turns)
    return time.perf_counter() - t0, gen_s, tool.seconds, tool.calls, tokens


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=16)
    ap.add_argument("--clicks", type=int, default=5, help="most clicks of a case")
    ap.add_argument("--rows", type=int, default=8, help="sampler rows (episodes in flight)")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens each turn decodes")
    ap.add_argument("--side", type=int, default=336, help="image side (336: 144 visual tokens)")
    ap.add_argument("--overlap", action="store_true", help="also time the two-cohort tool overlap")
    ap.add_argument("--no-prefix-cache", action="store_true", help="encode the system turn in every prompt")
    ap.add_argument("--static", action="store_true", help="also time the static batch (one row per case)")
    ap.add_argument("--device", default="cpu", help="torch device of transformers and the tool (cuda on a GPU)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--breakdown", action="store_true",
                    help="also time our side once more with its vision / prefill / decode split (calls waited on)")
    ap.add_argument("--json", help="also write the numbers here")
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 cases, 2 clicks, 8 tokens, 112 px")
    args = ap.parse_args()
    if args.quick:
        args.cases, args.clicks, args.new_tokens, args.side, args.rows = 3, 2, 8, 112, 2

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from bridge import random_checkpoint
    from forward_vs_transformers import medium_config

    from ibis_jax.generate import SamplerConfig
    from ibis_jax.agent.encoding import encode_conversation
    from ibis_jax.agent.settings import AgentSettings
    from ibis_jax.generate.policy import ModelPolicy
    from ibis_jax.models.qwen2_5_vl import load_hf
    from ibis_jax.models.qwen2_5_vl.processor import Qwen25VLProcessor
    from ibis_jax.models.qwen2_5_vl.testing import make_hf_model_dir
    from tool_bridge.backends.medsam2 import MedSAM2Backend
    from tool_bridge.client import BridgeClient
    from tool_bridge.server import ServerConfig, ServerThread

    make_tokenizer_dir, special_token_ids = tokenizer_helpers()
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = make_tokenizer_dir(os.path.join(tmp, "tok"), min_pixels=56 * 56, max_pixels=args.side * args.side,
                                     vocab_size=2000, corpus=[SYSTEM_PROMPT])  # 333 prompt tokens, as Qwen's
        cfg = dataclasses.replace(medium_config(), **special_token_ids(tok_dir))
        hf_dir = os.path.join(tmp, "model")
        tm = make_hf_model_dir(hf_dir, cfg, tokenizer_dir=tok_dir, randomize=False).to(args.device)
        model = load_hf(hf_dir)
        processor = Qwen25VLProcessor(hf_dir)
        backend = MedSAM2Backend(random_checkpoint(tmp), device=args.device)
    cases = make_cases(args.cases, args.side, args.clicks)
    # Chunk buckets 1.5x apart (the default doubles): a turn's prompt pads less.
    sampler_cfg = SamplerConfig(max_new_tokens=args.new_tokens, stop_strings=(), eos_token_ids=(),
                                chunk_buckets=(32, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 4096))
    policy = ScriptedModelPolicy(ModelPolicy(model, processor, sampler_cfg, settings=AgentSettings("full", args.side),
                                             prefix_cache=not args.no_prefix_cache), cases)
    turns = sum(len(c.clicks) + 1 for c in cases)
    clicks = sum(len(c.clicks) for c in cases)
    prompt_len = len(encode_conversation(turn_messages(0, cases[0].query, [cases[0].image]), processor.tokenizer,
                                         args.side, add_generation_prompt=True))
    server = ServerThread(backend, ServerConfig(port=0, max_batch=8, max_wait_ms=2.0))
    result: dict = {}
    try:
        with BridgeClient(server.address, deadline_s=600) as client:
            print(f"agent seconds per case: {args.cases} cases, {clicks} clicks, {turns} turns of {args.new_tokens} "
                  f"tokens; medium Qwen2.5-VL fp32 (prompt {prompt_len} tokens, image {args.side}px); MedSAM2 "
                  f"(random) over the gRPC bridge; torch {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
            # Warm-up: jit compiles (ours), lazy init (transformers, the tool server).
            run_ours(policy, client, cases, args.rows, False, "w")
            if args.overlap:
                run_ours(policy, client, cases, args.rows, True, "v")
            if args.static:
                run_ours(policy, client, cases, None, False, "s")
            run_official(tm, processor, client, cases[:1], args.new_tokens, "u", SYSTEM_PROMPT, args.device)

            wall, stats, _, traces = run_ours(policy, client, cases, args.rows, False, "a")
            ours_tokens = [[t.token_ids for t in tr.turns] for tr in traces]
            o_wall, o_gen, o_tool, o_calls, hf_tokens = run_official(tm, processor, client, cases, args.new_tokens,
                                                                     "b", SYSTEM_PROMPT, args.device)
            same = sum(a == b for x, y in zip(ours_tokens, hf_tokens) for a, b in zip(x, y))
            n = args.cases
            ours_tool = stats.tool_s
            print(f"ibis-jax (continuous batching, {args.rows} rows): {wall / n:7.3f} s/case   generation "
                  f"{stats.generate_s / n:6.3f} s/case   tool {ours_tool / n:6.3f} s/case (in flight)   "
                  f"rows busy/available {stats.rows_busy}/{stats.rows_available} = {stats.occupancy:.2f}   "
                  f"idle: sampler {stats.sampler_idle:.0%} tool {stats.tool_idle:.0%}")
            result["ours"] = dict(s_per_case=wall / n, generate_s_per_case=stats.generate_s / n,
                                  tool_s_per_case=ours_tool / n, rows_busy=stats.rows_busy,
                                  rows_available=stats.rows_available, sampler_idle=stats.sampler_idle,
                                  tool_idle=stats.tool_idle)
            if args.breakdown:
                with PieceTimer() as pieces:
                    b_wall, _, _, _ = run_ours(policy, client, cases, args.rows, False, "e")
                split = pieces.summary(n)
                print(f"ibis-jax split (one more pass, each piece waited on): {b_wall / n:7.3f} s/case   vision "
                      f"{split['vision_s_per_case']:6.3f}   prefill {split['prefill_s_per_case']:6.3f}   decode "
                      f"{split['decode_s_per_case']:6.3f} s/case")
                result["ours_split"] = dict(s_per_case=b_wall / n, **split)
            if args.overlap:
                ov_wall, ov, _, _ = run_ours(policy, client, cases, args.rows, True, "c")
                print(f"ibis-jax (+ overlap, 2 cohorts of {-(-args.rows // 2)}): {ov_wall / n:7.3f} s/case   "
                      f"generation {ov.generate_s / n:6.3f} s/case   tool {ov.tool_s / n:6.3f} s/case (in flight)   "
                      f"rows busy/available {ov.rows_busy}/{ov.rows_available} = {ov.occupancy:.2f}   "
                      f"idle: sampler {ov.sampler_idle:.0%} tool {ov.tool_idle:.0%}")
                result["ours_overlap"] = dict(s_per_case=ov_wall / n, generate_s_per_case=ov.generate_s / n,
                                              tool_s_per_case=ov.tool_s / n, sampler_idle=ov.sampler_idle,
                                              tool_idle=ov.tool_idle)
            if args.static:
                st_wall, st, _, _ = run_ours(policy, client, cases, None, False, "d")
                print(f"ibis-jax (static batch of {n}, for reference): {st_wall / n:7.3f} s/case   generation "
                      f"{st.generate_s / n:6.3f} s/case   rows busy/available {st.rows_busy}/{st.rows_available} "
                      f"= {st.occupancy:.2f}")
                result["ours_static"] = dict(s_per_case=st_wall / n, rows_busy=st.rows_busy,
                                             rows_available=st.rows_available)
            print(f"official design (1 case at a time, generate, re-encode per click): {o_wall / n:7.3f} s/case   "
                  f"generation {o_gen / n:6.3f} s/case   tool {o_tool / n:6.3f} s/case ({o_calls} requests)")
            print(f"greedy turns identical to transformers: {same}/{turns}")
            print(f"ratio (official / ibis-jax): {o_wall / wall:.2f}x   generation {o_gen / stats.generate_s:.2f}x   "
                  f"tool {o_tool / max(ours_tool, 1e-9):.2f}x")
            result["official"] = dict(s_per_case=o_wall / n, generate_s_per_case=o_gen / n, tool_s_per_case=o_tool / n)
            result.update(ratio=o_wall / wall, greedy_identical=f"{same}/{turns}", cases=n, clicks=clicks,
                          turns=turns, new_tokens=args.new_tokens, rows=args.rows, side=args.side)
    finally:
        server.stop()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
