"""Outputs that are never half-written, and JSON reads that name their file.

Every file a command leaves behind is written under a temporary name in the same folder and
renamed into place when complete (``os.replace`` is atomic on POSIX), so a crash, SIGKILL or full
disk leaves either the old file or the new one, never a torn one. Folders (an HF export, a
tokenizer) are built in a hidden sibling folder and renamed in the same way (:func:`atomic_dir`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ibis_jax.errors import DataError, UserError

PARTIAL = ".partial-"  # infix of temporary files and folders (``.NAME.partial-XXXX``)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}{PARTIAL}{os.getpid()}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Writes ``data`` to ``path`` through a temporary file, fsync and a rename."""
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, data: Any, indent: int | None = 1) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=indent, ensure_ascii=False))


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """A temporary path to write with any library (``suffix``: the extension it needs, e.g.
    ``.nii.gz``); renamed to ``path`` when the block ends without an exception, removed otherwise."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{PARTIAL}{os.getpid()}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a folder in a hidden sibling and rename it to ``path`` when the block succeeds.

    An existing ``path`` is replaced only then (moved aside, the new one renamed in, the old one
    deleted). On an exception the partial folder is deleted; folders left by a killed process
    (``.NAME.partial-*``) are deleted the next time ``path`` is built.
    """
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}{PARTIAL}*"):
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}{PARTIAL}", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}{PARTIAL}old-{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """``json.load`` of ``path``; a missing, empty or malformed file raises an error naming it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(2, f"no such {what}", str(path)) from None
    if not text.strip():
        raise DataError(f"{path}: empty {what} (a write was interrupted?); rewrite it or rerun the "
                        "command that makes it")
    try:
        return json.loads(text)
    except ValueError as e:
        raise DataError(f"{path}: not valid JSON ({e}); rewrite it or rerun the command that makes it") from None


def write_png_atomic(path: str | os.PathLike, rgb) -> Path:
    """An RGB ``uint8 [H, W, 3]`` image as a PNG, written atomically."""
    import cv2
    import numpy as np

    ok, data = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(rgb, dtype=np.uint8), cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"{path}: PNG encoding failed")
    return atomic_write_bytes(path, data.tobytes())


def is_remote(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an object store or other filesystem by URL (``gs://``, ``s3://``)."""
    return "://" in os.fspath(path)


def as_path(path: str | os.PathLike):
    """``path`` through ``etils.epath`` (Orbax's own path layer): a URL (``gs://...``) as it is,
    where its filesystem library is installed; a local path made absolute."""
    from etils import epath

    return epath.Path(path) if is_remote(path) else epath.Path(os.path.abspath(os.fspath(path)))


def local_workdir(path: str | os.PathLike, what: str = "--workdir") -> str:
    """``path`` when it is local; a URL is refused with one line (the trainers write metrics,
    TensorBoard events and the HF export as local files: a ``gs://`` workdir is trained in its
    spool, ``ibis_jax.storage.spool``, which uploads them)."""
    if is_remote(path):
        raise UserError(f"{what} {os.fspath(path)}: train in a local spool of it, ibis_jax.storage.spool(URL) (the "
                        "sft and grpo commands do), or give a local path")
    return os.fspath(path)
