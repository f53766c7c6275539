#!/usr/bin/env bash
# The GPU quality check of the step caches (docs/performance.md): the real model renders one 5 s clip at 512 px with
# sampling=official and sampling=fast and prints wall time, forwards, FLOPs and PSNR/SSIM of fast against official.
# One GPU, under 10 minutes.
#
#   tests/gpu/quality.sh                               # WEIGHTS=DIR (default weights/hunyuan_avatar), OUT=DIR
#   tests/gpu/quality.sh sampling.cache_threshold=0.05 # overrides for both renders
#
# Without a GPU or without the weights it prints why and exits 0. Uses .venv or $PYTHON.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-.venv/bin/python}"
if [ ! -x "$PYTHON" ] && ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "gpu quality: skipped (no $PYTHON)"
    exit 0
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}" HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout --signal=INT --kill-after=15 "${QUALITY_TIMEOUT:-590}" "$PYTHON" -m tests.gpu.quality "$@"
