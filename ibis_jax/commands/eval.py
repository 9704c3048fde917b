"""``ibis-jax eval``: a policy with a tool over a test source, scored like the paper.

Examples::

    ibis-jax eval --policy oracle --tool classical --source demo --demo-parts shapes --out runs/eval-oracle
    ibis-jax eval --policy ckpt/hf --tool localhost:50051 --source folder --root BiomedParseData/amos22 \\
        --split test --out runs/eval-amos --history full
    ibis-jax eval --policy ckpt/hf --vqa slake/test.json --image-root slake/imgs --out runs/vqa-slake
    ibis-jax eval --policy oracle --source volumes --volumes mni:3 --max-steps 10 --out runs/eval-mni3d
    ibis-jax eval --policy ckpt/hf --source volumes --volumes scans.json --out runs/eval-ct3d

Writes ``OUT/metrics.json``, ``OUT/metrics.md`` (the paper's table layout), ``OUT/cases.jsonl``,
one trajectory record per episode (``OUT/trajectories-00000-of-00001.array_record``, the shape
``synth`` writes) and ``OUT/examples/`` (pictures and HTML reports). With ``--vqa``: closed-ended
VQA exact-match accuracy in ``OUT/vqa_metrics.json``. With ``--source volumes``: 3D episodes
(``--volumes ellipsoids[:N]``, ``mni[:FACTOR]`` or a manifest JSON of NIfTI / DICOM scans with
label maps), 3D IoU / Dice / NoC and the surface Dice; no records or example pictures.
"""

from __future__ import annotations

import argparse
import sys

from ibis_jax.agent.conversation import HISTORY_MODES
from ibis_jax.commands.synth import SOURCE_NAMES, add_source_arguments, build_source
from ibis_jax.data.clicks import CLICK_RULES
from ibis_jax.data.queries import QUERY_STYLES


def register(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = __doc__.split("\n\n", 1)[1] if __doc__ else None
    parser.add_argument("--policy", required=True, help="'oracle' (click simulator, upper bound) or a model dir")
    parser.add_argument("--tool", default="auto", help="'auto' (the classical tool's preset per target; "
                        "default), 'classical', 'classical-tissue', a bridge HOST:PORT, or module:factory")
    parser.add_argument("--source", choices=SOURCE_NAMES, help="test data (not with --vqa); 'volumes': 3D episodes "
                        "from --volumes")
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--history", default=None, choices=HISTORY_MODES,
                        help="turns the policy sees (docs/design.md section 1); default: what the model was trained with")
    parser.add_argument("--max-steps", type=int, default=20, help="actions per episode (default 20)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N samples")
    parser.add_argument("--batch-size", type=int, default=8, help="episodes per batched policy call")
    parser.add_argument("--max-rows", type=int, default=None,
                        help="sampler rows per batch (continuous batching: a finished episode's row takes the "
                             "batch's next one; use a --batch-size above it); default: one row per episode")
    parser.add_argument("--query-style", default="direct", choices=QUERY_STYLES, help="first-turn query style")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--on-error", default="raise", choices=("raise", "skip"), help="bad source items")
    parser.add_argument("--examples", type=int, default=4, help="example episodes drawn under OUT/examples")
    oracle = parser.add_argument_group("oracle policy and interactive metrics")
    oracle.add_argument("--rule", default="ritm", choices=CLICK_RULES, help="oracle click rule (docs/design.md section 3)")
    oracle.add_argument("--oracle-stop-iou", type=float, default=0.9,
                        help="the oracle terminates at this IoU in the agent run (0 = never; default 0.9); the "
                             "NoC/mIoU curves always run with early stop off")
    oracle.add_argument("--curve-clicks", type=int, default=20, help="clicks of the NoC/mIoU curves (default 20)")
    vqa = parser.add_argument_group("closed-ended VQA")
    vqa.add_argument("--vqa", default=None, help="JSON list of {image, question, answer} (SLAKE/VQA-RAD/PathVQA)")
    vqa.add_argument("--image-root", default=None, help="folder the VQA image paths are relative to")
    parser.add_argument("--nsd-tolerance", type=float, default=2.0, help="volumes: surface Dice tolerance, mm")
    add_source_arguments(parser)
    parser.set_defaults(run=run_command)


