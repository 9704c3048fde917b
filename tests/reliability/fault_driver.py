"""Runs ``ibis-jax ARGS`` and SIGKILLs itself at a chosen point, as a power cut or the OOM killer
would: ``python fault_driver.py MODE ARGS...``.

MODE ``save:STEP``: while saving the checkpoint of STEP, after its files are written and before
Orbax renames the step folder into place. MODE ``export``: during the HF export, right after the
weights file is written (config.json not yet).
"""

from __future__ import annotations

import os
import signal
import sys


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> int:
    mode, *argv = sys.argv[1:]
    if mode.startswith("save:"):
        step = mode.split(":", 1)[1]
        from orbax.checkpoint._src.path import atomicity

        original = atomicity.AtomicRenameTemporaryPath.finalize

        async def finalize(self, *args, **kwargs):
            final = self._final_path
            if final.name == step and final.parent.name == "checkpoints":
                die()
            return await original(self, *args, **kwargs)

        atomicity.AtomicRenameTemporaryPath.finalize = finalize
    elif mode == "export":
        from ibis_jax.models.qwen2_5_vl import hf_export as params

        original_save = params.save_file

        def save_file(*args, **kwargs):
            original_save(*args, **kwargs)
            die()

        params.save_file = save_file
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    from ibis_jax.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
