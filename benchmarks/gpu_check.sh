#!/usr/bin/env bash
# The prepared GPU check: what this project's CPU-only CI cannot run, in one go on one GPU,
# in 9.5 minutes at most, every log under $OUT (9 files). From the repository root:
#
#   benchmarks/gpu_check.sh --dry-run     # print the steps and their time limits, run nothing
#   OUT=/tmp/gpu_check benchmarks/gpu_check.sh
#
# Steps: the set-up (benchmarks/gpu_setup.py: sm_utils imports, a papermill kernel starts), the
# environment (driver, torch and its CUDA build, the GPU), the GPU tests (tests/test_gpu.py and
# the GPU branches of the others), bench_training.py on the paper's runs (keras_resnet50, 224
# px, batch 32, bf16, channels_last), bench_grid.py with 1, 2 and 4 runs at once on one GPU,
# and a tiny grid (configs/gpu_check.yaml: runs_per_gpu 2, two architectures, attribution on)
# reported per run by gpu_check_report.py: device, precision, GPU memory reserved vs the memory
# check's prediction, tied scores; and CT dose noise on the GPU (bench_ct_noise.py --gpu-check:
# backend torch, ms per 512 px slice in a batch of 8, one slice against scikit-image). A failing
# step is recorded and the next one runs; a failing set-up stops the check, naming what is
# missing. Python: $PYTHON, else .venv/bin/python, else python3.
#
# A bare GPU machine (no package registry, its own torch): carry the wheel folder that
# `make gpu-wheels` builds (.gpu-wheels, used when present and there is no .venv, or given as
# --wheels DIR). The set-up installs it with pip --no-index --no-deps --target into a temporary
# folder put on PYTHONPATH with the checkout, and the python3 kernel spec beside it (JUPYTER_PATH);
# the image's torch is used, never one of the folder's.
#
# --cpu-rehearsal (make gpu-rehearsal): the same set-up and steps on the CPU of a machine without
# a GPU, the GPU-only parts skipped and the benchmarks and the tiny grid in miniature, so that a
# missing wheel or a broken step shows here, not on the GPU machine.
set -uo pipefail

