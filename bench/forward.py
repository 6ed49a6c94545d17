#!/usr/bin/env python3
"""Denoiser forward throughput, kdiff_jax vs PyTorch k-diffusion 0.0.15, same converted weights, one run.

  .venv/bin/python bench/forward.py [--configs cars64 cars128] [--batches 1 8] [--target-s 8]

Each (config, batch, side) runs in its own worker process (bench/_common.py): images/s of D(x, σ=1) (median of timed
repeats after a warm-up call, as many repeats as fit in --target-s, 2 to 10), XLA compile time, peak resident
memory, the FLOPs of one image-evaluation (XLA's cost analysis of the compiled forward, counted once and used for
both sides) and the achieved GFLOP/s next to this machine's fp32 matmul ceiling (2048² matmul, each framework's
own). "rel err" is ‖D_jax − D_torch‖ / ‖D_torch‖ on the benchmark input: both sides computed the same function.
kdiff_jax's forward is compiled with the XLA options of its sampling loop (`kdiff_jax.compiler_options`).
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def jax_worker(spec):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from kdiff_jax.compiler_options import cpu_compiler_options
    from kdiff_jax.factory import make_denoiser
    jax.config.update('jax_enable_compilation_cache', False)
    config, model = C.jax_model(spec['config'], spec['weights'])
    graphdef, state = nnx.split(make_denoiser(config, model))

    @functools.partial(jax.jit, compiler_options=cpu_compiler_options())
    def forward(state, x, sigma):
        return nnx.merge(graphdef, state)(x, sigma)

    x = jnp.asarray(np.load(spec['input']))
    sigma = jnp.ones((x.shape[0],), jnp.float32)
    t0 = C.time.perf_counter()
    compiled = forward.lower(state, x, sigma).compile()
    compile_s = C.time.perf_counter() - t0
    cost = compiled.cost_analysis()
    flops = (cost[0] if isinstance(cost, list) else cost).get('flops', float('nan'))
    run = lambda: compiled(state, x, sigma).block_until_ready()
    t0 = C.time.perf_counter()
    out = run()
    first = C.time.perf_counter() - t0
    np.save(spec['output'], np.asarray(out))
    t, times = C.median_time(run, C.repeats_for(first, spec['target_s']))
    return dict(time=t, times=times, compile_s=compile_s, flops=flops, ceiling=C.jax_matmul_ceiling())


def torch_worker(spec):
    import numpy as np
    import torch
    torch.set_grad_enabled(False)
    _, _, denoiser, _ = C.torch_model(spec['config'], spec['weights'])
    denoiser.eval()
    x = torch.from_numpy(np.ascontiguousarray(np.load(spec['input']).transpose(0, 3, 1, 2)))
    sigma = torch.ones(x.shape[0])
    t0 = C.time.perf_counter()
    out = denoiser(x, sigma)
    first = C.time.perf_counter() - t0
    np.save(spec['output'], out.numpy().transpose(0, 2, 3, 1))
    t, times = C.median_time(lambda: denoiser(x, sigma), C.repeats_for(first, spec['target_s']))
    return dict(time=t, times=times, ceiling=C.torch_matmul_ceiling(), threads=torch.get_num_threads())


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument('--configs', nargs='+', default=['cars64', 'cars128'])
    p.add_argument('--batches', nargs='+', type=int, default=[1, 8])
    p.add_argument('--target-s', type=float, default=8., help='timed seconds per measurement (2-10 repeats)')
    p.add_argument('--max-load', type=float, default=1.3, help='wait for the 1-min load to drop below this')
    args = p.parse_args()
    import numpy as np
    tmp = C.begin('Denoiser forward throughput (bench/forward.py)', args.max_load)
    header = ('| config | batch | kdiff_jax img/s | PyTorch img/s | ratio | XLA compile s | GFLOP/img | kdiff_jax GFLOP/s '
              '| PyTorch GFLOP/s | peak RSS MiB jax / torch | rel err | others (cores) jax / torch |')
    print(header + '\n|' + '---|' * (header.count('|') - 1), flush=True)
    ceilings = {}
    for name in args.configs:
        weights = C.write_weights(name, tmp / f'{name}.npz')
        config = C.load_bench_config(name)
        for batch in args.batches:
            rng = np.random.default_rng(0)
            x = rng.standard_normal((batch, *config.model.input_size, config.model.input_channels)).astype(np.float32)
            np.save(tmp / 'x.npy', x)
            res = {}
            for side in ('jax', 'torch'):
                spec = dict(side=side, config=name, weights=str(weights), input=str(tmp / 'x.npy'),
                            output=str(tmp / f'out_{side}.npy'), target_s=args.target_s)
                res[side] = C.run_worker(__file__, spec)
                ceilings.setdefault(side, []).append(res[side]['ceiling'])
            j, t = res['jax'], res['torch']
            err = C.rel_err(np.load(tmp / 'out_jax.npy'), np.load(tmp / 'out_torch.npy'))
            gf = j['flops'] / batch / 1e9
            ips_j, ips_t = batch / j['time'], batch / t['time']
            line = (f"| {name} | {batch} | {ips_j:.2f} | {ips_t:.2f} | {ips_j / ips_t:.2f}x | {j['compile_s']:.1f} | "
                    f"{gf:.1f} | {gf * ips_j:.0f} | {gf * ips_t:.0f} | {j['peak_rss_mb']:.0f} / "
                    f"{t['peak_rss_mb']:.0f} | {err:.1e} | {j['others_cores']:.2f} / {t['others_cores']:.2f} |")
            print(line, flush=True)
    print(f"\nfp32 matmul ceiling (2048², median over the workers): XLA "
          f"{np.median(ceilings['jax']):.0f} GFLOP/s, PyTorch {np.median(ceilings['torch']):.0f} GFLOP/s; "
          f"1-min load at end: {C.loadavg():.2f}")


if __name__ == '__main__':
    if not C.worker_main({'jax': jax_worker, 'torch': torch_worker}):
        main()
