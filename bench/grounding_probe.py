"""Can the tiny random-init Qwen2.5-VL learn *what* is in an image, and *where*?

The GRPO demo needs a policy whose clicks depend on the image. This probe trains fresh tiny
models (the quickstart's architecture and tokenizer, random init) on one-shape images with a short
prompt and a one-word answer, and prints held-out accuracy against the majority-class anchor
measured on the same held-out set:

- content probe: "small" or "large" (target area below / above 5.5 % of the image);
- position probe: "left" or "right" (target centroid column below / above the middle);
- copy probe: the prompt names a shape at random ("Segment the ring in this image."), the answer
  repeats that name: does the model read the query at all? With ``--system-prompt full`` the
  330-token agent instructions stand between the start and the query, as in the agent format.

It also prints how far the decoder's multimodal RoPE turns across the visual-token grid: in
Qwen2.5-VL the width axis takes the lowest RoPE frequencies, so on the tiny config's 4 x 4 grid at
rope_theta 1e6 two columns differ by < 1e-3 rad; the decoder cannot tell them apart by position,
and the vision tower has no absolute position embedding either. ``--position-tint 40`` draws the
images with colour ramps that write each pixel's position into its colour, which makes position
a property of the content.

    python bench/grounding_probe.py [--steps 400] [--theta 1e6] [--position-tint 0] [--probes content,position,copy] [--seed 0]
        [--system-prompt none|short|full]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def rope_turn(head_dim: int, sections: tuple[int, int, int], theta: float, grid: int) -> dict[str, float]:
    """Largest angle (rad) by which the fastest band of each mRoPE axis turns between the first and
    the last visual token of a `grid` x `grid` image."""
    inv = theta ** (-np.arange(0, head_dim, 2) / head_dim)
    starts = np.cumsum([0, *sections])
    return {axis: float(inv[starts[i]:starts[i + 1]].max() * (grid - 1))
            for i, axis in enumerate(("temporal", "height", "width")) if axis != "temporal"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--theta", type=float, default=None, help="decoder rope_theta (default: the tiny preset's)")
    ap.add_argument("--image-size", type=int, default=112)
    ap.add_argument("--position-tint", type=float, default=0.0,
                    help="colour ramps that write the position into the pixels (see make_shape_sample)")
    ap.add_argument("--probes", default="content,position", help="which probes to run (content, position, copy)")
    ap.add_argument("--system-prompt", default="none", choices=("none", "short", "full"),
                    help="system prompt in front of the image and question (agent/prompts.py)")
    ap.add_argument("--seed", type=int, default=0, help="model initialisation and training-image seed")
    args = ap.parse_args()
    wanted = args.probes.split(",")
    if set(wanted) - {"content", "position", "copy"}:
        ap.error(f"--probes {args.probes!r}: choose from content, position, copy")

    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from ibis_jax.agent.prompts import system_prompt
    from ibis_jax.data.shapes import SHAPE_KINDS, make_shape_sample
    from ibis_jax.models.qwen2_5_vl import Qwen25VL, Qwen25VLConfig, vision_layout
    from ibis_jax.models.qwen2_5_vl.processor import Qwen25VLProcessor
    from ibis_jax.models.qwen2_5_vl.tiny import make_tokenizer_dir, tiny_config

    tok_dir = make_tokenizer_dir(os.path.join(tempfile.mkdtemp(), "tok"))
    proc = Qwen25VLProcessor(tok_dir)
    cfg = tiny_config(tok_dir)
    if args.theta is not None:
        cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, rope_theta=args.theta))
    grid = args.image_size // 28
    t = cfg.text
    print(f"mRoPE turn across the {grid}x{grid} visual grid, fastest band (rad):")
    print(f"  tiny (head_dim {t.head_dim}, sections {t.mrope_section}, theta {t.rope_theta:g}): "
          f"{rope_turn(t.head_dim, t.mrope_section, t.rope_theta, grid)}")
    big = Qwen25VLConfig.qwen2_5_vl_7b().text
    print(f"  Qwen2.5-VL-7B at 504 px (18x18 grid): {rope_turn(big.head_dim, big.mrope_section, big.rope_theta, 18)}")

    # Each probe: (question, answer) from the sample, its target's centroid column and a random shape name.
    probes = {
        "content (small / large)": lambda s, cx, name: (f"Where is the {s.target}?",
                                                        "small" if s.mask.mean() < 0.055 else "large"),
        "position (left / right)": lambda s, cx, name: (f"Where is the {s.target}?", "left" if cx < 0.5 else "right"),
        "copy (the query's shape name)": lambda s, cx, name: (f"Segment the {name} in this image.", name),
    }
    system = [] if args.system_prompt == "none" else [{"role": "system", "content": system_prompt(args.system_prompt)}]

    def make_batch(rng, n, start, label):
        images, prompts, answer_pos, answers = [], [], [], []
        for i in range(n):
            s = make_shape_sample(args.image_size, rng, start + i, (1, 1), args.position_tint)
            cx = float(np.nonzero(s.mask)[1].mean()) / args.image_size
            # the copy probe's name from its own stream, so the other probes' images stay as they were
            name = SHAPE_KINDS[np.random.default_rng([args.seed, start + i]).integers(len(SHAPE_KINDS))]
            question, answer = label(s, cx, name)
            chat = system + [{"role": "user", "content": [{"type": "image", "image": s.image},
                                                          {"type": "text", "text": question}]}]
            images.append(s.image)
            prompts.append(proc.render(chat, add_generation_prompt=True))
            answers.append(answer)
        pixel_values, grids = proc.images(images)
        rows = []
        for prompt, g, ans in zip(prompts, grids, answers):
            p = proc.tokenizer.encode(proc.expand_image_pads(prompt, g[None]), add_special_tokens=False)
            a = proc.tokenizer.encode(ans, add_special_tokens=False)
            rows.append((p, a))
        length = max(len(p) + len(a) for p, a in rows)
        input_ids = np.zeros((n, length), np.int32)
        mask = np.zeros((n, length), np.int32)
        loss = np.zeros((n, length), np.float32)
        for j, (p, a) in enumerate(rows):
            input_ids[j, :len(p) + len(a)] = p + a
            mask[j, :len(p) + len(a)] = 1
            loss[j, len(p):len(p) + len(a)] = 1
            answer_pos.append(len(p))
        return input_ids, mask, loss, pixel_values, grids, np.asarray(answer_pos), answers

    for name, label in probes.items():
        if name.split()[0] not in wanted:
            continue
        model = Qwen25VL(cfg, rngs=nnx.Rngs(args.seed))
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

        rng = np.random.default_rng(args.seed)
        held = make_batch(np.random.default_rng(12345), 128, 10**6, label)
        t0 = time.perf_counter()
        for i in range(args.steps):
            ids, mask, loss_w, pv, grids, _, _ = make_batch(rng, args.batch, i * args.batch, label)
            step(model, opt, ids, mask, loss_w, pv, grids, vision_layout(grids, cfg.vision))
        ids, mask, _, pv, grids, answer_pos, answers = held
        pred = np.asarray(predict(model, ids, mask, pv, grids, vision_layout(grids, cfg.vision)))
        first = np.array([ids[j, answer_pos[j]] for j in range(len(ids))])
        guessed = np.array([pred[j, answer_pos[j] - 1] for j in range(len(ids))])
        accuracy = float(np.mean(guessed == first))
        majority = max(np.mean(np.array(answers) == a) for a in set(answers))
        print(f"{name}: held-out accuracy {accuracy:.3f} vs majority anchor {majority:.3f} "
              f"(x{accuracy / majority:.2f}); {args.steps} steps of {args.batch}, {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
