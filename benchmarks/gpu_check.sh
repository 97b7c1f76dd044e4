#!/usr/bin/env bash
# Real-GPU check in one go (DESIGN.md "Triton kernels"): the CUDA tests, then the GPU benchmark
# with its peers, logs and JSON into OUTDIR. Runs from a source tree with the machine's own
# torch/triton; the C++ extension is built only if the build tools are there (CUDA needs none of it).
#   usage: benchmarks/gpu_check.sh OUTDIR [extra `slmkern bench` args, e.g. --shape 2048x8192]
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu_check.sh OUTDIR [bench args]}
shift
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY=${PYTHON:-python3}
mkdir -p "$OUT"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
unset TRITON_INTERPRET

{ nvidia-smi || true; "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
  > "$OUT/machine.txt" 2>&1
if "$PY" -c "import pybind11, cmake, ninja" 2>/dev/null; then
  timeout 300 "$PY" setup.py build_ext --inplace -q > "$OUT/build.log" 2>&1 || echo "build failed (see build.log)"
fi
"$PY" -m slmkern.cli info > "$OUT/info.txt" 2>&1
timeout 420 "$PY" -m pytest tests -q -m cuda -x -p no:cacheprovider > "$OUT/tests_cuda.log" 2>&1
echo "cuda tests rc=$?" | tee -a "$OUT/summary.txt"
timeout 420 "$PY" -m slmkern.cli bench --device cuda --json "$OUT/bench_cuda.json" "$@" > "$OUT/bench_cuda.log" 2>&1
echo "cuda bench rc=$?" | tee -a "$OUT/summary.txt"
tail -n 40 "$OUT/bench_cuda.log"
