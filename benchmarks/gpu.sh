#!/usr/bin/env bash
# wsiflow's benchmarks on a Linux machine with NVIDIA GPUs, in one call (~15 minutes).
#
#   bash benchmarks/gpu.sh [RESULTS_FILE]        # default: gpu-results.txt
#
# 1. training (benchmarks/training.py): MirroredStrategy over every visible GPU
#    with mixed precision (float16), on a generated patch store: input
#    pipeline, step limit, end to end and predict, per model;
# 2. whole-slide inference (benchmarks/inference.py): end to end against
#    predict-only on the GPU, in the same run;
# 3. tiling (benchmarks/tiling.py): the CPU side, for the machine's cores.
#
# It makes .venv (`make venv`) and swaps the CPU TensorFlow wheel for the CUDA
# build (docs/scaling.md#gpus), so it needs the package registries once. Each
# step has its own time limit; a step that fails or runs out of time is noted
# in the results and the next one runs. The results file (versions, GPUs and
# every table) goes into BENCHMARKS.md, "GPUs".
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:-gpu-results.txt}
PY=.venv/bin/python

if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "error: no NVIDIA GPU here (nvidia-smi finds none); run this on a machine with one" >&2
  exit 1
fi
make venv >/dev/null || exit 1
gpus() { "$PY" -c 'import tensorflow as tf; print(len(tf.config.list_physical_devices("GPU")))' 2>/dev/null; }
if [ "$(gpus)" = "0" ] || [ -z "$(gpus)" ]; then
  echo "installing TensorFlow's CUDA build into .venv (docs/scaling.md#gpus)"
  .venv/bin/pip install --quiet -e '.[gpu]' &&
    .venv/bin/pip uninstall --quiet -y tensorflow-cpu &&
    .venv/bin/pip install --quiet --force-reinstall --no-deps 'tensorflow>=2.16,<2.22' || exit 1
fi
N=$(gpus)
if [ -z "$N" ] || [ "$N" = "0" ]; then
  echo "error: TensorFlow sees no GPU although nvidia-smi does (driver or CUDA libraries)" >&2
  exit 1
fi

step() {  # step TITLE SECONDS COMMAND...: run it under a limit; note a failure and go on
  local title=$1 limit=$2
  shift 2
  echo
  echo "## $title"
  echo "\$ $*"
  timeout "$limit" "$@"
  local rc=$?
  [ $rc -eq 0 ] || echo "(this step failed or ran out of its ${limit} s: exit $rc)"
}

{
  echo "# wsiflow GPU benchmarks, $(date -u +%F), commit $(git rev-parse --short HEAD 2>/dev/null)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  echo "cores: $(nproc)"
  "$PY" -c 'import tensorflow as tf, keras; print("tensorflow", tf.__version__, "keras", keras.__version__)'
  # 128 patches per GPU: the global batch grows with the replicas, as wsiflow train's does.
  step "training: MirroredStrategy over $N GPU(s), mixed precision" 420 \
    "$PY" benchmarks/training.py --repeats 1 --steps 30 --batch $((128 * N)) --mixed-precision
  step "whole-slide inference: end to end against predict-only" 240 \
    "$PY" benchmarks/inference.py --repeats 1 --size 12288 --batch 256
  step "tiling" 180 "$PY" benchmarks/tiling.py --size 20480 --repeats 1
} 2>&1 | tee "$RESULTS"
echo "results in $RESULTS"
