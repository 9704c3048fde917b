#!/usr/bin/env bash
# The GPU suite (bench/gpu_suite.py): parity, decode, SFT MFU, sidecar, seconds per case.
# Under 8 minutes on one GPU; writes ${OUT:-gpu_suite}.json and .md. Extra arguments go to the
# driver, e.g. `bash bench/gpu_suite.sh --dry-run` (shapes only, any CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
# JAX and torch share the GPU: JAX takes half of its memory instead of 75 %.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.5}"
exec timeout "${SUITE_TIMEOUT_S:-480}" python bench/gpu_suite.py --out "${OUT:-gpu_suite}" "$@"
