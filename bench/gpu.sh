#!/usr/bin/env bash
# The GPU part of the benchmarks in one command, for the device machine (bench/RESULTS.md, "GPU"):
#   here:       bench/gpu_wheels.sh
#   on the GPU: bash bench/gpu.sh           (device run with carry ['.whl'], timeout_s 540)
# bf16 training step (cars64, batch 64) with MFU, then whole-loop sampling (cars64, batch 64: dpmpp_2m 50 steps,
# heun 25), kdiff_jax against PyTorch k-diffusion 0.0.15 on the same card and the same converted weights; after the
# timed training steps, a few more run under each side's profiler (kernel summaries, traces, the optimized HLO). Uses the
# machine's own python3 (jax[cuda], torch) plus the carried wheels. The tables go to stdout and to $OUT (or
# bench_out/), one file per script; each part has its own time limit so that one failure leaves the others.
# CONFIG, BATCH, DTYPE, SAMPLERS, GPU_FLAG, PYTHON and WHEELS override the defaults:
# `GPU_FLAG= WHEELS= CONFIG=demo BATCH=2 bash bench/gpu.sh` runs the same pipeline on the CPU (tests/test_bench.py).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench_out}
mkdir -p "$out"
wheels=${WHEELS-.whl}  # WHEELS= skips the install
if [ -n "$wheels" ] && compgen -G "$wheels/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$wheels"/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
# Others' CPU use is what the CPU tables guard against; on the GPU machine it is not what is measured.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 BENCH_IDLE_WAIT_S=0 BENCH_MAX_OTHERS=99
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  ${PYTHON:-python3} -c 'import jax, flax, torch
print("jax", jax.__version__, jax.devices(), "flax", flax.__version__, "torch", torch.__version__)'
} 2>&1 | tee "$out/gpu.txt"
config=${CONFIG:-cars64} batch=${BATCH:-64} dtype=${DTYPE:-bfloat16} gpu=${GPU_FLAG---gpu} python=${PYTHON:-python3}
timeout 300 $python bench/train_step.py $gpu --config "$config" --dtype "$dtype" --batch "$batch" --target-s 5 \
    --max-load 1000 --profile "$out" 2>&1 | tee "$out/train_step.md"
timeout 240 $python bench/sampling.py $gpu --config "$config" --dtype "$dtype" --batch "$batch" --repeats 2 \
    --samplers ${SAMPLERS:-dpmpp_2m:50 heun:25} --max-load 1000 2>&1 | tee "$out/sampling.md"
echo "GPU benchmark tables: $out/{gpu.txt,train_step.md,sampling.md}; step profiles: $out/*_train_*"
