"""Regenerates ``tool_bridge_pb2.py`` / ``tool_bridge_pb2_grpc.py`` from ``tool_bridge.proto``.

Run from the repository root: ``python -m tool_bridge.proto.generate``. The generated modules are
committed so that clients need only ``grpcio`` and ``protobuf`` at run time (not grpcio-tools);
they embed the protobuf version they were generated with, and the runtime must be at least that.
"""

from __future__ import annotations

import pathlib
import sys


def main(out_root: str | None = None) -> int:
    """Writes the modules under ``out_root`` (default: the repository root, i.e. in place)."""
    from grpc_tools import protoc  # only needed here, not at run time

    here = pathlib.Path(__file__).resolve().parent
    root = here.parent.parent
    out = out_root or str(root)
    proto = here.relative_to(root) / "tool_bridge.proto"
    args = ["protoc", f"-I{root}", f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}", str(proto)]
    return protoc.main(args)


if __name__ == "__main__":
    sys.exit(main())
