"""Shared by tests/eval: the real-format writers of tests/data (PNG, NIfTI, DICOM) by plain name."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "data"))
