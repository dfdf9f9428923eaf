#!/usr/bin/env bash
# One prepared device check (at most 8 minutes on one H100/H200; no network, no install):
#   benchmarks/gpu_check.sh              # on the GPU; the JSON goes to $OUT (default benchmarks/results/)
#   benchmarks/gpu_check.sh --dry-run    # every stage on the CPU at tiny sizes, to check the script
# What it runs and records: benchmarks/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
exec timeout --signal=INT 540 python3 benchmarks/gpu_check.py "$@"
