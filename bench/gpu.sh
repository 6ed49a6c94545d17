#!/usr/bin/env bash
# The GPU part of the benchmarks in one command, for the device machine (bench/RESULTS.md, "GPU"):
#   here:       bench/gpu_wheels.sh
#   on the GPU: bash bench/gpu.sh           (device run with carry ['.whl'], timeout_s 600)
# bf16 training step (cars64, batch 64) with MFU, then whole-loop sampling (cars64, batch 64: dpmpp_2m 50 steps,
# heun 25), kdiff_jax against PyTorch k-diffusion 0.0.15 on the same card and the same converted weights. Uses the
# machine's own python3 (jax[cuda], torch) plus the carried wheels. The tables go to stdout and to $OUT (or
# bench_out/), one file per script; each part has its own time limit so that one failure leaves the others.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench_out}
mkdir -p "$out"
if compgen -G '.whl/*.whl' > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 BENCH_IDLE_WAIT_S=5
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c 'import jax, flax, torch; print("jax", jax.__version__, jax.devices(), "flax", flax.__version__, "torch", torch.__version__)'
} 2>&1 | tee "$out/gpu.txt"
timeout 300 python3 bench/train_step.py --gpu --batch 64 --target-s 10 --max-load 100 2>&1 | tee "$out/train_step.md"
timeout 240 python3 bench/sampling.py --gpu --batch 64 --repeats 3 --samplers dpmpp_2m:50 heun:25 --max-load 100 \
    2>&1 | tee "$out/sampling.md"
echo "GPU benchmark tables: $out/{gpu.txt,train_step.md,sampling.md}"