def run_command(args: argparse.Namespace) -> int:
    """``--policy`` and ``--out`` local or ``gs://``: a remote policy is staged into the local cache
    (committed exports only, verified); the outputs are written to a local staging folder and
    uploaded and committed (the marker last) when the evaluation succeeded."""
    from ibis_jax.commands.remote import run_with_storage

    return run_with_storage(args, lambda local: _run(local, policy_name=args.policy, shown=args.out),
                            models=("policy",), local_inputs=("vqa", "image_root"))


def _run(args: argparse.Namespace, policy_name: str, shown: str) -> int:
    from ibis_jax.data.sources import SourceError
    from ibis_jax.eval import EvalConfig, PolicyUnavailable, evaluate, load_policy
    from ibis_jax.eval.report import comparison_markdown, interactive_markdown
    from tool_bridge.factory import make_tool

    try:
        if (args.vqa is None) == (args.source is None):
            raise ValueError("give exactly one of --source (segmentation) or --vqa FILE (closed-ended VQA)")
        policy = load_policy(args.policy, rule=args.rule, stop_iou=args.oracle_stop_iou or None,
                             max_clicks=args.max_steps, volume_clicker=args.volume_clicker or "3d")
        tool = make_tool(args.tool, volumes=args.source == "volumes", slice_rule=args.slice_rule)
        policy_name = "oracle" if args.policy.strip().lower() == "oracle" else policy_name
        if args.vqa:
            from ibis_jax.eval.vqa import evaluate_vqa, load_vqa

            items = load_vqa(args.vqa, args.image_root)[: args.limit]
            metrics = evaluate_vqa(policy, tool, items, history=args.history, max_steps=args.max_steps,
                                   batch_size=args.batch_size, out_dir=args.out, policy_name=policy_name)
            print(f"closed-ended VQA: {metrics['questions']} questions, exact-match accuracy "
                  f"{100 * metrics['accuracy']:.2f}% -> {shown}/vqa_metrics.json")
            return 0
        source = build_source(args)
        config = EvalConfig(
            history=args.history, max_steps=args.max_steps, batch_size=args.batch_size, max_rows=args.max_rows,
            limit=args.limit, query_style=args.query_style, seed=args.seed, curve_clicks=args.curve_clicks,
            on_error=args.on_error,
            num_examples=args.examples, policy_name=policy_name, tool_name=args.tool, source_name=args.source,
            nsd_tolerance_mm=args.nsd_tolerance, slice_rule=args.slice_rule,
        )
        metrics = evaluate(policy, tool, source, config=config, out_dir=args.out, show_progress=True)
    except (SourceError, PolicyUnavailable, ValueError, FileNotFoundError) as e:
        print(f"ibis-jax eval: error: {e}", file=sys.stderr)
        return 1
    print(comparison_markdown([metrics]))
    print()
    print(f"Interactive ({metrics['interactive']['curve']}):")
    print(interactive_markdown([metrics]))
    overall = metrics["overall"]
    if "mean_nsd" in overall:
        print(f"\n3D: Dice {overall['mean_dice']:.4f}, IoU {overall['mean_iou']:.4f}, "
              f"NSD@{args.nsd_tolerance:g}mm {overall['mean_nsd']:.4f}, clicks {overall['avg_steps']:.2f}")
    print(f"\nend reasons {overall['end_reasons']}, parse failures {100 * overall['parse_failure_rate']:.1f}%, "
          f"per case: generation {overall['generate_seconds_per_case']:.3f} s, tool "
          f"{overall['tool_seconds_per_case']:.3f} s; {metrics['seconds']} s in all")
    records = f", {metrics['records'].replace(args.out, shown)} and {len(metrics['examples'])} example files" if metrics["records"] else ""
    print(f"wrote {shown}/metrics.json, metrics.md, cases.jsonl{records}")
    return 0
