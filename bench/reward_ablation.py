"""The paper's reward ablation (Table 5 protocol) on the located-targets control, from ONE SFT model.

GRPO runs from the same SFT export with four reward sets, each with several rollout seeds, and
every GRPO policy is evaluated greedily on the same held-out shapes:

    format+answer           S_format, S_ans
    +click                  ... + S_click
    +pseg                   ... + S_pseg
    +length (all five)      ... + S_len   (the paper's reward)

It writes ``OUT/ablation.md`` (table: held-out IoU / Dice, clicks per episode, turns, first click
on target, mean +- spread over seeds, and the SFT model's row), ``OUT/ablation.json`` (every run)
and ``OUT/ablation.png`` (the three measures per variant, one dot a seed). The paper's direction:
the click, progress and length terms cut the steps (11.29 -> 3.67) and raise the IoU.

The full protocol (the README's control: 400 training shapes, 1,500 SFT steps, 30 GRPO steps of
4 prompts x 4 rollouts, 64 held-out shapes) costs about 4.5 min of GRPO per run on an idle 2-core
CPU, so 4 variants x 2 seeds ~ 40 min plus the SFT:

    python bench/reward_ablation.py --out runs/ablation --seeds 0,1

Smoke scale (minutes):

    python bench/reward_ablation.py --out runs/ablation_smoke --sft-steps 20 --train-shapes 16 \\
        --grpo-steps 1 --grpo-prompts 1 --eval-samples 4 --seeds 0 --variants format+answer,all

``--sft-dir`` reuses an SFT export (e.g. ``runs/located/sft/hf`` of the README's quickstart
command) instead of synthesising and training one. Every stage resumes: a rerun with the same
``--out`` skips finished runs (delete ``OUT/grpo/VARIANT/seedS`` to redo one).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = {
    "format+answer": ("format", "answer"),
    "+click": ("format", "answer", "click"),
    "+pseg": ("format", "answer", "click", "pseg"),
    "all": ("format", "answer", "click", "pseg", "length"),
}
LABELS = {"all": "+length (all five)"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("--sft-dir", default=None, help="an SFT HF export to start every GRPO run from")
    p.add_argument("--sft-config", default=str(ROOT / "configs" / "tiny_cpu.py"))
    p.add_argument("--grpo-config", default=str(ROOT / "configs" / "grpo_tiny_cpu.py"))
    p.add_argument("--sft-steps", type=int, default=1500)
    p.add_argument("--train-shapes", type=int, default=400)
    p.add_argument("--grpo-steps", type=int, default=30)
    p.add_argument("--grpo-prompts", type=int, default=4, help="prompts per GRPO step (x group_size rollouts)")
    p.add_argument("--eval-samples", type=int, default=64)
    p.add_argument("--max-turns", type=int, default=6, help="actions per episode, GRPO and evaluation")
    p.add_argument("--seeds", default="0,1", help="GRPO rollout seeds, comma-separated")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {list(VARIANTS)}")
    p.add_argument("--report-only", action="store_true",
                   help="only write the table and plot from OUT/ablation.json (e.g. of a run cut short)")
    p.add_argument("overrides", nargs="*", help="rl.* and TrainConfig key=value overrides for every GRPO run")
    return p.parse_args(argv)


def sources(args):
    from ibis_jax.data.sources.demo import DemoSource
    from ibis_jax.train.config import load_config

    size = load_config(args.sft_config).image_size
    train = DemoSource(parts=("shapes",), num_shapes=args.train_shapes, shapes_size=size, shapes_per_image=(2, 4),
                       located_targets=True)
    held_out = DemoSource(parts=("shapes",), num_shapes=args.eval_samples, shapes_size=size, seed=1000,
                          shapes_per_image=(2, 4), located_targets=True)
    return train, held_out


def make_sft(args, out: Path, train_source) -> Path:
    """Synthesis + SFT as the quickstart does (resumes); returns the HF export."""
    from ibis_jax.synth import SynthConfig, run_synthesis
    from ibis_jax.train.config import load_config
    from ibis_jax.train.sft import train

    run_synthesis(train_source, out / "data", SynthConfig(max_clicks=8, self_correction=0.2), tool_name="classical",
                  shard_size=16, show_progress=False)
    config = load_config(args.sft_config, [f"max_steps={args.sft_steps}", "checkpoint_every=100"])
    train(config, str(out / "data"), str(out / "sft"))
    if not (out / "sft" / "hf").exists():  # stopped (SIGTERM) before the last step: rerun to resume
        raise SystemExit(f"SFT in {out / 'sft'} did not finish; rerun the same command to resume it")
    return out / "sft" / "hf"


def evaluate_dir(hf_dir: Path, held_out, args, out_dir: Path, name: str) -> dict:
    from ibis_jax.eval.evaluate import EvalConfig, evaluate
    from ibis_jax.generate.policy import ModelPolicy
    from ibis_jax.generate.sampler import SamplerConfig
    from ibis_jax.tools.classical import ClassicalTool

    cfg = EvalConfig(max_steps=args.max_turns, batch_size=16, curve_clicks=6, ks=(1, 3, 5), num_examples=0,
                     policy_name=name)
    policy = ModelPolicy.from_pretrained_dir(str(hf_dir), sampler_config=SamplerConfig(max_new_tokens=96))
    o = evaluate(policy, ClassicalTool(), held_out, config=cfg, out_dir=out_dir)["overall"]
    return {k: o[k] for k in ("mean_iou", "mean_dice", "avg_steps", "avg_turns", "first_click_hit_rate",
                              "parse_failure_rate", "samples")}


def run_grpo(args, sft_dir: Path, samples, variant: str, seed: int, workdir: Path) -> dict:
    from ibis_jax.commands.grpo import rl_config_from
    from ibis_jax.rl.trainer import train_grpo
    from ibis_jax.tools.classical import ClassicalTool
    from ibis_jax.train.config import load_config

    train_items = [o for o in args.overrides if not o.startswith("rl.")]
    rl_items = [f"rl.steps={args.grpo_steps}", f"rl.prompts_per_step={args.grpo_prompts}", f"rl.seed={seed}",
                f"rl.max_turns={args.max_turns}", f"rl.rewards={','.join(VARIANTS[variant])}"]
    rl_items += [o for o in args.overrides if o.startswith("rl.")]
    config = load_config(args.grpo_config, train_items)
    rl = rl_config_from(rl_items, args.grpo_config)
    out = train_grpo(config, rl, samples, ClassicalTool(), str(workdir), init_dir=str(sft_dir))
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    half = max(1, len(rows) // 2)
    first, last = rows[:half], rows[half:] or rows[-1:]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)
    return {"export_dir": out["export_dir"],
            "rollout": {k: [mean(first, k), mean(last, k)] for k in ("reward", "iou", "steps_per_episode")}}


def summarise(runs: list[dict], sft: dict) -> tuple[str, dict]:
    import numpy as np

    keys = [("mean_iou", "held-out IoU (%)", 100), ("mean_dice", "Dice (%)", 100), ("avg_steps", "clicks / episode", 1),
            ("avg_turns", "turns / episode", 1), ("first_click_hit_rate", "first click on target (%)", 100)]
    header = ["rewards", "seeds"] + [label for _, label, _ in keys] + ["rollout steps (first -> second half)",
                                                                      "GRPO s / run"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    sft_cells = ["SFT (the start of every run)", "-"] + [f"{sft[k] * scale:.2f}" for k, _, scale in keys] + ["", ""]
    lines.append("| " + " | ".join(sft_cells) + " |")
    table = {}
    for variant in dict.fromkeys(r["variant"] for r in runs):
        group = [r for r in runs if r["variant"] == variant]
        cells = [LABELS.get(variant, variant), ",".join(str(r["seed"]) for r in group)]
        table[variant] = {}
        for k, _, scale in keys:
            values = np.array([r["eval"][k] for r in group]) * scale
            table[variant][k] = values.tolist()
            spread = f" +- {values.std():.2f}" if len(values) > 1 else ""
            cells.append(f"{values.mean():.2f}{spread}")
        steps = np.array([r["rollout"]["steps_per_episode"] for r in group])
        cells.append(f"{steps[:, 0].mean():.2f} -> {steps[:, 1].mean():.2f}")
        cells.append(f"{np.mean([r['grpo_seconds'] for r in group]):.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines), table


def plot(table: dict, sft: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("mean_iou", "held-out IoU (%)", 100), ("avg_steps", "clicks / episode", 1),
              ("first_click_hit_rate", "first click on target (%)", 100)]
    names = list(table)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4))
    for ax, (k, title, scale) in zip(axes, panels):
        for i, v in enumerate(names):
            vals = table[v][k]
            ax.scatter([i] * len(vals), vals, color="C0", zorder=3)
            ax.hlines(sum(vals) / len(vals), i - 0.25, i + 0.25, color="C0")
        ax.axhline(sft[k] * scale, color="grey", linestyle="--", label="SFT")
        ax.set_xticks(range(len(names)), [LABELS.get(n, n) for n in names], rotation=20, fontsize=8)
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.suptitle("GRPO reward ablation from one SFT model (located-targets control; dots: seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> int:
    import logging

    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    results_path = out / "ablation.json"
    if args.report_only:
        done = json.loads(results_path.read_text())
        return write_report(args, out, done, [r for r in done["runs"] if r["variant"] in variants], None)
    train_source, held_out = sources(args)
    t0 = time.perf_counter()
    sft_dir = Path(args.sft_dir) if args.sft_dir else make_sft(args, out, train_source)
    sft_seconds = time.perf_counter() - t0
    samples = [s for item in train_source.items() for s in train_source.load(item) if s.mask.any()]
    done = json.loads(results_path.read_text()) if results_path.exists() else {"runs": []}
    if "sft" not in done:
        done["sft"] = evaluate_dir(sft_dir, held_out, args, out / "eval" / "sft", "SFT")
        results_path.write_text(json.dumps(done, indent=1))
    runs = [r for r in done["runs"] if r["variant"] in variants and r["seed"] in seeds]
    # Seed-major: every variant gets its first seed before any gets a second (a cut-short run
    # still compares all the variants).
    for seed in seeds:
        for variant in variants:
            if any(r["variant"] == variant and r["seed"] == seed for r in runs):
                continue
            workdir = out / "grpo" / variant.replace("+", "plus_") / f"seed{seed}"
            t1 = time.perf_counter()
            info = run_grpo(args, sft_dir, samples, variant, seed, workdir)
            grpo_seconds = time.perf_counter() - t1
            metrics = evaluate_dir(Path(info["export_dir"]), held_out, args, out / "eval" / workdir.relative_to(out / "grpo"),
                                   f"GRPO {variant} seed {seed}")
            runs.append({"variant": variant, "seed": seed, "eval": metrics, "rollout": info["rollout"],
                         "grpo_seconds": grpo_seconds, "eval_seconds": time.perf_counter() - t1 - grpo_seconds})
            done["runs"] = runs + [r for r in done["runs"] if r not in runs]
            results_path.write_text(json.dumps(done, indent=1))
            print(f"{variant} seed {seed}: IoU {metrics['mean_iou']:.4f} clicks {metrics['avg_steps']:.2f} "
                  f"first-click-on-target {metrics['first_click_hit_rate']:.3f} ({grpo_seconds:.0f} s GRPO)", flush=True)
    return write_report(args, out, done, runs, sft_seconds)


def write_report(args, out: Path, done: dict, runs: list[dict], sft_seconds: float | None) -> int:
    if not runs:
        raise SystemExit(f"no finished GRPO runs in {out / 'ablation.json'}")
    table_md, table = summarise(runs, done["sft"])
    sft_dir = args.sft_dir
    scale = (f"SFT {'from ' + str(sft_dir) if sft_dir else f'{args.sft_steps} steps on {args.train_shapes} shapes'}; "
             f"GRPO {args.grpo_steps} steps x {args.grpo_prompts} prompts x G rollouts; "
             f"{args.eval_samples} held-out shapes; seeds {args.seeds}; overrides {args.overrides or 'none'}")
    timing = "" if sft_seconds is None else f" SFT stage {sft_seconds:.0f} s in this invocation (0 when reused or resumed)."
    text = (f"# GRPO reward ablation (Table 5 protocol, located-targets control)\n\n{scale}.{timing}\n\n{table_md}\n\n"
            "![ablation](ablation.png)\n")
    (out / "ablation.md").write_text(text)
    plot(table, done["sft"], out / "ablation.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
