#!/usr/bin/env bash
# GPU checks of gradstab's CUDA kernels, sized for a lease of 15 minutes of device time (start-up
# included) and 10 minutes per command, on an H100/H200 with torch 2.11+cu130 and nvcc 13.0.
# Run from the repository root, once per phase:
#
#   LOGDIR=$OUT bash benchmarks/gpu/run_gpu_checks.sh              # phase 1 (~6 minutes)
#   PHASE=2 LOGDIR=$OUT bash benchmarks/gpu/run_gpu_checks.sh      # phase 2 (~6 minutes)
#   STEPS="build tests_cuda" bash benchmarks/gpu/run_gpu_checks.sh # chosen steps
#   DRY_RUN=1 PHASE=2 bash benchmarks/gpu/run_gpu_checks.sh        # list the steps, run nothing
#
# Phase 1: env; build (MAX_JOBS=16, TORCH_CUDA_ARCH_LIST=9.0); tests_cuda (every test that runs
#   on CUDA); memcheck (compute-sanitizer over benchmarks/gpu/driver.py sanitize); bench_core
#   (GPT-2 small fp32 and bf16: healthy, clip, stats; the many-small set).
# Phase 2: build (incremental when the machine is still warm); synccheck; initcheck; traffic
#   (Nsight Compute DRAM bytes of a healthy and a clipping call, clip_norm and adaptive_clip,
#   checked by ncu_summary.py: a healthy call writes ~nothing, and a filter that profiles no
#   kernel fails); bench_more (AGC, adaptive thresholds, the 1B-parameter bf16 set); train (the
#   GPU training-loop benchmark on a small GPT-2-like decoder with fused AdamW: python -m
#   gradstab bench --train --device cuda --train-model transformer; 6 rounds x 200 steps x 3
#   variants).
# PHASE=all adds racecheck (the kernels use no shared memory, so it is expected to find nothing)
#   and runs both phases: longer than one command's 10 minutes.
#
# Each step's output goes to $LOGDIR/<step>.log (LOGDIR defaults to
# benchmarks/gpu/logs/<UTC time>_<host>); each step is killed after STEP_TIMEOUT seconds (default
# 300); every step runs even if an earlier one failed, except after a failed build; the script
# prints a one-line verdict per step with its time and exits non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/../.."

PHASE=${PHASE:-1}
case "$PHASE" in
  1) DEFAULT_STEPS="env build tests_cuda memcheck bench_core" ;;
  2) DEFAULT_STEPS="env build synccheck initcheck traffic bench_more train" ;;
  all) DEFAULT_STEPS="env build tests_cuda memcheck bench_core synccheck initcheck racecheck \
traffic bench_more train" ;;
  *) echo "PHASE must be 1, 2 or all, got '$PHASE'" >&2; exit 2 ;;
esac
STEPS=${STEPS:-$DEFAULT_STEPS}
STEP_TIMEOUT=${STEP_TIMEOUT:-300}
LOGDIR=${LOGDIR:-benchmarks/gpu/logs/$(date -u +%Y%m%dT%H%M%SZ)_$(hostname -s 2>/dev/null || echo host)}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
PY=${PYTHON:-python}
NCU_METRICS=dram__bytes_read.sum,dram__bytes_write.sum,gpu__time_duration.sum
# GPT-2 small in float32: 124,439,808 parameters; one read of the gradients (and of the weights)
GPT2_BYTES=$((124439808 * 4))

if [ "${DRY_RUN:-0}" = 1 ]; then
  echo "phase $PHASE: $STEPS (each at most ${STEP_TIMEOUT} s; logs in $LOGDIR)"
  exit 0
fi
mkdir -p "$LOGDIR"
declare -A VERDICT=()
declare -A SECS=()
ORDER=()

run_step() {  # run_step NAME COMMAND...: output to $LOGDIR/NAME.log and the terminal
  local name=$1
  shift
  echo "=== $name: $*" | tee -a "$LOGDIR/$name.log"
  local t0=$SECONDS
  timeout --kill-after=10 "$STEP_TIMEOUT" "$@" 2>&1 | tee -a "$LOGDIR/$name.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 124 ] && echo "=== $name: killed after ${STEP_TIMEOUT} s" | tee -a "$LOGDIR/$name.log"
  echo "=== $name: exit $rc in $((SECONDS - t0)) s" | tee -a "$LOGDIR/$name.log"
  ORDER+=("$name")
  VERDICT[$name]=$rc
  SECS[$name]=$((SECONDS - t0))
  return "$rc"
}

