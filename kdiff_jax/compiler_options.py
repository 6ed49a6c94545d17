"""XLA options for kdiff_jax's compiled programs: on XLA:CPU, convolutions go to XLA's Eigen kernels, not YNNPACK.

jaxlib 0.10–0.11 hand dots, reductions and convolutions to YNNPACK by default
(`xla_cpu_experimental_ynn_fusion_type` = individual_dot, reduce, individual_convolution). XLA differentiates a
convolution w.r.t. its kernel as another convolution, whose window is the whole feature map:
∂L/∂W[i, j, c, o] = Σ_{n,h,w} x_pad[n, h+i, w+j, c]·dy[n, h, w, o].
On an AMD EPYC host YNNPACK ran that shape at 18–110 GFLOP/s where Eigen ran it at 95–186 (cars64 training step,
batch 8: ~13% less time per step with Eigen), while YNNPACK's forward convolutions were up to ~8% faster there. On
an Intel Xeon host (AVX-512) YNNPACK's forward convolutions are the slower ones: the cars64 and cars128 forwards
run 4–18% faster on Eigen, and a 50-step cars64 sampling loop ~20% faster; on an AMD EPYC without AVX-512 (Zen 3)
the forwards ran 12–26% faster on Eigen (bench/RESULTS.md, sessions 4, 10 and 20).
So the training step (`jit_train_step`), the sampling driver (`sampling.sample`) and the Inception features of
evaluate.py (`evaluation.inception.jit_extract_features`; 2.1 → 1.1 s per batch of 16 on that Xeon) compile with
the convolutions left out of YNNPACK; dots and reductions stay there.

Applied only where it is safe: on the CPU backend, when the running jaxlib accepts the option (checked once, by
compiling a trivial program), and when XLA_FLAGS does not set the fusion types itself (the user's choice wins).
"""

from __future__ import annotations

import functools
import os

import jax
import numpy as np

#: The default fusion types of jaxlib 0.10.2 and 0.11.2 without LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION (the same
#: optimized HLO as XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-individual_convolution, compared on both).
YNN_WITHOUT_CONVOLUTIONS = {
    'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE'}


@functools.cache
def cpu_compiler_options() -> dict[str, str]:
    """`compiler_options` for `jax.jit` of kdiff_jax's programs: `YNN_WITHOUT_CONVOLUTIONS` on XLA:CPU, else {}."""
    if jax.default_backend() != 'cpu' or 'ynn_fusion_type' in os.environ.get('XLA_FLAGS', ''):
        return {}
    try:
        jax.jit(lambda x: x + 1, compiler_options=YNN_WITHOUT_CONVOLUTIONS).lower(np.float32(0)).compile()
    except jax.errors.JaxRuntimeError:  # a jaxlib that does not know the option or the names: its defaults stay
        return {}
    return dict(YNN_WITHOUT_CONVOLUTIONS)
