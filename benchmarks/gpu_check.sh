#!/usr/bin/env bash
# One-shot GPU check (see benchmarks/gpu_check.py): run from anywhere in the checkout, on one GPU, < 5 min.
#   bash benchmarks/gpu_check.sh [--out benchmarks/results/gpu-check.json] [--tiny]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec python "$root/benchmarks/gpu_check.py" "$@"
