#!/usr/bin/env bash
# The prepared GPU check: what this project's CPU-only CI cannot run, in one go on one GPU,
# under 9 minutes, every log under $OUT (7 files). From the repository root:
#
#   benchmarks/gpu_check.sh --dry-run     # print the steps and their time limits, run nothing
#   OUT=/tmp/gpu_check benchmarks/gpu_check.sh
#
# Steps: the environment (driver, torch and its CUDA build, the GPU), the GPU tests
# (tests/test_gpu.py and the GPU branches of the others), bench_training.py on the paper's
# runs (keras_resnet50, 224 px, batch 32, bf16, channels_last), bench_grid.py with 1, 2 and 4
# runs at once on one GPU, and a tiny grid (configs/gpu_check.yaml: runs_per_gpu 2, two
# architectures, attribution on) reported per run by gpu_check_report.py: device, precision,
# GPU memory reserved vs the memory check's prediction, tied scores. A failing step is
# recorded and the next one runs. Python: $PYTHON, else .venv/bin/python, else python3.
set -uo pipefail

DRY_RUN=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $arg (expected --dry-run)" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
if [ "$DRY_RUN" = 1 ]; then OUT=${OUT:-'<a new temporary folder>'}
else OUT=${OUT:-$(mktemp -d -t gpu_check.XXXXXX)}; mkdir -p "$OUT"; fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
FAILED=()

# step NAME SECONDS COMMAND...: run COMMAND under a time limit, its output to $OUT/NAME.log
step() {
  local name=$1 seconds=$2; shift 2
  if [ "$DRY_RUN" = 1 ]; then
    printf '%-20s %4ss  %s\n' "$name" "$seconds" "$*"
    return 0
  fi
  echo "== $name (limit ${seconds}s): $*"
  local started=$SECONDS
  timeout --kill-after=10 "$seconds" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "   exit $rc after $((SECONDS - started))s; last lines:"
  tail -n 8 "$OUT/$name.log" | sed 's/^/   | /'
  [ "$rc" = 0 ] || FAILED+=("$name (exit $rc)")
}

[ "$DRY_RUN" = 1 ] && echo "gpu_check.sh --dry-run: would run with $PYTHON, each step's log to $OUT/NAME.log (at most 510 s in all):"
step environment 30 sh -c "nvidia-smi; nvidia-smi -L; $PYTHON -c 'import torch, sm_utils; \
print(\"torch\", torch.__version__, \"cuda build\", torch.version.cuda, \"available\", \
torch.cuda.is_available()); print(torch.cuda.get_device_name(0), \
torch.cuda.get_device_properties(0).total_memory / 2**30, \"GiB\")'"
step gpu_tests 120 "$PYTHON" -m pytest -q -p no:randomly -rs tests/test_gpu.py \
  tests/test_training.py tests/test_data.py
step bench_training 60 "$PYTHON" benchmarks/bench_training.py --device cuda \
  --arch keras_resnet50 --image-size 224 --batch-size 32 --bf16 --channels-last --steps 100 \
  --warmup 20
step bench_grid 150 "$PYTHON" benchmarks/bench_grid.py --device cuda --runs 1 2 4 \
  --cells-per-run 1 --epochs 2
step tiny_grid 120 "$PYTHON" -m sm_utils run configs/gpu_check.yaml --no-analysis \
  --progress off
step gpu_check_report 30 "$PYTHON" benchmarks/gpu_check_report.py runs/gpu_check \
  --csv "$OUT/gpu_check_report.csv"

[ "$DRY_RUN" = 1 ] && exit 0
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "gpu_check: failed steps: ${FAILED[*]} (logs in $OUT)"
  exit 1
fi
echo "gpu_check: all steps passed (logs in $OUT)"
