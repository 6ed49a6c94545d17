#!/usr/bin/env bash
# The GPU part of the benchmarks in one command, for the device machine (bench/RESULTS.md, "GPU"):
#   here:       bench/gpu_wheels.sh
#   on the GPU: bash bench/gpu.sh           (device run with carry ['.whl'], timeout_s 590)
# bf16 training step (cars64, batch 64, then batch 256) with MFU, then whole-loop sampling (cars64, batch 64: dpmpp_2m
# 50 steps, heun 25), kdiff_jax against PyTorch k-diffusion 0.0.15 on the same card and the same converted weights;
# after the first batch size's timed training steps, a few more run under each side's profiler (kernel summaries,
# traces, the optimized HLO). Uses the machine's own python3 (jax[cuda], torch) plus the carried wheels. The tables go
# to stdout and to $OUT (or bench_out/), one file per script (every batch size's training table in train_step.md).
# Each part has its own time limit, cut to what is left of BUDGET_S (default 560 s, under the device's 600 s per
# call): a part with under a minute left is skipped with a message, so one slow part leaves the tables before it.
# ROUNDS (default 1) is train_step.py's --rounds: each batch size's sides measured that many times, alternating.
# CONFIG, BATCHES, DTYPE, SAMPLERS, GPU_FLAG, PYTHON, WHEELS, ROUNDS and BUDGET_S override the defaults:
# `GPU_FLAG= WHEELS= CONFIG=demo BATCHES=2 bash bench/gpu.sh` runs the same pipeline on the CPU (tests/test_bench.py).
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
# The card as XLA describes it, for compiling for it later on a machine without one (bench/gpu_program.py
# --target-config $out/target_config.txtpb); a jaxlib whose topology has no target_config says so.
${PYTHON:-python3} -c 'import sys, jax
from jax._src.lib import xla_client as xc
config = getattr(xc.get_topology_for_devices(jax.devices()[:1]), "target_config", None)
if config is None:
    print("this jaxlib gives no target config for", jax.devices()[0].device_kind)
else:
    open(sys.argv[1], "wb" if isinstance(config, bytes) else "w").write(config)
    print("target config:", sys.argv[1])' "$out/target_config.txtpb" 2>&1 | tee -a "$out/gpu.txt"
config=${CONFIG:-cars64} batches=(${BATCHES:-64 256}) dtype=${DTYPE:-bfloat16} gpu=${GPU_FLAG---gpu}
python=${PYTHON:-python3} budget=${BUDGET_S:-560}
limit() {  # limit PART_S: PART_S cut to what is left of the budget, or nothing (and a message) under a minute
    local left=$((budget - SECONDS))
    if [ "$left" -lt 60 ]; then echo "bench/gpu.sh: skipped ($left s of BUDGET_S=$budget left): $2" >&2; return 1; fi
    echo $(( left < $1 ? left : $1 ))
}
: > "$out/train_step.md"
for i in "${!batches[@]}"; do
    profile=(); [ "$i" = 0 ] && profile=(--profile "$out")  # the first batch size only: one set of traces
    t=$(limit 300 "training step at batch ${batches[$i]}") || continue
    timeout "$t" $python bench/train_step.py $gpu --config "$config" --dtype "$dtype" --batch "${batches[$i]}" \
        --target-s 5 --rounds "${ROUNDS:-1}" --max-load 1000 "${profile[@]}" 2>&1 | tee -a "$out/train_step.md"
done
if t=$(limit 240 "sampling"); then
    timeout "$t" $python bench/sampling.py $gpu --config "$config" --dtype "$dtype" --batch "${batches[0]}" \
        --repeats 2 --samplers ${SAMPLERS:-dpmpp_2m:50 heun:25} --max-load 1000 2>&1 | tee "$out/sampling.md"
fi
echo "GPU benchmark tables: $out/{gpu.txt,train_step.md,sampling.md}; step profiles: $out/*_train_*;" \
    "the card for bench/gpu_program.py: $out/target_config.txtpb"
