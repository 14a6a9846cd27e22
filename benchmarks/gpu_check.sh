#!/usr/bin/env bash
# One prepared run on a CUDA machine: the CUDA tests, kernel parity and GPU throughput (benchmarks/gpu_check.py).
# Installs nothing: torch (CUDA build), transformers and, for the kernel check, mamba-ssm + causal-conv1d must already
# be there. Usage: benchmarks/gpu_check.sh [OUTPUT_DIR]   (default benchmarks/results)
# Exit status: that of gpu_check.py (0 ok, 1 mismatch/failure, 2 no CUDA, 3 kernels missing), or 1 if the CUDA
# tests fail.
set -uo pipefail

cd "$(dirname "$0")/.."
OUT_DIR="${1:-benchmarks/results}"
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
PYTHON="${PYTHON:-python3}"

echo "== machine"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
else
    echo "nvidia-smi not found"
fi
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "ERROR: torch sees no CUDA device; nothing to check here." >&2
    exit 2
fi
"$PYTHON" - <<'PY'
import importlib
for name in ("torch", "transformers", "mamba_ssm", "causal_conv1d"):
    try:
        module = importlib.import_module(name)
        print(f"{name}: {getattr(module, '__version__', '?')}")
    except Exception as error:  # report any import failure, e.g. a kernel built for another torch
        print(f"{name}: NOT AVAILABLE ({type(error).__name__}: {error})")
PY

tests_status=0
echo "== CUDA tests (kernel path vs PyTorch path)"
if "$PYTHON" -c "import pytest" 2>/dev/null; then
    "$PYTHON" -m pytest tests/test_mamba_block.py -q -m cuda -rs || tests_status=1
else
    echo "pytest not installed: skipping the CUDA tests (gpu_check.py below checks the same parity)"
fi

echo "== kernel parity and throughput"
"$PYTHON" benchmarks/gpu_check.py --json "$OUT_DIR/gpu_check.json"
check_status=$?

if [ "$check_status" -ne 0 ]; then
    exit "$check_status"
fi
exit "$tests_status"
