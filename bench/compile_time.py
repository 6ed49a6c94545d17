#!/usr/bin/env python3
"""Sampler compile time against the number of steps (kdiff_jax): it should not grow with the step count.

  .venv/bin/python bench/compile_time.py [--config cars64] [--batch 1] [--samplers dpmpp_2m lms heun]
                                         [--steps 10 50 250]

For each (sampler, steps) a fresh worker process (bench/_common.py) traces and lowers (`.lower`) and then compiles
(`.compile`) the program that `kdiff_jax.sampling.sample` runs (the whole sampling loop as one `lax.scan`), without
running it; the persistent compilation cache is off. PyTorch k-diffusion samples eagerly (a Python loop, nothing to
compile), so its column is the time of its first model evaluation beyond a steady one: the cost of a first call.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def jax_worker(spec):
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from kdiff_jax.factory import make_denoiser
    from kdiff_jax.sampling import api, get_sigmas_karras
    from kdiff_jax.sampling.noise import sample_keys  # noqa: F401  (imported as sample() would)
    jax.config.update('jax_enable_compilation_cache', False)
    config, model = C.jax_model(spec['config'], spec['weights'])
    m = config.model
    model_def, state = nnx.split(make_denoiser(config, model))
    sigmas = get_sigmas_karras(spec['steps'], m.sigma_min, m.sigma_max, 7.)
    x = jnp.zeros((spec['batch'], *m.input_size, m.input_channels), jnp.float32)
    indices = jnp.arange(spec['batch'], dtype=jnp.uint32)
    # The arguments exactly as api.sample() passes them to its jitted driver.
    t0 = C.time.perf_counter()
    lowered = api.sampling_program().lower(state, x, sigmas, jnp.uint32(0), indices, {}, {}, model_def=model_def,
                                           sampler=spec['sampler'], static_kwargs=(), callback=None)
    lower_s = C.time.perf_counter() - t0
    t0 = C.time.perf_counter()
    lowered.compile()
    compile_s = C.time.perf_counter() - t0
    return dict(lower_s=lower_s, compile_s=compile_s, hlo_chars=len(lowered.as_text()))


def torch_worker(spec):
    import numpy as np
    import torch
    torch.set_grad_enabled(False)
    config, _, denoiser, _ = C.torch_model(spec['config'], spec['weights'])
    m = config.model
    x = torch.from_numpy(np.zeros((spec['batch'], m.input_channels, *m.input_size), np.float32))
    sigma = torch.ones(spec['batch'])
    times = []
    for _ in range(3):
        t0 = C.time.perf_counter()
        denoiser(x, sigma)
        times.append(C.time.perf_counter() - t0)
    return dict(first_extra_s=times[0] - float(np.median(times[1:])))


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument('--config', default='cars64')
    p.add_argument('--batch', type=int, default=1)
    p.add_argument('--samplers', nargs='+', default=['dpmpp_2m', 'lms', 'heun'])
    p.add_argument('--steps', nargs='+', type=int, default=[10, 50, 250])
    p.add_argument('--max-load', type=float, default=1.3, help='wait for the 1-min load to drop below this')
    args = p.parse_args()
    tmp = C.begin(f'Sampler compile time vs steps (bench/compile_time.py): {args.config}, batch {args.batch}',
                  args.max_load)
    weights = C.write_weights(args.config, tmp / 'w.npz')
    torch_res = C.run_worker(__file__, dict(side='torch', config=args.config, weights=str(weights),
                                            batch=args.batch))
    cols = ' | '.join(f'{n} steps: trace+lower s / compile s' for n in args.steps)
    header = f'| sampler | {cols} | compile max/min | peak RSS MiB (jax, max) | PyTorch first-call extra s |'
    print(header + '\n|' + '---|' * (header.count('|') - 1), flush=True)
    others = []
    for sampler in args.samplers:
        cells, compiles, peaks = [], [], []
        for steps in args.steps:
            r = C.run_worker(__file__, dict(side='jax', config=args.config, weights=str(weights), batch=args.batch,
                                            sampler=sampler, steps=steps))
            cells.append(f"{r['lower_s']:.2f} / {r['compile_s']:.1f}")
            compiles.append(r['compile_s'])
            peaks.append(r['peak_rss_mb'])
            others.append(r['others_cores'])
        print(f"| {sampler} | {' | '.join(cells)} | {max(compiles) / min(compiles):.2f} | {max(peaks):.0f} | "
              f"{torch_res['first_extra_s']:.2f} |", flush=True)
    print(f'\nothers (cores) during the jax workers: max {max(others):.2f}; 1-min load at end: {C.loadavg():.2f}')


if __name__ == '__main__':
    if not C.worker_main({'jax': jax_worker, 'torch': torch_worker}):
        main()
