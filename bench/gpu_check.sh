#!/usr/bin/env bash
# One GPU check, in one command that ends within ~9.5 minutes on an H100/H200:
#   1. a short `kgen tune --gpu <present>` over the small-batch, long-context workloads of issue 13
#      (records into tuning_db/<gpu>/)
#   2. the kernel benchmarks on issue 13's suite (default vs tuned variant vs torch SDPA reading
#      unexpanded KV heads, % of copy bandwidth, graph-replay time, per-kernel device time) and
#      its targets, met or missed, against the committed baseline; fp8-KV and window rows
#   3. the kernel correctness suite on the GPU (compiled kernels, not the interpreter), the split
#      planner / fixed grid tests and the CUDA-graph decode test, then the tests marked `gpu`
#      (tests/test_gpu_*.py: bf16 tensor-core dots, 32k contexts, the tuner's timing path,
#      generate() on compiled kernels), which the CPU suite skips
#   4. decode steps per second with and without CUDA graphs (bench/decode_steps.py)
#   5. the end-to-end decode throughput benchmark (runtime.generate vs HF generate)
#   6. the runtime's prefill throughput with kgen's kernels against its SDPA prefill
#      (bench/prefill_throughput.py), and vLLM's CUSTOM (kgen) backend against stock TRITON_ATTN,
#      steps/s at batch 1, 8, 64 with and without full CUDA graphs (bench/vllm_gpu_steps.py;
#      it records "not run" where vLLM is not installed)
# Every result lands, with provenance (bench/_common.py: commit, dirty, date, machine, command; set
# KGEN_COMMIT where the checkout has no .git), in files that can be committed:
#   bench/results/<gpu>/{env.json,tune.log,kernel_bench.{json,md},kernel_tests.log,gpu_tests.log,
#                        decode_steps.{json,md},e2e_throughput.{json,md},prefill_throughput.{json,md},
#                        vllm_gpu_steps.{json,md}}
#   tuning_db/<gpu>/...
# It needs only torch and triton on the machine (python3 with both). Other dependencies
# (optuna and what it needs) are installed from wheels given in $KGEN_WHEELS (default ./.whl) when
# they are missing: see bench/README.md for the one `pip download` line that makes that folder.
# When $OUT is set (a remote runner's output folder) results are also packed, after every step,
# into $OUT/gpu_results.tar.gz, so a run cut short still returns what it finished.
#
# Usage: bash bench/gpu_check.sh [--quick]      (--quick: fewer workloads and shapes)
# Without a GPU it runs the same steps at a tiny size under the Triton interpreter (a smoke test
# of the script itself; its timings mean nothing). Environment overrides: KGEN_RESULTS (results
# folder), KGEN_DB (tuning database folder), T_TUNE / T_BENCH / T_TESTS / T_GPU_TESTS / T_STEPS /
# T_E2E / T_PREFILL / T_VLLM (step limits, s; they add up to 560 s).
set -u
cd "$(dirname "$0")/.."
REPO=$(pwd)
QUICK=${1:-}
T_TESTS=${T_TESTS:-60}; T_GPU_TESTS=${T_GPU_TESTS:-80}; T_TUNE=${T_TUNE:-90}; T_BENCH=${T_BENCH:-160}
T_STEPS=${T_STEPS:-50}; T_E2E=${T_E2E:-30}; T_PREFILL=${T_PREFILL:-30}; T_VLLM=${T_VLLM:-60}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
START=$(date +%s)
FAILED=""
pack() {
  [ -n "${OUT:-}" ] && [ -n "${RES:-}" ] && tar czf "$OUT/gpu_results.tar.gz" "$RES" "$DB/${GPU:-none}" 2>/dev/null
  return 0
}
step() { pack; echo; echo "=== [$(( $(date +%s) - START ))s] $*"; }
check() { local rc=$?; [ $rc -eq 0 ] || FAILED="$FAILED $1(rc=$rc)"; }
# a log starts with its provenance line (bench/_common.py): header LOG COMMAND
header() {
  $PY -c 'import sys; sys.path.insert(0, "bench"); import _common
print("# " + _common.provenance_line(_common.provenance(command=sys.argv[1])))' "$2" > "$1" 2>/dev/null \
    || echo "# Provenance: unavailable ($2)" > "$1"
}

