"""User code by name: ``package.module:attr`` (importable) or ``path/to/file.py:attr`` (a file).

One loader for every plug-in point: reasoning teachers, custom segmentation tools, rewards.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any


def load_object(spec: str, *, what: str = "plug-in") -> Any:
    """The attribute ``attr`` of the module or file named by ``spec`` (``where:attr``).

    Errors name the spec and the fix: a missing ``:``, a missing file or module, a missing name.
    """
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise ValueError(f"{what} {spec!r}: write module.path:name or path/to/file.py:name")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise FileNotFoundError(f"{what} {spec!r}: no file {path}")
        module_spec = importlib.util.spec_from_file_location(f"ibis_user_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise ImportError(f"{what} {spec!r}: cannot import {where} ({e})") from None
    if not hasattr(module, name):
        raise AttributeError(f"{what} {spec!r}: {where} has no callable named {name!r}")
    return getattr(module, name)
