#!/usr/bin/env bash
# Full-scale GPU check (issue 14): SD3.5-medium-shaped model, all 24 layers, 512 px, bf16 — train-step seconds,
# MFU, peak GPU memory, plain and CRFM images per second — as JSON in $OUT (or the folder given), < 8 minutes.
#   bash benchmarks/gpu_check.sh [OUTDIR]        # PYTHON=... to pick the interpreter
set -euo pipefail
cd "$(dirname "$0")/.."
OUTDIR="${1:-${OUT:-runs/gpu_check}}"
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

status=0
"$PY" -c 'import sys
try:
    import torch
except ImportError:
    sys.exit(2)
sys.exit(0 if torch.cuda.is_available() else 3)' 2>/dev/null || status=$?
if [ "$status" = 2 ]; then
    echo "gpu_check: $PY cannot import torch; set PYTHON to the project's interpreter" >&2
    exit 2
elif [ "$status" != 0 ]; then
    echo "gpu_check: no CUDA device (torch.cuda.is_available() is False with $PY); run it on a GPU machine" >&2
    exit 3
fi
mkdir -p "$OUTDIR"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUTDIR/gpu.csv" 2>/dev/null || true
# 24 layers: 5 timed train steps + FLOP count, VAE encode, 3 plain + 3 CRFM images of 28 steps (k = 4)
timeout 450 "$PY" benchmarks/bench_fullscale.py --device cuda --layers 24 --steps 5 --sample-steps 28 \
    --crfm-steps 4 --images 3 --mixed-precision bf16 --json "$OUTDIR/fullscale_gpu.json" \
    2>&1 | tee "$OUTDIR/fullscale_gpu.log"
echo "gpu_check: wrote $OUTDIR/fullscale_gpu.json"
