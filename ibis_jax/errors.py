"""Expected failures and how the command line reports them.

A command fails in two ways: a *user* problem (a bad config file or override, a missing, empty or
unreadable data file, an unreachable tool, corrupt data) or a bug. A user problem is reported as
ONE line on stderr naming the file or field and the fix, exit code 1; a bug keeps its traceback.
:func:`ibis_jax.cli.main` is the one place that decides: it catches :func:`expected_errors` and
prints :func:`one_line` of them. ``--debug`` or ``IBIS_DEBUG=1`` re-raises (full traceback).

Code that detects a user problem raises :class:`UserError` (or one of the project's existing
``ValueError`` families: ``SourceError``, ``RecordError``, ``ImageError``, ``WindowError``...)
with a message that says what is wrong, where, and what to do.
"""

from __future__ import annotations

import os
import sys

DEBUG_ENV = "IBIS_DEBUG"


class UserError(Exception):
    """A failure the user can fix; its message names the file or field and the fix."""

    exit_code = 1


class DataError(UserError, ValueError):
    """Corrupt or incomplete data (a shard, a checkpoint, a JSON file)."""


# (module, class name) of the project's own expected-failure types, imported lazily so the CLI
# never imports JAX or torch just to know them. ValueError and OSError come last: the project
# raises ValueError with a user-facing message for bad values (config fields, overrides, sources),
# and OSError carries the file name (missing, unreadable, not a directory, disk full).
_EXPECTED = (
    ("ibis_jax.tools.protocol", "ToolError"),
    ("ibis_jax.eval.policies", "PolicyUnavailable"),
    ("ibis_jax.synth.runner", "ConfigMismatch"),
)


def expected_errors() -> tuple[type[BaseException], ...]:
    """The exception types a command reports as one line (see the module docstring)."""
    types: list[type[BaseException]] = [UserError]
    for module, name in _EXPECTED:
        # Only modules already imported: an error of a type whose module never loaded cannot occur.
        mod = sys.modules.get(module)
        if mod is not None and hasattr(mod, name):
            types.append(getattr(mod, name))
    return (*types, ValueError, OSError)


def one_line(error: BaseException) -> str:
    """The error's message on one line (newlines folded), with the file of an ``OSError``."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        text = f"{error.filename}: {error.strerror}"
    else:
        text = str(error) or type(error).__name__
    if isinstance(error, KeyError) and text.startswith("'"):
        text = f"missing key {text}"
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").lower() not in ("", "0", "false", "no")
