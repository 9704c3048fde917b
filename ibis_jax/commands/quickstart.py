"""``ibis-jax quickstart``: the whole system on the demo data, on a CPU, in one command.

1. synthesize cold-start trajectories on the demo images with the classical tool;
2. SFT the tiny Qwen2.5-VL (random init, offline tokenizer) on them;
3. GRPO from the SFT export, multi-turn with the classical tool in the loop;
4. evaluate the oracle, the SFT model and the GRPO model on held-out demo shapes;
5. write ``report.md`` (tables, curves, example episodes).

Every stage resumes (synthesis shards, Orbax checkpoints), so a rerun continues where it stopped;
``--clean`` starts over. The tiny model has two layers and a random initialisation: it learns the
action format and rough clicking, not medical segmentation; the numbers show the pipeline works.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny_cpu.py"


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/quickstart", help="working and report folder")
    parser.add_argument("--clean", action="store_true", help="delete --out first and start over")
    parser.add_argument("--sft-steps", type=int, default=400)
    parser.add_argument("--grpo-steps", type=int, default=16)
    # The tiny model samples well-formed turns far less often at temperature 1 (80 % of rollouts
    # failed to parse, and at lr 3e-4 GRPO drove the entropy from 0.7 to 2.1); 0.7 and 1e-4 keep it
    # stable. The trainer's own default stays the paper's 1.0.
    parser.add_argument("--grpo-lr", type=float, default=1e-4)
    parser.add_argument("--grpo-prompts", type=int, default=2, help="prompts per GRPO step (x 4 rollouts each)")
    parser.add_argument("--max-turns", type=int, default=6, help="actions per episode (GRPO and evaluation)")
    parser.add_argument("--t-opt", type=int, default=3, help="GRPO length reward: steps without penalty")
    parser.add_argument("--seed", type=int, default=0,
                        help="SFT seed: the tiny model's initialisation and the data order (the table's spread)")
    parser.add_argument("--grpo-seed", type=int, default=0, help="GRPO rollout sampling seed")
    parser.add_argument("--grpo-temperature", type=float, default=0.7, help="GRPO rollout sampling temperature")
    parser.add_argument("--train-parts", default="mri,nuclei,shapes", help="demo parts of the training set")
    parser.add_argument("--train-shapes", type=int, default=48, help="synthetic shapes in the training set")
    parser.add_argument("--shapes-per-image", type=_min_max, default=(2, 4),
                        help="MIN,MAX shapes in a synthetic image, target included (1,1: no distractors)")
    parser.add_argument("--position-tint", type=float, default=0.0,
                        help="grey levels of the colour ramps that write the position into the synthetic "
                             "images (0: none); a random-init model cannot otherwise see where a shape is")
    parser.add_argument("--located-targets", action="store_true",
                        help="name each synthetic target with its grid cell ('upper-left blob'): the query then "
                             "says where to click (the control experiment for a policy that cannot see where)")
    parser.add_argument("--eval-samples", type=int, default=64, help="held-out shapes evaluated")
    parser.add_argument("--config", default=str(CONFIG), help="TrainConfig file for SFT and GRPO")
    parser.set_defaults(run=run_command)


def _min_max(text: str) -> tuple[int, int]:
    """``"MIN,MAX"`` -> ``(MIN, MAX)`` with 1 <= MIN <= MAX; argparse reports the error."""
    try:
        lo, hi = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX (two integers, e.g. 2,4), got {text!r}") from None
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"expected 1 <= MIN <= MAX, got {text!r}")
    return lo, hi


def _stage(name: str, times: dict[str, float]):
    class Timer:
        def __enter__(self):
            print(f"\n== {name} ==", flush=True)
            self.start = time.perf_counter()

        def __exit__(self, *exc):
            times[name] = round(time.perf_counter() - self.start, 1)
            print(f"== {name}: {times[name]} s", flush=True)

    return Timer()


def run_command(args: argparse.Namespace) -> int:
    """``--out`` local or ``gs://`` (built in a local staging folder, uploaded and committed at the end)."""
    from ibis_jax.commands.remote import run_with_storage

    return run_with_storage(args, run)


