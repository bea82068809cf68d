#!/usr/bin/env bash
# Issue #9's GPU figures in one call: diffusers vs ours (full CogVideoX-2B), the full-size
# VideoCrafter2 U-Net step, and full-size FIFO seconds per frame. Writes everything to one log.
#
# The device image has jax (CUDA), torch, flax and orbax but no diffusers: carry its wheel. Once,
# on the dev box, in the repository root (.whl/ is git-ignored via .git/info/exclude):
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 -d .whl diffusers==0.42.1 importlib_metadata
#
# then one device call (each phase has its own time limit; the whole script stays under ~9.5 min):
#
#   run(command="bash benchmarks/gpu_all.sh", carry=[".whl"], timeout_s=600)
#
# Phases can be picked to split the work over two calls: `bash benchmarks/gpu_all.sh compare`,
# `... unet fifo`. The `serial` phase (one batched FIFO model call vs the official 16 serial calls, full
# size) is not in the default list: run it in a second call, `bash benchmarks/gpu_all.sh serial`. The log lands in $OUT/gpu_all.log on the device tool (benchmarks/gpu_logs/ elsewhere).
# Record the figures in benchmarks/NOTES.md with the device line the script prints.
set -uo pipefail
cd "$(dirname "$0")/.."

LOG_DIR=${OUT:-benchmarks/gpu_logs}
mkdir -p "$LOG_DIR"
LOG=$LOG_DIR/gpu_all.log
PHASES=${*:-compare unet fifo}

if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
# torch and jax share the GPU in compare_diffusers: no 75% preallocation by jax.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
# Compile once per machine; a second phase / rerun with the same shapes reuses it.
export JAX_REPVIDEO_COMPILATION_CACHE=${JAX_REPVIDEO_COMPILATION_CACHE:-/tmp/jax_repvideo_cache}

phase() {  # name, time limit (s), command...
    local name=$1 limit=$2
    shift 2
    echo "=== $name ($(date -u +%FT%TZ)): $*" | tee -a "$LOG"
    timeout "$limit" "$@" 2>&1 | grep -v "Casting directly with" | tee -a "$LOG"
    echo "=== $name exit ${PIPESTATUS[0]}" | tee -a "$LOG"
}

{
    echo "=== environment"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import jax, flax, torch; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'torch', torch.__version__)"
    python3 -c "import diffusers; print('diffusers', diffusers.__version__)"
} 2>&1 | tee -a "$LOG"

for p in $PHASES; do
    case $p in
        compare) phase compare 270 python3 benchmarks/compare_diffusers.py --preset gpu-2b ;;
        unet) phase unet 150 python3 benchmarks/unet_step.py --dtype bf16 --steps 5 ;;
        fifo) phase fifo 150 python3 benchmarks/fifo_speed.py --chunks 3 --chunk-size 4 ;;
        serial) phase serial 300 python3 benchmarks/fifo_speed.py --serial --repeats 5 ;;
        *) echo "unknown phase $p (compare, unet, fifo, serial)" | tee -a "$LOG" ;;
    esac
done
echo "log: $LOG"
