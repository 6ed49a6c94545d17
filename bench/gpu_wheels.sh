#!/usr/bin/env bash
# Downloads, here, the wheels that bench/gpu.sh needs on the GPU machine and that its image lacks (the image has
# jax[cuda], flax, optax, orbax, diffrax, einops and torch, and no network): the oracle k-diffusion 0.0.15, its
# import-time needs, and ml-collections. They go to .whl/ (git-ignored through .git/info/exclude), for Python 3.12
# on x86-64 Linux; the device call names .whl in `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .git/info .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    k-diffusion==0.0.15 jsonmerge==1.9.2 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 \
    referencing==0.37.0 rpds-py==2026.9.1 resize-right==0.0.2 torchsde==0.2.6 trampoline==0.1.2 \
    ml-collections==1.1.0
ls -1 .whl
echo "wheels in $(pwd)/.whl ($(du -sh .whl | cut -f1)); now run bench/gpu.sh on the device with carry ['.whl']"
