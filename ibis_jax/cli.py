"""The ``ibis-jax`` command line.

Each sub-command lives in its own module exposing ``register(parser)``; that function adds the
sub-command's arguments and sets ``run`` (a callable taking the parsed namespace and returning an
exit code). Modules are imported lazily so ``ibis-jax tool serve`` never imports JAX and
``ibis-jax synth`` never imports torch.

Errors: :func:`main` is the one place that turns expected failures (``ibis_jax.errors``: bad
config or override, missing or unreadable files, an unreachable tool, corrupt data) into one line
on stderr, ``ibis-jax COMMAND: error: MESSAGE``, exit code 1; usage errors exit 2, also on one
line. ``--debug`` (before the command) or ``IBIS_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# sub-command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": ("ibis_jax.commands.quickstart", "synth -> SFT -> GRPO -> eval on the demo data, with a report"),
    "demo": ("ibis_jax.commands.demo", "oracle episodes with the classical tool on sample images"),
    "synth": ("ibis_jax.commands.synth", "synthesize cold-start click trajectories from a dataset"),
    "grpo": ("ibis_jax.commands.grpo", "agentic GRPO from an SFT checkpoint with a tool in the loop"),
    "sft": ("ibis_jax.commands.sft", "supervised fine-tuning (cold start) on trajectory records"),
    "tool": ("tool_bridge.cli", "serve or ping a segmentation tool over gRPC"),
    "eval": ("ibis_jax.commands.eval", "evaluate a policy (oracle or a model) with a tool on a test source"),
    "segment": ("ibis_jax.commands.segment", "run the agent on one image; write the mask and an HTML report"),
    "plan": ("ibis_jax.commands.plan", "compile SFT / GRPO / rollouts for a TPU slice or GPU node: does it fit?"),
}


# Commands that jit with the persistent compilation cache on (`ibis_jax.compilation`). Not `plan`:
# it measures compile times; not `tool`: the sidecar never imports JAX.
CACHED_COMMANDS = ("quickstart", "demo", "synth", "grpo", "sft", "eval", "segment")


class _Parser(argparse.ArgumentParser):
    """Usage errors on one line (``PROG: error: MESSAGE (see PROG --help)``), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = _Parser(prog="ibis-jax", description="Agentic interactive biomedical segmentation in JAX.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of expected errors too")
    parser.add_argument("--compilation-cache", default=None, metavar="DIR|off",
                        help="JAX's persistent compilation cache (default $IBIS_COMPILATION_CACHE or "
                             "~/.cache/ibis-jax/xla; 'off' disables it)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text)
        # Only the chosen command's module is imported: the others may need heavy packages.
        if name == chosen:
            importlib.import_module(module).register(command_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help()
        return 2
    from ibis_jax.errors import debug_enabled, expected_errors, one_line

    if args.command in CACHED_COMMANDS:
        from ibis_jax.compilation import enable_compilation_cache

        enable_compilation_cache(args.compilation_cache)
    try:
        return int(args.run(args) or 0)
    except Exception as e:  # expected failures become one line; anything else keeps its traceback
        if args.debug or debug_enabled() or not isinstance(e, expected_errors()):
            raise
        print(f"ibis-jax {args.command}: error: {one_line(e)}", file=sys.stderr)
        return int(getattr(e, "exit_code", 1))


if __name__ == "__main__":
    sys.exit(main())
