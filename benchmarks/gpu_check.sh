#!/usr/bin/env bash
# GPU check in one prepared run: versions, in-place build, the CUDA/Triton tests, the GPU benchmark.
#
#   benchmarks/gpu_check.sh OUTDIR
#
# Writes into OUTDIR (10 files): env.log, build.log, tests.log, tests.xml (JUnit), bench.log,
# bench_gpu.json (one row per measurement, from `slmkern bench --device cuda --json`),
# bench_gpu_sparse.json (benchmarks/gpu_sparse.py),
# bench_gpu_int4.json and bench_gpu_int4_prefill.json (int4 ops at (4096, 14336), M = 1, 16, and
# at (2048, 8192), M = 2048) and
# summary.txt (one line per step: rc and seconds). Every step runs and keeps its log even if an
# earlier one failed; the exit status is non-zero if any step failed. Installs nothing except,
# with pip, test/build tools that are missing (torch and triton must already be there).
# Budget: a few minutes on an H200 (most of it Triton compiling each autotune config once).
#
# Knobs (environment): PYTHON (default python3), TEST_WORKERS (pytest-xdist workers, default 8
# when xdist is installed; 0 = serial), BENCH_ARGS (extra `slmkern bench` arguments),
# STEP_TIMEOUT_TESTS / STEP_TIMEOUT_BENCH / STEP_TIMEOUT_BENCH_INT4 (seconds, defaults 240 / 150 / 60 per int4 step; the whole script stays under the device tool's 600 s per command).
set -u -o pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
unset TRITON_INTERPRET SLMKERN_TEST_NO_INTERPRET
: >"$OUT/summary.txt"
FAILED=0

# step NAME LOGFILE TIMEOUT_S CMD...: run CMD, append its output to LOGFILE and the console.
step() {
    local name=$1 log=$2 limit=$3
    shift 3
    local t0=$SECONDS rc
    echo "=== $name: $* (limit ${limit}s)" | tee -a "$log"
    timeout --kill-after=20 "$limit" "$@" 2>&1 | tee -a "$log"
    rc=$?
    echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$OUT/summary.txt"
    [ "$rc" -eq 0 ] || FAILED=1
    return 0
}

# --- 1. versions and tools ---------------------------------------------------------------------
ENV_LOG="$OUT/env.log"
: >"$ENV_LOG"
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  host: $(hostname)  repo: $ROOT"
    git -C "$ROOT" log -1 --oneline 2>/dev/null || true
    nvidia-smi || echo "nvidia-smi failed"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv || true
} 2>&1 | tee -a "$ENV_LOG"
step versions "$ENV_LOG" 120 "$PY" -c '
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except ImportError as exc:
    print("triton MISSING:", exc)
print("cuda available:", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device:", p.name, "cc", f"{p.major}.{p.minor}", "SMs", p.multi_processor_count,
          "mem GiB", round(p.total_memory / 2**30, 1))
'
MISSING=$("$PY" - <<'EOF'
import importlib.util
need = {"pytest": "pytest", "pytest_benchmark": "pytest-benchmark", "hypothesis": "hypothesis",
        "pybind11": "pybind11", "cmake": "cmake", "ninja": "ninja"}
print(" ".join(pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None))
EOF
)
if [ -n "$MISSING" ]; then
    step pip_install "$ENV_LOG" 180 "$PY" -m pip install -q --disable-pip-version-check $MISSING
else
    echo "test/build tools present" | tee -a "$ENV_LOG"
fi

# --- 2. build the C++ extension in place ---------------------------------------------------------
step build "$OUT/build.log" 240 "$PY" setup.py build_ext --inplace
if ! "$PY" -c "import slmkern.kernels, slmkern.benchmarks" 2>/dev/null; then
    # setup.py installs kernels/ and benchmarks/ as slmkern.kernels and slmkern.benchmarks; a source tree
    # has neither until the (offline) editable install. The tests and the benchmarks below need both.
    step editable_install "$OUT/build.log" 240 "$PY" -m pip install -q --no-deps --no-build-isolation \
        --no-index --disable-pip-version-check -e .
fi
step import "$OUT/build.log" 120 "$PY" -c '
import slmkern, torch
from slmkern._backends import cpu, triton as tb
print("slmkern._C:", cpu.has_cpp(), "| triton kernels:", tb.has_triton_kernels(), tb._IMPORT_ERROR or "")
print(slmkern.info())
'

# --- 3. CUDA + Triton tests ------------------------------------------------------------------------
WORKERS=${TEST_WORKERS:-8}
XDIST=()
if [ "$WORKERS" != "0" ] && "$PY" -c "import xdist" 2>/dev/null; then
    XDIST=(-n "$WORKERS")  # parallel processes: Triton compiles each config once per process type
fi
step tests "$OUT/tests.log" "${STEP_TIMEOUT_TESTS:-240}" "$PY" -m pytest -q tests -k "cuda or triton" \
    -p no:cacheprovider -rfEs --durations=15 --junitxml="$OUT/tests.xml" ${XDIST[@]+"${XDIST[@]}"}

# --- 4. GPU benchmark (slmkern vs cuBLAS bf16, torch._int_mm, ...) ---------------------------------
# shellcheck disable=SC2086  # BENCH_ARGS is a list of words
step bench "$OUT/bench.log" "${STEP_TIMEOUT_BENCH:-150}" "$PY" -m slmkern.cli bench --device cuda \
    --json "$OUT/bench_gpu.json" ${BENCH_ARGS:-}
# int4 ops beyond the default shapes (peers cublas_bf16, tinygemm): a 7B-class MLP shape, and
# prefill M = 2048 (w4a16 dequantizes + cuBLAS there; the target is >= 0.9x cublas_bf16).
step bench_int4 "$OUT/bench.log" "${STEP_TIMEOUT_BENCH_INT4:-60}" "$PY" -m slmkern.cli bench --device cuda \
    --op w4a16_linear --op w4a8_linear --shape 4096x14336 --m 1,16 --json "$OUT/bench_gpu_int4.json"
step bench_int4_prefill "$OUT/bench.log" "${STEP_TIMEOUT_BENCH_INT4:-60}" "$PY" -m slmkern.cli bench \
    --device cuda --op w4a16_linear --op w4a8_linear --shape 2048x8192 --m 2048 \
    --json "$OUT/bench_gpu_int4_prefill.json"

# 2:4 and unstructured sparse kernels vs cuBLAS bf16, cuSPARSELt (to_sparse_semi_structured),
# torch._int_mm and tinygemm (benchmarks/gpu_sparse.py; its own rows and table).
if [ -f benchmarks/gpu_sparse.py ]; then
    step bench_sparse "$OUT/bench.log" "${STEP_TIMEOUT_BENCH_SPARSE:-150}" "$PY" benchmarks/gpu_sparse.py \
        --json "$OUT/bench_gpu_sparse.json"
fi

echo "=== summary ($OUT)"
cat "$OUT/summary.txt"
exit "$FAILED"