WHEELS=${KGEN_WHEELS:-$REPO/.whl}
if ! $PY -c "import optuna" 2>/dev/null && [ -d "$WHEELS" ]; then
  step "installing missing Python packages from $WHEELS"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/kgen_site "$WHEELS"/*.whl && export PYTHONPATH=/tmp/kgen_site
fi
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
KGEN="$PY -m kgen.cli"

if $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  unset TRITON_INTERPRET
  GPU=$($PY -c "from kgen.device import detect_gpu; print(detect_gpu().name)")
  if [ "$QUICK" = "--quick" ]; then
    TUNE_ARGS="--head-dim 128 --block-size 16 --dtype bf16 --group-size 8 --batch 1 --context 32768 --trials 4 --no-audit"
    BENCH_ARGS="--suite --dtypes bf16"
    STEPS_ARGS="--batches 1,4"
    PREFILL_ARGS="--cases 1x2048,8x512"
  else  # the suite's small-batch rows (and their neighbours), where a tuned variant can win
    TUNE_ARGS="--head-dim 128 --block-size 16 --dtype bf16 --group-size 8,1 --batch 1,4 --context 32768,8192 --trials 4 --no-audit"
    BENCH_ARGS="--suite"
    STEPS_ARGS=""
    PREFILL_ARGS=""
  fi
  TEST_ARGS=$($PY -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")
else  # no GPU: the same steps, tiny, under the interpreter
  export TRITON_INTERPRET=1
  GPU=interpreter
  TUNE_ARGS="--head-dim 64 --block-size 16 --dtype fp16 --group-size 2 --batch 1 --context 16 --trials 2"
  BENCH_ARGS="--quick --cpu --dtypes fp16 --groups 8 --shapes 2x40"
  STEPS_ARGS="--quick --cpu --batches 1"
  PREFILL_ARGS="--quick --cpu"
  TEST_ARGS="-k d64-b16"
fi
# without a GPU the steps run tiny under the interpreter, whose speed depends on the machine's load:
# their limits are stretched (they only catch a hang there)
SCALE=1; [ "$GPU" = interpreter ] && SCALE=4
lim() { echo $(( $1 * SCALE )); }
RES=${KGEN_RESULTS:-bench/results/$GPU}
DB=${KGEN_DB:-tuning_db}
mkdir -p "$RES"
step "device: $GPU -> $RES, database $DB"
$PY - "$RES/env.json" $QUICK <<'EOF'
import json, subprocess, sys
sys.path.insert(0, "bench")
import _common
info = _common.machine_info()
info["provenance"] = _common.provenance(command="bash bench/gpu_check.sh " + " ".join(sys.argv[2:]))
try:
    info["nvidia_smi"] = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"],
        capture_output=True, text=True, timeout=20).stdout.strip()
except Exception as exc:  # nvidia-smi missing: note it, go on
    info["nvidia_smi"] = f"unavailable: {exc}"
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(json.dumps(info, indent=2))
EOF

step "1. kgen tune --gpu $GPU"
set -o pipefail
header "$RES/tune.log" "kgen tune --gpu $GPU $TUNE_ARGS --db $DB --resume --quiet"
timeout "$(lim $T_TUNE)" $KGEN tune --gpu "$GPU" $TUNE_ARGS --db "$DB" --resume --quiet 2>&1 \
    | tee -a "$RES/tune.log" | tail -n 25
check tune
$KGEN db show --gpu "$GPU" --db "$DB" 2>&1 | tail -n 20

step "2. kernel benchmarks"
timeout "$(lim $T_BENCH)" $PY bench/kernel_bench.py $BENCH_ARGS --json "$RES/kernel_bench.json" \
    --md "$RES/kernel_bench.md" 2>&1 | tail -n 30
check kernel_bench

step "3. kernel correctness on the $GPU"
KERNEL_TESTS="tests/test_kernels_interp.py tests/test_emit.py tests/test_split_plan.py tests/test_cuda_graphs.py"
header "$RES/kernel_tests.log" "pytest -q $TEST_ARGS $KERNEL_TESTS"
timeout "$(lim $T_TESTS)" $PY -m pytest -q -p no:cacheprovider $TEST_ARGS $KERNEL_TESTS 2>&1 \
    | tee -a "$RES/kernel_tests.log" | tail -n 25
check kernel_tests
# the `gpu`-marked tests (skipped, with the reason, where there is no GPU)
header "$RES/gpu_tests.log" "pytest -q -rs -m gpu tests/test_gpu_*.py"
timeout "$(lim $T_GPU_TESTS)" $PY -m pytest -q -p no:cacheprovider -rs -m gpu tests/test_gpu_*.py 2>&1 \
    | tee -a "$RES/gpu_tests.log" | tail -n 25
check gpu_tests

step "4. decode steps per second with and without CUDA graphs"
timeout "$(lim $T_STEPS)" $PY bench/decode_steps.py $STEPS_ARGS --json "$RES/decode_steps.json" \
    --md "$RES/decode_steps.md" 2>&1 | tail -n 12
check decode_steps

step "5. end-to-end decode throughput"
timeout "$(lim $T_E2E)" $PY bench/e2e_throughput.py --quick --json "$RES/e2e_throughput.json" \
    --md "$RES/e2e_throughput.md" 2>&1 | tail -n 20
check e2e

step "6. prefill throughput (kgen vs SDPA) and vLLM CUSTOM vs TRITON_ATTN"
timeout "$(lim $T_PREFILL)" $PY bench/prefill_throughput.py $PREFILL_ARGS --json "$RES/prefill_throughput.json" \
    --md "$RES/prefill_throughput.md" 2>&1 | tail -n 12
check prefill_throughput
timeout "$(lim $T_VLLM)" $PY bench/vllm_gpu_steps.py --json "$RES/vllm_gpu_steps.json" \
    --md "$RES/vllm_gpu_steps.md" 2>&1 | tail -n 12
check vllm_gpu_steps

step "done in $(( $(date +%s) - START ))s; failed steps:${FAILED:- none}"
pack
[ -z "$FAILED" ]
