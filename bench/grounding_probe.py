"""Can a tiny random-init Qwen2.5-VL or Qwen3-VL learn *what* is in an image, and *where*?

The GRPO demo needs a policy whose clicks depend on the image. This probe trains fresh tiny
models (random init, the quickstart's tokenizer; Qwen2.5-VL: the quickstart's tiny preset;
Qwen3-VL: `Qwen3VLConfig.tiny` resized to the same decoder and vision tower) on one-shape images
with a short prompt and a one-word answer, and prints held-out accuracy against the
majority-class anchor measured on the same held-out set. Probes (`--probes`):

- content: "small" or "large" (target area below / above 5.5 % of the image);
- row: "top", "middle" or "bottom"; column: "left", "center" or "right" (target centroid below
  5/12, between, or above 7/12 of the height / width: the centroid is drawn in [0.25, 0.75],
  so each class takes a third of it); with both, the cell is right when row and column are both
  right on the same held-out image;
- position: "left" or "right" (centroid column below / above the middle);
- copy: the prompt names a shape at random ("Segment the ring in this image."), the answer
  repeats that name: does the model read the query at all? With ``--system-prompt full`` the
  330-token agent instructions stand between the start and the query, as in the agent format.

``--train separate`` (default) trains one model per probe; ``--train mixed`` one model per
(family, seed) on all the probes' questions, drawn at random per example (each example's question
says which probe it is). Accuracy is that of the answer's first token (distinct within a probe).

The families differ where position is concerned. Qwen2.5-VL's vision tower has only relative 2D
RoPE (no absolute position), and its decoder mRoPE gives the width axis the lowest frequencies:
on the 4 x 4 grid at rope_theta 1e6 two columns differ by < 1e-3 rad. Qwen3-VL adds a learned
absolute position table to the vision tower (interpolated to the patch grid), interleaves the
mRoPE bands (t, h, w, t, h, w, ...: both spatial axes get high frequencies) and feeds
intermediate vision features into the first decoder layers (DeepStack). The probe prints how far
the fastest mRoPE band of each axis turns across the visual grid for each family.
``--position-tint 40`` draws the images with colour ramps that write each pixel's position into
its colour, which makes position a property of the content.

Both families see the same number of visual tokens: Qwen2.5-VL 14 px patches, Qwen3-VL 16 px,
2 x 2 merge, so 112 px / 128 px images give 4 x 4 tokens (`--grid`). Each family draws its images
at its own size from the same seeds; the noise arrays take size-dependent amounts of the stream,
so the scenes (and the majority anchors, printed per family) differ between the families.

    python bench/grounding_probe.py [--family qwen2_5_vl,qwen3_vl] [--probes content,row,column]
        [--train separate|mixed] [--steps 400] [--batch 16] [--lr 2e-3] [--seeds 0,1,2]
        [--theta 1e6] [--position-tint 0] [--system-prompt none|short|full] [--held-out 128]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FAMILIES = ("qwen2_5_vl", "qwen3_vl")
PROBES = ("content", "row", "column", "position", "copy")
PATCH = {"qwen2_5_vl": 14, "qwen3_vl": 16}  # px per patch; 2 x 2 patches merge into one visual token
CUTS = (5 / 12, 7 / 12)  # row / column thirds of the centroid's range [0.25, 0.75]


def rope_turn(head_dim: int, sections: tuple[int, int, int], theta: float, grid: int,
              interleaved: bool = False) -> dict[str, float]:
    """Largest angle (rad) by which the fastest band of each spatial mRoPE axis turns between the
    first and the last visual token of a `grid` x `grid` image. Bands follow the decoder's own
    assignment (`mrope_axis_of_band`): contiguous sections (Qwen2.5-VL) or interleaved t/h/w
    (Qwen3-VL)."""
    from ibis_jax.models.qwen2_5_vl.text import mrope_axis_of_band

    inv = theta ** (-np.arange(0, head_dim, 2) / head_dim)
    axis = mrope_axis_of_band(tuple(sections), interleaved)
    return {name: float(inv[: len(axis)][axis == i].max() * (grid - 1)) for i, name in ((1, "height"), (2, "width"))}


def third(x: float, names: tuple[str, str, str]) -> str:
    return names[0] if x < CUTS[0] else names[2] if x > CUTS[1] else names[1]


# Each probe: sample, centroid (row, column) as fractions, a random shape name -> (question, answer).
QUESTIONS = {
    "content": lambda s, cy, cx, name, mixed: (f"Is the {s.target} small or large?" if mixed else
                                               f"Where is the {s.target}?",
                                               "small" if s.mask.mean() < 0.055 else "large"),
    "row": lambda s, cy, cx, name, mixed: (f"Which row is the {s.target} in?", third(cy, ("top", "middle", "bottom"))),
    "column": lambda s, cy, cx, name, mixed: (f"Which column is the {s.target} in?",
                                              third(cx, ("left", "center", "right"))),
    "position": lambda s, cy, cx, name, mixed: (f"Is the {s.target} on the left or the right?" if mixed else
                                                f"Where is the {s.target}?", "left" if cx < 0.5 else "right"),
    "copy": lambda s, cy, cx, name, mixed: (f"Segment the {name} in this image.", name),
}
TITLES = {"content": "content (small / large)", "row": "row (top / middle / bottom)",
          "column": "column (left / center / right)", "position": "position (left / right)",
          "copy": "copy (the query's shape name)"}


@dataclasses.dataclass
class ProbeModel:
    """One family's probe model: its config, processor, model class and vision layout."""

    name: str
    cfg: object
    proc: object
    model_cls: type
    layout: object
    image_size: int

    def sizes(self) -> str:
        t, v = self.cfg.text, self.cfg.vision
        extra = ""
        if self.name == "qwen3_vl":
            extra = (f", position table {v.num_grid_per_side}x{v.num_grid_per_side}, "
                     f"DeepStack taps {v.deepstack_visual_indexes}")
        return (f"decoder {t.num_hidden_layers} layers x {t.hidden_size} (mlp {t.intermediate_size}, heads "
                f"{t.num_attention_heads}/{t.num_key_value_heads} of {t.head_dim}, mRoPE {t.mrope_section}"
                f"{' interleaved' if self.name == 'qwen3_vl' else ''}, theta {t.rope_theta:g}); vision {v.depth} "
                f"blocks x {v.hidden_size} (mlp {v.intermediate_size}, {v.num_heads} heads, {v.patch_size} px patches"
                f"{extra}); {self.image_size} px -> {self.image_size // (2 * v.patch_size)}^2 visual tokens")


