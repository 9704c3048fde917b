"""Commands with ``gs://`` outputs and model inputs: :func:`run_with_storage`.

A command's body works on local folders. This wraps it: ``--out`` local or ``gs://`` (a local
staging folder, uploaded and committed only when the body returns 0, ``storage.output_dir``),
model folders (``--policy``, ``--model``) staged down from ``gs://`` (committed exports only,
verified), inputs read from local files only checked (a URL is refused in one line), and an
unknown scheme anywhere refused before anything runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

from ibis_jax import storage


class _Failed(Exception):
    def __init__(self, code: int):
        self.code = code


def run_with_storage(args: argparse.Namespace, body: Callable[[argparse.Namespace], int], *, out: str = "out",
                     models: Sequence[str] = (), local_inputs: Sequence[str] = ()) -> int:
    """``body(args)`` with ``args.<out>`` a local folder and ``args.<models>`` local model dirs;
    returns its exit code. ``args.remote_out`` holds the ``--out`` the user gave (for messages)."""
    flag = lambda name: "--" + name.replace("_", "-")  # noqa: E731
    remote = storage.check_path(getattr(args, out), flag(out))
    for name in local_inputs:
        storage.check_local(getattr(args, name, None), flag(name))
    changes = {"remote_out": remote}
    for name in models:
        value = getattr(args, name, None)
        if value and value.strip().lower() != "oracle":
            changes[name] = storage.stage_input(value, flag(name))
    try:
        with storage.output_dir(remote, flag(out)) as local:
            code = body(argparse.Namespace(**{**vars(args), **changes, out: local}))
            if code:
                raise _Failed(code)  # leaves the block by an exception: nothing is uploaded or committed
    except _Failed as failed:
        return failed.code
    if storage.is_remote(remote):
        print(f"uploaded and committed {remote}")
    return 0