def run(args: argparse.Namespace) -> int:
    import warnings

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    from ibis_jax.data.sources.demo import DemoSource
    from ibis_jax.synth import ConfigMismatch, SynthConfig, run_synthesis
    from ibis_jax.eval.evaluate import EvalConfig, evaluate
    from ibis_jax.agent.oracle import OraclePolicy
    from ibis_jax.generate.policy import ModelPolicy
    from ibis_jax.generate.sampler import SamplerConfig
    from ibis_jax.rl.trainer import RLConfig, train_grpo
    from ibis_jax.rl.grpo import GRPOConfig
    from ibis_jax.rl.rewards import RewardConfig
    from ibis_jax.tools.classical import ClassicalTool
    from ibis_jax.train.config import load_config
    from ibis_jax.train.sft import train

    out = Path(args.out)  # local: a gs:// --out is staged and uploaded by run_with_storage
    if args.clean and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    config = load_config(args.config, [f"max_steps={args.sft_steps}", "checkpoint_every=100", f"seed={args.seed}",
                                       f"shuffle_seed={args.seed}"])
    image = config.image_size
    per_image = args.shapes_per_image
    # Training prompts and held-out evaluation images: different shapes (another seed), same size.
    train_source = DemoSource(parts=tuple(args.train_parts.split(",")), mri_slices=2, nuclei_tiles=4,
                              num_shapes=args.train_shapes, shapes_size=image, shapes_per_image=per_image,
                              position_tint=args.position_tint, located_targets=args.located_targets)
    eval_source = DemoSource(parts=("shapes",), num_shapes=args.eval_samples, shapes_size=image, seed=1000,
                             shapes_per_image=per_image, position_tint=args.position_tint,
                             located_targets=args.located_targets)

    with _stage("1. synthesize trajectories", times):
        try:
            stats = run_synthesis(train_source, out / "data", SynthConfig(max_clicks=8, self_correction=0.2),
                                  tool_name="auto", shard_size=16, show_progress=True)
        except ConfigMismatch as e:  # an older run's data under the same --out: say the quickstart's fix
            print(f"ibis-jax quickstart: error: {out} holds a run made with other settings ({e}). "
                  f"Rerun with --clean to start over, or pick another --out.", file=sys.stderr)
            return 1
    with _stage("2. SFT", times):
        sft = train(config, str(out / "data"), str(out / "sft"), progress=True)
    sft_dir = out / "sft" / "hf"
    with _stage("3. GRPO", times):
        samples = [s for item in train_source.items() if item.item_id.startswith("shapes")
                   for s in train_source.load(item)]
        # Episodes as long as the evaluation's; T_opt scaled to that budget (the paper's 5 is for 20
        # actions), so S_len can tell a short episode from a long one.
        rl = RLConfig(steps=args.grpo_steps, prompts_per_step=args.grpo_prompts, max_turns=args.max_turns, max_new_tokens=96,
                      seed=args.grpo_seed, temperature=args.grpo_temperature,
                      grpo=GRPOConfig(group_size=4), reward=RewardConfig(t_opt=args.t_opt),
                      seq_buckets=(max(config.seq_buckets) + 128,),
                      # The quickstart's tuned recipe decays the rate over its 16 steps (SFT's
                      # cosine without warmup); the paper's constant rate is the GRPO default.
                      lr_schedule="cosine")
        grpo_config = dataclasses.replace(config, lr=args.grpo_lr, warmup_frac=0.0, checkpoint_every=1_000_000)
        grpo = train_grpo(grpo_config, rl, samples, ClassicalTool(), str(out / "grpo"), init_dir=str(sft_dir))
        for stage, result in (("SFT", sft), ("GRPO", grpo)):
            p = result["programs"]
            print(f"{stage}: {p['compiled']} programs compiled, {p['from_cache']} from the compilation cache")
    runs = {}
    with _stage("4. evaluate", times):
        cfg = EvalConfig(max_steps=args.max_turns, batch_size=16, curve_clicks=6, ks=(1, 3, 5), num_examples=2)
        greedy = SamplerConfig(max_new_tokens=96)
        policies = {
            "oracle": OraclePolicy(stop_iou=0.9, max_clicks=args.max_turns),
            "SFT": ModelPolicy.from_pretrained_dir(str(sft_dir), sampler_config=greedy),
            "SFT + GRPO": ModelPolicy.from_pretrained_dir(str(out / "grpo" / "hf"), sampler_config=greedy),
        }
        for name, policy in policies.items():
            runs[name] = evaluate(policy, ClassicalTool(), eval_source,
                                  config=dataclasses.replace(cfg, policy_name=name),
                                  out_dir=out / "eval" / name.replace(" ", "").replace("+", "_"))
    report = write_report(out, stats, sft, grpo, runs, times)
    print(f"\nquickstart finished in {sum(times.values()):.0f} s; report: {report}")
    return 0


def _curve(path: Path, keys: list[str], png: Path, title: str) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not path.exists():
        return False
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3))
    for ax, key in zip([axes] if len(keys) == 1 else axes, keys):
        ax.plot([r["step"] for r in rows if key in r], [r[key] for r in rows if key in r])
        ax.set_title(key)
        ax.set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    from ibis_jax.fileio import atomic_file

    with atomic_file(png, ".png") as partial:
        fig.savefig(partial, dpi=90)
    plt.close(fig)
    return True


def write_report(out: Path, stats, sft, grpo, runs, times) -> Path:
    from ibis_jax.eval.report import comparison_markdown


    names = list(runs)
    lines = ["# ibis-jax quickstart report", ""]
    lines += ["## Stages (seconds in this run; a stage that resumed finished only loads)", "", "| stage | s |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in times.items()] + [""]
    lines += ["## Evaluation on held-out demo shapes (classical tool)", "",
              comparison_markdown([runs[n] for n in names], names), ""]
    lines += ["| policy | first click on target | well-formed turns | parse-failure rate | avg. turns | end reasons |",
              "|---|---|---|---|---|---|"]
    for n in names:
        o = runs[n]["overall"]
        reasons = ", ".join(f"{k} {v}" for k, v in o.get("end_reasons", {}).items())
        lines.append(f"| {n} | {o.get('first_click_hit_rate', float('nan')):.3f} | {o.get('well_formed_rate', float('nan')):.3f} "
                     f"| {o.get('parse_failure_rate', float('nan')):.3f} | {o.get('avg_turns', float('nan')):.2f} | {reasons} |")
    lines.append("")
    if _curve(out / "sft" / "metrics.jsonl", ["loss", "action_accuracy"], out / "sft_curve.png", "SFT"):
        lines += ["## SFT", "", "![SFT curves](sft_curve.png)", ""]
    if _curve(out / "grpo" / "metrics.jsonl", ["reward", "iou", "steps_per_episode"], out / "grpo_curve.png", "GRPO"):
        lines += ["## GRPO", "", "![GRPO curves](grpo_curve.png)", ""]
    examples = sorted((out / "eval").glob("*/examples/*.png"))
    if examples:
        lines += ["## Example episodes", ""] + [f"![{p.parent.parent.name}]({p.relative_to(out)})" for p in examples[:6]]
    from ibis_jax.fileio import atomic_write_text

    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
