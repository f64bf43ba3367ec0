#!/usr/bin/env bash
# GPU check for UltraMem Lab (run when a CUDA GPU is available; under 5 minutes on one GPU).
#
#   1. every test marked @pytest.mark.gpu (CUDA timer / memory / ceilings / profiler paths, layers,
#      the tiny end-to-end inference benchmark with the two-stream skip-layer overlap), 4 min cap;
#   2. a short inference benchmark on the GPU (bfloat16; B = 1, 16, 256, 4096; layer + whole model,
#      cost-model prediction, skip-layer overlap), written to $OUT_DIR/inference/{inference.parquet,
#      inference.html} and printed.
#
# Usage: scripts/gpu_check.sh            (PYTHON=... to pick the interpreter, OUT_DIR=... for outputs)
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3 || command -v python)"
OUT_DIR="${OUT_DIR:-bench_out/gpu_check}"

"$PY" - <<'PYEOF'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA GPU (torch.cuda.is_available() is False); nothing to check")
print(f"gpu_check: torch {torch.__version__}, {torch.cuda.get_device_name(0)}")
PYEOF

echo "== gpu-marked tests =="
timeout 240 "$PY" -m pytest -m gpu -q -x -p no:cacheprovider

echo "== short inference benchmark (GPU, bfloat16) =="
timeout 150 "$PY" -m labcore.bench inference --device cuda --dtype bfloat16 \
    --batch-sizes 1,16,256,4096 --warmup 3 --repeats 10 --out "$OUT_DIR/inference"

echo "gpu_check: OK"