DRY_RUN=0
REHEARSAL=0
WHEELS=
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --cpu-rehearsal) REHEARSAL=1 ;;
    --wheels) [ $# -ge 2 ] || { echo "gpu_check.sh: --wheels needs a folder" >&2; exit 2; }
              WHEELS=$2; shift ;;
    --wheels=*) WHEELS=${1#--wheels=} ;;
    -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (expected --dry-run, --wheels DIR or" \
         "--cpu-rehearsal)" >&2; exit 2 ;;
  esac
  shift
done
if [ -n "$WHEELS" ]; then
  [ -d "$WHEELS" ] || { echo "gpu_check.sh: no wheel folder $WHEELS (make gpu-wheels builds" \
                          ".gpu-wheels)" >&2; exit 2; }
  WHEELS=$(cd "$WHEELS" && pwd)
fi
cd "$(dirname "$0")/.."
ROOT=$PWD
if [ -z "$WHEELS" ] && [ -z "${PYTHON:-}" ] && [ -d .gpu-wheels ] && [ ! -x .venv/bin/python ]
then WHEELS=.gpu-wheels; fi
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
if [ "$DRY_RUN" = 1 ]; then
  OUT=${OUT:-'<a new temporary folder>'}; WORK='<a temporary folder>'
else
  OUT=${OUT:-$(mktemp -d -t gpu_check.XXXXXX)}; mkdir -p "$OUT"
  WORK=$(mktemp -d -t gpu_check_env.XXXXXX)
  trap 'rm -rf "$WORK"' EXIT
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
SETUP=("$PYTHON" benchmarks/gpu_setup.py)
if [ -n "$WHEELS" ]; then
  # the carried packages and the checkout on PYTHONPATH, for the steps and their kernels; the
  # kernel spec, Jupyter's and IPython's own files in the temporary folder
  SETUP+=(--wheels "$WHEELS" --target "$WORK/site" --kernel-prefix "$WORK/jupyter")
  export PYTHONPATH="$ROOT:$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
  export JUPYTER_PATH="$WORK/jupyter/share/jupyter" JUPYTER_DATA_DIR="$WORK/jupyter/data" \
         JUPYTER_CONFIG_DIR="$WORK/jupyter/config" IPYTHONDIR="$WORK/ipython"
fi
RUNS=runs/gpu_check
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

if [ "$DRY_RUN" = 1 ]; then
  echo "gpu_check.sh --dry-run: would run with $PYTHON${WHEELS:+ and the wheels of $WHEELS}," \
       "each step's log to $OUT/NAME.log (at most 570 s in all):"
fi
step setup 60 "${SETUP[@]}"
if [ ${#FAILED[@]} -gt 0 ]; then
  # all of what it found missing, where the step's last lines above did not show it all
  failure=$(sed -n '/set-up FAILED/,$p' "$OUT/setup.log")
  [ "$(printf '%s\n' "$failure" | wc -l)" -gt 7 ] && printf '%s\n' "$failure"
  echo "gpu_check: the set-up failed, so no step can run (its log: $OUT/setup.log)"
  exit 1
fi

if [ "$REHEARSAL" = 1 ]; then
  # CPU rehearsal: what needs the GPU is skipped (said so in the logs); the rest in miniature
  [ "$DRY_RUN" = 1 ] || cat >"$WORK/rehearsal.yaml" <<YAML
runs_dir: $WORK/runs
figures_dir: $WORK/runs/figures
datasets:
  - name: phantom_cxr
    manifest: $WORK/data/phantom_cxr/manifest.csv
    params: {image_size: 64, n_patients: 60}
training: {image_size: 32, epochs: 1, batch_size: 16, patience: 1}
run: {device: cpu}
YAML
  RUNS=$WORK/runs
  step environment 20 sh -c "echo 'CPU rehearsal: nvidia-smi and the GPU skipped'; $PYTHON -c \
'import sm_utils, torch; print(\"torch\", torch.__version__, \"cuda build\", torch.version.cuda, \
\"available\", torch.cuda.is_available())'"
  step gpu_tests 120 "$PYTHON" -m pytest -q -p no:randomly -rs tests/test_gpu.py \
    tests/test_training.py tests/test_data.py
  step bench_training 60 "$PYTHON" benchmarks/bench_training.py --device cpu \
    --arch keras_resnet50 --image-size 32 --batch-size 8 --steps 2 --warmup 1
  step bench_grid 150 "$PYTHON" benchmarks/bench_grid.py --device cpu --runs 1 \
    --cells-per-run 1 --epochs 1 --image-size 32 --batch-size 8 --patients 40
  step tiny_grid 120 "$PYTHON" -m sm_utils run configs/gpu_check.yaml \
    --override "$WORK/rehearsal.yaml" --no-analysis --progress off
  step ct_noise 30 "$PYTHON" benchmarks/bench_ct_noise.py --gpu-check cpu --size 64 --angles 60 \
    --batch 2
else
  step environment 20 sh -c "nvidia-smi; nvidia-smi -L; $PYTHON -c 'import sm_utils, torch; \
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
  step ct_noise 30 "$PYTHON" benchmarks/bench_ct_noise.py --gpu-check cuda
fi
step gpu_check_report 10 "$PYTHON" benchmarks/gpu_check_report.py "$RUNS" \
  --csv "$OUT/gpu_check_report.csv"

[ "$DRY_RUN" = 1 ] && exit 0
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "gpu_check: failed steps: ${FAILED[*]} (logs in $OUT)"
  exit 1
fi
if [ "$REHEARSAL" = 1 ]; then
  echo "gpu_check: CPU rehearsal passed: set-up and every step ran on the CPU (logs in $OUT)"
else
  echo "gpu_check: all steps passed (logs in $OUT)"
fi