want() { [[ " $STEPS " == *" $1 "* ]]; }

need_tool() {  # need_tool NAME STEP: a missing tool fails the step (never a silent skip)
  command -v "$1" >/dev/null 2>&1 && return 0
  echo "$1 not found: step $2 cannot run" | tee -a "$LOGDIR/$2.log"
  ORDER+=("$2")
  VERDICT[$2]="failed ($1 not found)"
  SECS[$2]=0
  return 1
}

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
  # The nvcc on PATH may be a wrapper outside the toolkit: setup.py finds the toolkit itself
  # (CUDA_HOME, else nvcc's own report), so nothing needs setting here unless that fails.
  if ! run_step build env MAX_JOBS="${MAX_JOBS:-16}" GRADSTAB_FORCE_CUDA=1 \
      $PY -m pip install --no-build-isolation --no-deps -v -e .; then
    echo "build failed: see $LOGDIR/build.log (set CUDA_HOME to the CUDA toolkit if setup.py"
    echo "could not find it); nothing else runs without a build"
    exit 1
  fi
  run_step build_info $PY -c "import gradstab, gradstab._extension as e; \
info = gradstab.backend_info(); print(info); print(e._C.build_info()); \
assert info['cuda']['kernel'] == 'cuda', 'the build has no CUDA kernel'"
fi

if want tests_cuda; then
  # the GPU-only file, and every device-parametrised test's CUDA case
  run_step tests_cuda $PY -m pytest -q -ra -p no:cacheprovider tests/test_cuda.py \
    tests -k "cuda or CUDA"
fi

for tool in memcheck synccheck initcheck racecheck; do
  if want "$tool" && need_tool compute-sanitizer "$tool"; then
    run_step "$tool" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      compute-sanitizer --tool "$tool" --error-exitcode 3 \
      $PY benchmarks/gpu/driver.py sanitize
  fi
done

if want traffic && need_tool ncu traffic; then
  for case in clip-healthy clip-clipping agc-healthy agc-clipping; do
    read_bytes=$GPT2_BYTES
    [[ $case == agc-* ]] && read_bytes=$((2 * GPT2_BYTES))
    max_write=$((4 * 1000 * 1000))  # per-unit records and results only
    [[ $case == *-clipping ]] && max_write=$((2 * read_bytes))
    run_step "traffic_$case" bash -c "
      ncu --csv --print-units base --kernel-name-base demangled --kernel-name regex:gradstab:: \
        --nvtx --nvtx-include gradstab_measure/ --metrics $NCU_METRICS \
        $PY benchmarks/gpu/driver.py traffic --case $case > '$LOGDIR/ncu_$case.csv' &&
      $PY benchmarks/gpu/ncu_summary.py '$LOGDIR/ncu_$case.csv' --expect-read $read_bytes \
        --max-write $max_write --json '$LOGDIR/ncu_$case.json'"
  done
fi

if want bench_core; then
  run_step bench_core $PY -m gradstab bench --device cuda --set gpt2,many-small \
    --dtype fp32,bf16 --mode healthy,clip,stats --json "$LOGDIR/bench_core.json"
fi

if want bench_more; then
  run_step bench_more bash -c "
    $PY -m gradstab bench --device cuda --set resnet50 --dtype fp32,bf16 \
      --mode agc,agc-healthy --json '$LOGDIR/bench_agc.json' &&
    $PY -m gradstab bench --device cuda --set gpt2 --dtype fp32 \
      --mode adaptive,adaptive-zscore --json '$LOGDIR/bench_adaptive.json' &&
    $PY -m gradstab bench --device cuda --set llama1b --dtype bf16 \
      --mode healthy,clip --json '$LOGDIR/bench_llama1b.json'"
fi

if want train; then
  run_step train $PY -m gradstab bench --train --device cuda --train-model transformer \
    --json "$LOGDIR/train.json"
fi

echo
echo "Logs: $LOGDIR"
status=0
for name in "${ORDER[@]}"; do
  v=${VERDICT[$name]}
  echo "  $name: $v (${SECS[$name]} s)"
  [[ "$v" == 0 ]] || status=1
done
exit $status