def build_family(name: str, tok_dir: str, grid: int, theta: float | None) -> ProbeModel:
    """The tiny config of `name` with the tokenizer's special ids, its processor and model class.

    Qwen3-VL: `Qwen3VLConfig.tiny` with the decoder and vision sizes of the Qwen2.5-VL tiny preset
    (2 decoder layers x 128, head_dim 32, 4 vision blocks x 64); its own mRoPE (interleaved,
    sections (6, 5, 5): the released 3 : 2.5 : 2.5 split of (24, 20, 20)) and rope_theta 5e6;
    two DeepStack taps (after vision blocks 0 and 2, into decoder layers 0 and 1); the learned
    position table as large as the patch grid. Its processor reads Qwen3-VL's image settings
    (16 px patches, mean / std 0.5) from a copy of the tokenizer directory; the images are
    prepared at the family's size, so the processor never resizes them (`prepared_images`)."""
    from ibis_jax.models import family, preset_config

    if name not in FAMILIES:
        raise ValueError(f"unknown family {name!r}; choose from {FAMILIES}")
    fam = family(name)
    cfg = preset_config(fam.tiny, tok_dir)
    proc_dir = tok_dir
    if name == "qwen3_vl":
        proc_dir = tok_dir + "-qwen3"
        if not os.path.exists(proc_dir):
            shutil.copytree(tok_dir, proc_dir)
            fam.write_processor_config(proc_dir)
        ref = preset_config("tiny", tok_dir)  # the Qwen2.5-VL tiny sizes
        rt, rv = ref.text, ref.vision
        text = dataclasses.replace(
            cfg.text, hidden_size=rt.hidden_size, intermediate_size=rt.intermediate_size,
            num_hidden_layers=rt.num_hidden_layers, num_attention_heads=rt.num_attention_heads,
            num_key_value_heads=rt.num_key_value_heads, head_dim=rt.head_dim, mrope_section=(6, 5, 5))
        vision = dataclasses.replace(
            cfg.vision, depth=rv.depth, hidden_size=rv.hidden_size, intermediate_size=rv.intermediate_size,
            num_heads=rv.num_heads, out_hidden_size=rt.hidden_size, num_position_embeddings=(2 * grid) ** 2,
            deepstack_visual_indexes=(0, 2))
        cfg = dataclasses.replace(cfg, text=text, vision=vision)
    if theta is not None:
        cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, rope_theta=theta))
    proc, model_cls, layout = fam.processor(proc_dir), fam.model_class, fam.module.vision_layout
    return ProbeModel(name, cfg, proc, model_cls, layout, 2 * PATCH[name] * grid)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="qwen2_5_vl",
                    help="comma-separated model families: qwen2_5_vl, qwen3_vl (or 'both')")
    ap.add_argument("--probes", default="content,position", help=f"comma-separated probes: {', '.join(PROBES)}")
    ap.add_argument("--train", default="separate", choices=("separate", "mixed"),
                    help="one model per probe, or one model on all probes' questions mixed")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--theta", type=float, default=None, help="decoder rope_theta (default: each family's)")
    ap.add_argument("--grid", type=int, default=4, help="visual tokens per side (112 px / 128 px at 4)")
    ap.add_argument("--image-size", type=int, default=None,
                    help="Qwen2.5-VL image size in px (a multiple of 28; sets --grid)")
    ap.add_argument("--position-tint", type=float, default=0.0,
                    help="colour ramps that write the position into the pixels (see make_shape_sample)")
    ap.add_argument("--system-prompt", default="none", choices=("none", "short", "full"),
                    help="system prompt in front of the image and question (agent/prompts.py)")
    ap.add_argument("--seed", type=int, default=None, help="one seed (model initialisation and training images)")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds, one run each")
    ap.add_argument("--held-out", type=int, default=128, help="held-out images (drawn from seed 12345)")
    args = ap.parse_args(argv)
    args.families = list(FAMILIES) if args.family == "both" else args.family.split(",")
    if set(args.families) - set(FAMILIES):
        ap.error(f"--family {args.family!r}: choose from {', '.join(FAMILIES)} or both")
    args.wanted = [p for p in PROBES if p in args.probes.split(",")]
    if set(args.probes.split(",")) - set(PROBES):
        ap.error(f"--probes {args.probes!r}: choose from {', '.join(PROBES)}")
    args.seed_list = [args.seed] if args.seed is not None else [int(s) for s in args.seeds.split(",")]
    if args.image_size is not None:
        if args.image_size % 28:
            ap.error("--image-size must be a multiple of 28")
        args.grid = args.image_size // 28
    return args


def main(argv=None) -> list[dict]:
    """Run the probe; print the table and return its rows (one per family, seed: accuracy per probe)."""
    args = parse_args(argv)
    t_start = time.perf_counter()

    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from ibis_jax.agent.prompts import system_prompt
    from ibis_jax.data.shapes import SHAPE_KINDS, make_shape_sample
    from ibis_jax.models.qwen2_5_vl import Qwen25VLConfig
    from ibis_jax.models.qwen2_5_vl.tiny import make_tokenizer_dir
    from ibis_jax.models.qwen3_vl import Qwen3VLConfig

    tok_dir = make_tokenizer_dir(os.path.join(tempfile.mkdtemp(), "tok"))
    families = [build_family(f, tok_dir, args.grid, args.theta) for f in args.families]
    grid = args.grid
    print(f"mRoPE turn across the {grid}x{grid} visual grid, fastest band of each axis (rad):")
    for fam in families:
        t = fam.cfg.text
        print(f"  {fam.name} tiny (head_dim {t.head_dim}, sections {t.mrope_section}, theta {t.rope_theta:g}): "
              f"{rope_turn(t.head_dim, t.mrope_section, t.rope_theta, grid, t.mrope_interleaved)}")
    big = Qwen25VLConfig.qwen2_5_vl_7b().text
    print(f"  Qwen2.5-VL-7B at 504 px (18x18 grid): {rope_turn(big.head_dim, big.mrope_section, big.rope_theta, 18)}")
    big3 = Qwen3VLConfig.qwen3_vl_8b().text
    print(f"  Qwen3-VL-8B at 512 px (16x16 grid): "
          f"{rope_turn(big3.head_dim, big3.mrope_section, big3.rope_theta, 16, True)}")
    for fam in families:
        print(f"{fam.name}: {fam.sizes()}")

    system = [] if args.system_prompt == "none" else [{"role": "system", "content": system_prompt(args.system_prompt)}]
    mixed = args.train == "mixed"

    def make_batch(fam, rng, n, start, probes, seed, pad_to):
        """n examples from image stream `rng` (indexes start..): each asks one of `probes` (drawn per
        example from its own stream when there are several)."""
        proc, size = fam.proc, fam.image_size
        images, prompts, answers, kinds = [], [], [], []
        for i in range(n):
            s = make_shape_sample(size, rng, start + i, (1, 1), args.position_tint)
            ys, xs = np.nonzero(s.mask)
            cy, cx = float(ys.mean()) / size, float(xs.mean()) / size
            # the copy probe's name and the question type from their own streams, so the images stay as they were
            name = SHAPE_KINDS[np.random.default_rng([seed, start + i]).integers(len(SHAPE_KINDS))]
            kind = probes[0] if len(probes) == 1 else \
                probes[np.random.default_rng([seed, start + i, 1]).integers(len(probes))]
            question, answer = QUESTIONS[kind](s, cy, cx, name, mixed)
            chat = system + [{"role": "user", "content": [{"type": "image", "image": s.image},
                                                          {"type": "text", "text": question}]}]
            images.append(s.image)
            prompts.append(proc.render(chat, add_generation_prompt=True))
            answers.append(answer)
            kinds.append(kind)
        pixel_values, grids = proc.prepared_images(images)
        if not (grids[:, 1:] == 2 * grid).all():
            raise RuntimeError(f"{fam.name}: image grids {grids[0].tolist()}, expected {2 * grid}x{2 * grid} patches")
        rows = []
        for prompt, g, ans in zip(prompts, grids, answers):
            p = proc.tokenizer.encode(proc.expand_image_pads(prompt, g[None]), add_special_tokens=False)
            a = proc.tokenizer.encode(ans, add_special_tokens=False)
            rows.append((p, a))
        length = max(len(p) + len(a) for p, a in rows)
        if length > pad_to:
            raise RuntimeError(f"sequence of {length} tokens, longer than the {pad_to} planned")
        length = pad_to  # one shape a run: one compilation
        input_ids = np.zeros((n, length), np.int32)
        mask = np.zeros((n, length), np.int32)
        loss = np.zeros((n, length), np.float32)
        answer_pos = []
        for j, (p, a) in enumerate(rows):
            input_ids[j, :len(p) + len(a)] = p + a
            mask[j, :len(p) + len(a)] = 1
            loss[j, len(p):len(p) + len(a)] = 1
            answer_pos.append(len(p))
        return input_ids, mask, loss, pixel_values, grids, np.asarray(answer_pos), answers

    words_of = {"content": ("small", "large"), "row": ("top", "middle", "bottom"),
                "column": ("left", "center", "right"), "position": ("left", "right"), "copy": SHAPE_KINDS}

    def longest(fam, probes) -> int:
        """Tokens of the longest prompt + answer the probes can produce (every shape name and answer)."""
        image = [{"type": "image", "image": np.zeros((8, 8, 3), np.uint8)}]
        pads = np.array([[1, 2 * grid, 2 * grid]])
        most = 0
        for probe in probes:
            for kind in SHAPE_KINDS:
                stub = dataclasses.make_dataclass("Stub", ["target", "mask"])(kind, np.zeros(1))
                question, _ = QUESTIONS[probe](stub, 0.5, 0.5, kind, mixed)
                chat = system + [{"role": "user", "content": image + [{"type": "text", "text": question}]}]
                prompt = fam.proc.expand_image_pads(fam.proc.render(chat, add_generation_prompt=True), pads)
                answer = max(len(fam.proc.tokenizer.encode(w, add_special_tokens=False)) for w in words_of[probe])
                most = max(most, len(fam.proc.tokenizer.encode(prompt, add_special_tokens=False)) + answer)
        return most

    def first_tokens_distinct(fam, probe):
        words = words_of[probe]
        firsts = {fam.proc.tokenizer.encode(w, add_special_tokens=False)[0] for w in words}
        if len(firsts) != len(words):
            raise RuntimeError(f"{probe}: the answers {words} do not start with distinct tokens")

    def train_and_eval(fam, probes, seed):
        """Train one fresh model on `probes` (mixed per example); held-out correctness per probe."""
        cfg = fam.cfg
        model = fam.model_cls(cfg, rngs=nnx.Rngs(seed))
        schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, max(1, args.steps // 10), args.steps)
        opt = nnx.Optimizer(model, optax.adamw(schedule, weight_decay=0.0), wrt=nnx.Param)

        @nnx.jit
        def step(model, opt, ids, mask, loss_w, pv, grids, layout):
            def loss_fn(model):
                logits = model(ids, mask, pv, grids, vision_layout=layout)[:, :-1]
                nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), ids[:, 1:, None], -1)[..., 0]
                return (nll * loss_w[:, 1:]).sum() / loss_w[:, 1:].sum()

            value, grads = nnx.value_and_grad(loss_fn)(model)
            opt.update(model, grads)
            return value

        @nnx.jit
        def predict(model, ids, mask, pv, grids, layout):
            return model(ids, mask, pv, grids, vision_layout=layout).argmax(-1)

        rng = np.random.default_rng(seed)
        pad_to = longest(fam, probes)
        t0 = time.perf_counter()
        losses = []
        warm, t_data = min(5, args.steps - 1), 0.0
        for i in range(args.steps):
            if i == warm:  # the first steps compile
                jax.block_until_ready(losses)
                t_warm, t_data = time.perf_counter(), 0.0
            td = time.perf_counter()
            ids, mask, loss_w, pv, grids, _, _ = make_batch(fam, rng, args.batch, i * args.batch, probes, seed, pad_to)
            layout = fam.layout(grids, cfg.vision)
            t_data += time.perf_counter() - td
            losses.append(step(model, opt, ids, mask, loss_w, pv, grids, layout))
        jax.block_until_ready(losses)
        train_s = time.perf_counter() - t0
        if args.steps > 1:
            per = (time.perf_counter() - t_warm) / (args.steps - warm)
            print(f"  {fam.name} seed {seed}: {1e3 * per:.0f} ms a step after the first {warm} "
                  f"({1e3 * t_data / (args.steps - warm):.0f} ms of it making the batch)", flush=True)
        out = {}
        for probe in probes:
            ids, mask, _, pv, grids, answer_pos, answers = make_batch(
                fam, np.random.default_rng(12345), args.held_out, 10**6, [probe], seed, pad_to)
            pred = np.asarray(predict(model, ids, mask, pv, grids, fam.layout(grids, cfg.vision)))
            first = ids[np.arange(len(ids)), answer_pos]
            guessed = pred[np.arange(len(ids)), answer_pos - 1]
            out[probe] = (guessed == first, answers)
        tail = float(np.mean([float(x) for x in losses[-max(1, args.steps // 10):]])) if losses else float("nan")
        return out, train_s, tail

    def majority(answers) -> float:
        answers = np.asarray(answers)
        return float(max(np.mean(answers == a) for a in set(answers.tolist())))

    columns = list(args.wanted) + (["cell"] if {"row", "column"} <= set(args.wanted) else [])
    rows, anchors = [], {}
    for fam in families:
        for probe in args.wanted:
            first_tokens_distinct(fam, probe)
    for seed in args.seed_list:  # seeds outside: a run cut short has both families' rows
        for fam in families:
            groups = [args.wanted] if mixed else [[p] for p in args.wanted]
            correct, answers, seconds, loss_tail = {}, {}, 0.0, []
            for probes in groups:
                out, s, tail = train_and_eval(fam, probes, seed)
                seconds += s
                loss_tail.append(tail)
                for p, (ok, ans) in out.items():
                    correct[p], answers[p] = ok, ans
                    if not mixed:
                        print(f"  {fam.name} seed {seed} {TITLES[p]}: held-out accuracy {ok.mean():.3f} vs majority "
                              f"anchor {majority(ans):.3f} (x{ok.mean() / majority(ans):.2f}); {args.steps} steps of "
                              f"{args.batch}, {s:.0f} s", flush=True)
            if "cell" in columns:
                correct["cell"] = correct["row"] & correct["column"]
                answers["cell"] = [f"{r}-{c}" for r, c in zip(answers["row"], answers["column"])]
            anchors[fam.name] = {p: majority(answers[p]) for p in columns}
            row = {"family": fam.name, "seed": seed, **{p: float(correct[p].mean()) for p in columns},
                   "train_s": seconds, "loss": float(np.mean(loss_tail))}
            rows.append(row)
            print(f"  {fam.name} seed {seed}: " + ", ".join(f"{p} {row[p]:.3f}" for p in columns)
                  + f"; final loss {row['loss']:.3f}; {seconds:.0f} s", flush=True)

    models = "one model per probe" if not mixed else "one model on all probes' questions"
    print(f"\nheld-out accuracy ({args.held_out} images; {models}; {args.steps} steps of {args.batch}, lr {args.lr:g}"
          + ("; cell = row and column both right)" if "cell" in columns else ")"))
    print("| family | seed | " + " | ".join(columns) + " | final loss | train s |")
    print("|---|---|" + "---|" * len(columns) + "---|---|")
    for row in sorted(rows, key=lambda r: (args.families.index(r["family"]), args.seed_list.index(r["seed"]))):
        print(f"| {row['family']} | {row['seed']} | " + " | ".join(f"{row[p]:.3f}" for p in columns)
              + f" | {row['loss']:.3f} | {row['train_s']:.0f} |")
    for name, a in anchors.items():
        print(f"| {name} | majority | " + " | ".join(f"{a[p]:.3f}" for p in columns) + " | | |")
    print(f"total wall time {time.perf_counter() - t_start:.0f} s")
    return rows


if __name__ == "__main__":
    main()
