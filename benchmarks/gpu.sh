#!/usr/bin/env bash
# One prepared GPU run (see benchmarks/gpu.py): the full-size Gemma-2b- and Mistral-7B-shaped
# pairs on one large GPU, no network, under 8 minutes. Results: $OUT/gpu-results.json (or
# ./gpu-results.json), plus the console table in gpu-results.log next to it.
#
#   bash benchmarks/gpu.sh                 # budget 450 s for the parts; hard stop at 470 s
#   bash benchmarks/gpu.sh --budget-s 400  # extra arguments go to gpu.py
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
DEST="${OUT:-.}"
mkdir -p "$DEST"
# The script's own time guard keeps it inside its budget; `timeout` is the backstop
# (SIGTERM at $GPU_TIMEOUT_S, default 470 s, SIGKILL 10 s later). Results written after each
# part survive.
timeout -k 10 "${GPU_TIMEOUT_S:-470}" "$PY" benchmarks/gpu.py --out "$DEST/gpu-results.json" "$@" 2>&1 | tee "$DEST/gpu-results.log"
