#!/usr/bin/env python3
"""Denoiser forward throughput, kdiff_jax vs PyTorch k-diffusion 0.0.15, same converted weights, one run.

  .venv/bin/python bench/forward.py [--configs cars64 cars128] [--batches 1 8] [--repeats 5]

Prints a markdown table: images/s of each (median of --repeats timed runs after warm-up), the ratio, compile time,
the FLOPs of one image-evaluation (XLA's cost analysis, counted once) and the achieved GFLOP/s next to this machine's
fp32 matmul ceiling (jnp.dot of 2048² matrices).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from kdiff_jax.config import load_config, to_kdiffusion_dict  # noqa: E402
from kdiff_jax.factory import make_denoiser, make_model  # noqa: E402
from kdiff_jax.interop import load_state_dict  # noqa: E402
from tests.oracle import import_k_diffusion  # noqa: E402

K = import_k_diffusion()


def timed(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_ceiling_gflops(n=2048, repeats=5):
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    t = timed(lambda: f(a).block_until_ready(), repeats)
    return 2 * n ** 3 / t / 1e9


def bench(config_name, batch, repeats):
    config = load_config(str(ROOT / 'configs' / f'{config_name}.py'))
    kd = to_kdiffusion_dict(config)
    torch_inner = K.config.make_model(kd).eval()
    torch_denoiser = K.config.make_denoiser_wrapper(kd)(torch_inner).eval()
    model = make_model(config, initialize=False)
    load_state_dict(model, {k: v.numpy() for k, v in torch_inner.state_dict().items()})
    graphdef, state = nnx.split(make_denoiser(config, model))

    @jax.jit
    def forward(state, x, sigma):
        return nnx.merge(graphdef, state)(x, sigma)

    m = config.model
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, *m.input_size, m.input_channels)).astype(np.float32)
    sigma = np.full((batch,), 1.0, np.float32)
    xj, sj = jnp.asarray(x), jnp.asarray(sigma)
    start = time.perf_counter()
    compiled = forward.lower(state, xj, sj).compile()
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    flops = (cost[0] if isinstance(cost, list) else cost).get('flops', float('nan')) / batch
    t_jax = timed(lambda: forward(state, xj, sj).block_until_ready(), repeats)
    xt, st = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(sigma)
    with torch.no_grad():
        t_torch = timed(lambda: torch_denoiser(xt, st), repeats)
    return dict(config=config_name, batch=batch, jax=batch / t_jax, torch=batch / t_torch, compile=compile_s,
                flops=flops)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument('--configs', nargs='+', default=['cars64', 'cars128'])
    p.add_argument('--batches', nargs='+', type=int, default=[1, 8])
    p.add_argument('--repeats', type=int, default=5)
    args = p.parse_args()
    ceiling = matmul_ceiling_gflops()
    print(f'# forward throughput — {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch '
          f'threads, jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__}')
    print(f'fp32 matmul ceiling (jnp.dot 2048²): {ceiling:.1f} GFLOP/s\n')
    print('| config | batch | kdiff_jax img/s | PyTorch img/s | ratio | XLA compile s | GFLOP/img | kdiff_jax GFLOP/s '
          '| PyTorch GFLOP/s |')
    print('|---|---|---|---|---|---|---|---|---|')
    for name in args.configs:
        for batch in args.batches:
            r = bench(name, batch, args.repeats)
            gf = r['flops'] / 1e9
            print(f"| {name} | {batch} | {r['jax']:.2f} | {r['torch']:.2f} | {r['jax'] / r['torch']:.2f}x | "
                  f"{r['compile']:.1f} | {gf:.1f} | {gf * r['jax']:.0f} | {gf * r['torch']:.0f} |", flush=True)


if __name__ == '__main__':
    main()
