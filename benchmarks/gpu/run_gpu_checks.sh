#!/usr/bin/env bash
# GPU checks of gradstab's CUDA kernels, for a machine with an NVIDIA GPU (written for an H100).
# Run from the repository root, in an environment with a CUDA build of torch and a CUDA toolkit:
#
#   bash benchmarks/gpu/run_gpu_checks.sh            # everything
#   STEPS="build tests" bash benchmarks/gpu/run_gpu_checks.sh
#
# Steps (each one's raw output goes to benchmarks/gpu/logs/<UTC time>_<host>/<step>.log):
#   env        nvidia-smi, nvcc, torch, the CUDA device
#   build      TORCH_CUDA_ARCH_LIST=9.0 pip install --no-build-isolation --no-deps -e .
#              (set TORCH_CUDA_ARCH_LIST to build for another GPU)
#   tests      python -m pytest -q tests/test_cuda.py  (then the whole suite, tests/)
#   sanitize   compute-sanitizer --tool memcheck | racecheck | synccheck | initcheck over
#              benchmarks/gpu/driver.py sanitize (every op and code path, checked against the
#              reference), with PyTorch's caching allocator off so out-of-bounds accesses fault
#   traffic    Nsight Compute: DRAM bytes read/written by the kernels for a healthy and a
#              clipping call on GPT-2-small float32 (a healthy step must write ~nothing), for
#              clip_norm and for adaptive_clip (which also reads the weights);
#              skipped when ncu is missing or not allowed to read the counters
#   bench      python -m gradstab bench --device cuda --mode
#              healthy,clip,stats,value,agc,agc-healthy,adaptive,adaptive-zscore
#              (all sets, float32 and bfloat16; table, CUDA summary with the targets, JSON)
#
# Every step runs even if an earlier one failed (except that nothing runs after a failed build);
# the script exits non-zero if any step failed, and prints a one-line verdict per step.
set -uo pipefail
cd "$(dirname "$0")/../.."

STEPS=${STEPS:-"env build tests sanitize traffic bench"}
LOGDIR=${LOGDIR:-benchmarks/gpu/logs/$(date -u +%Y%m%dT%H%M%SZ)_$(hostname -s 2>/dev/null || echo host)}
mkdir -p "$LOGDIR"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
PY=${PYTHON:-python}
declare -A VERDICT=()
ORDER=()

run_step() {  # run_step NAME COMMAND...: output to $LOGDIR/NAME.log and the terminal
  local name=$1
  shift
  echo "=== $name: $*" | tee -a "$LOGDIR/$name.log"
  local t0=$SECONDS
  "$@" 2>&1 | tee -a "$LOGDIR/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc in $((SECONDS - t0)) s" | tee -a "$LOGDIR/$name.log"
  ORDER+=("$name")
  VERDICT[$name]=$rc
  return "$rc"
}

want() { [[ " $STEPS " == *" $1 "* ]]; }

if want env; then
  run_step env bash -c "
    nvidia-smi || true
    nvcc --version || true
    command -v compute-sanitizer || true
    command -v ncu || true
    git log -1 --oneline || true
    $PY -c 'import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda); \
print(torch.cuda.get_device_properties(0))'
  "
fi

if want build; then
  if ! run_step build env MAX_JOBS="${MAX_JOBS:-16}" \
      $PY -m pip install --no-build-isolation --no-deps -v -e .; then
    echo "build failed: see $LOGDIR/build.log"
    exit 1
  fi
  run_step build_info $PY -c "import gradstab, gradstab._extension as e; \
print(gradstab.backend_info()); print(e._C.build_info())"
fi

if want tests; then
  run_step tests_cuda $PY -m pytest -q -ra tests/test_cuda.py
  run_step tests_all $PY -m pytest -q -ra tests
fi

if want sanitize; then
  if command -v compute-sanitizer >/dev/null 2>&1; then
    for tool in memcheck racecheck synccheck initcheck; do
      run_step "sanitize_$tool" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
        compute-sanitizer --tool "$tool" --error-exitcode 3 \
        $PY benchmarks/gpu/driver.py sanitize
    done
  else
    echo "compute-sanitizer not found: sanitize step skipped" | tee "$LOGDIR/sanitize.log"
    ORDER+=(sanitize)
    VERDICT[sanitize]=skipped
  fi
fi

if want traffic; then
  if command -v ncu >/dev/null 2>&1; then
    run_step traffic ncu --kernel-name regex:gradstab \
      --metrics dram__bytes_read.sum,dram__bytes_write.sum,gpu__time_duration.sum \
      $PY benchmarks/gpu/driver.py traffic || VERDICT[traffic]="failed (ncu counters not allowed?)"
  else
    echo "ncu not found: traffic step skipped" | tee "$LOGDIR/traffic.log"
    ORDER+=(traffic)
    VERDICT[traffic]=skipped
  fi
fi

if want bench; then
  run_step bench $PY -m gradstab bench --device cuda \
    --mode healthy,clip,stats,value,agc,agc-healthy,adaptive,adaptive-zscore \
    --json "$LOGDIR/bench.json"
fi

echo
echo "Logs: $LOGDIR"
status=0
for name in "${ORDER[@]}"; do
  v=${VERDICT[$name]}
  echo "  $name: $v"
  [[ "$v" == 0 || "$v" == skipped ]] || status=1
done
exit $status
