#!/usr/bin/env bash
# The GPU check (docs/performance.md): attention backend, a full-width 2 + 2 block forward at the real token count
# (time, TFLOP/s, MFU), peak memory against the memory model, SageAttention against SDPA (attention.kernel=sage,
# where installed), fp8 compute and compile parity, host syncs. One GPU,
# under 8 minutes.
#
#   tests/gpu/check.sh                 # all checks; OUT=DIR also writes DIR/gpu_check.json and DIR/gpu_check.md
#   tests/gpu/check.sh forward fp8     # some of: attention sage forward fp8 compile syncs
#
# Without a GPU it prints why and exits 0. Uses .venv (made by `make install` when missing) or $PYTHON.
set -euo pipefail
cd "$(dirname "$0")/../.."

if [ -z "${PYTHON:-}" ] && [ ! -x .venv/bin/python ] && ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu check: skipped (no nvidia-smi and no .venv: no GPU here)"
    exit 0
fi
if [ -z "${PYTHON:-}" ]; then
    if [ ! -x .venv/bin/python ]; then
        echo "gpu check: installing .venv (make install)"
        make install >/dev/null
    fi
    PYTHON=.venv/bin/python
fi
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu check: skipped (no CUDA GPU visible to torch)"
    exit 0
fi
exec timeout --signal=INT --kill-after=15 "${CHECK_TIMEOUT:-470}" "$PYTHON" -m tests.gpu.check "$@"
