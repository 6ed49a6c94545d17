#!/usr/bin/env python3
"""End-to-end sampling wall time, kdiff_jax vs PyTorch k-diffusion 0.0.15, same converted weights, one run.

  .venv/bin/python bench/sampling.py [--config cars64] [--batch 1] [--samplers dpmpp_2m:50 lms:50 heun:25]
  python3 bench/sampling.py --gpu --batch 64            # on a GPU: bf16 (see bench/gpu.sh)

Karras schedule (the config's σ range, ρ = 7), the same initial noise on both sides. Each (sampler, side) runs in
its own worker process (bench/_common.py). "first call" is the wall time of the first `sample(...)` call of the
process: for kdiff_jax it includes tracing and XLA compilation of the whole loop (one `lax.scan` program); for
PyTorch (eager, nothing to compile) it includes first-call warm-up only. "steady" is the median of --repeats further
calls. "rel err" compares the two final samples (‖x_jax − x_torch‖ / ‖x_torch‖; the samplers are deterministic).
Peak RSS is each worker's whole-process peak (VmHWM). Compile time as a function of the step count:
bench/compile_time.py.

With --gpu both sides run on the GPU, in bf16 by default: kdiff_jax with the model's compute dtype bf16, PyTorch
under a bf16 autocast with TF32 allowed; "GPU peak MiB" is each allocator's peak in use.
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
    import numpy as np
    from kdiff_jax.factory import make_denoiser
    from kdiff_jax.sampling import get_sigmas_karras, sample
    jax.config.update('jax_enable_compilation_cache', False)
    config, model = C.jax_model(spec['config'], spec['weights'], spec['dtype'])
    denoiser = make_denoiser(config, model)
    m = config.model
    sigmas = get_sigmas_karras(spec['steps'], m.sigma_min, m.sigma_max, 7.)
    x = jnp.asarray(np.load(spec['input'])) * sigmas[0]
    run = lambda: sample(denoiser, x, sigmas, spec['sampler'], seed=0).block_until_ready()
    t0 = C.time.perf_counter()
    out = run()
    first = C.time.perf_counter() - t0
    np.save(spec['output'], np.asarray(out))
    t, times = C.median_time(run, spec['repeats'])
    return dict(first=first, time=t, times=times, **C.jax_gpu_memory(spec['gpu']))


def torch_worker(spec):
    import numpy as np
    import torch
    torch.set_grad_enabled(False)
    device = 'cuda' if spec['gpu'] else 'cpu'
    config, _, denoiser, K = C.torch_model(spec['config'], spec['weights'], device)
    denoiser.eval()
    m = config.model
    sigmas = K.sampling.get_sigmas_karras(spec['steps'], m.sigma_min, m.sigma_max, 7., device=device)
    x = torch.from_numpy(np.ascontiguousarray(np.load(spec['input']).transpose(0, 3, 1, 2))).to(device) * sigmas[0]
    fn = getattr(K.sampling, f"sample_{spec['sampler']}")
    precision = C.torch_precision(spec)

    def run():
        with precision:
            out = fn(denoiser, x, sigmas, disable=True)
        C.torch_sync(spec['gpu'])
        return out
    t0 = C.time.perf_counter()
    out = run()
    first = C.time.perf_counter() - t0
    np.save(spec['output'], out.float().cpu().numpy().transpose(0, 2, 3, 1))
    t, times = C.median_time(run, spec['repeats'])
    return dict(first=first, time=t, times=times, **C.torch_gpu_memory(spec['gpu']))


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument('--config', default='cars64')
    p.add_argument('--batch', type=int, default=1)
    p.add_argument('--samplers', nargs='+', default=['dpmpp_2m:50', 'lms:50', 'heun:25'],
                   help='sampler:steps pairs')
    p.add_argument('--repeats', type=int, default=1, help='steady-state calls timed after the first one')
    p.add_argument('--max-load', type=float, default=1.3, help='wait for the 1-min load to drop below this')
    C.add_device_args(p)
    args = p.parse_args()
    import numpy as np
    dtype = C.run_dtype(args)
    tmp = C.begin(f'Sampling wall time (bench/sampling.py): {args.config}, batch {args.batch}'
                  f'{C.device_label(args)}', args.max_load)
    config = C.load_bench_config(args.config)
    weights = C.write_weights(args.config, tmp / 'w.npz')
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, *config.model.input_size, config.model.input_channels)).astype(np.float32)
    np.save(tmp / 'x.npy', x)
    header = ('| sampler | steps | model evals | kdiff_jax first call s (incl. compile) | kdiff_jax steady s | '
              'PyTorch first call s | PyTorch steady s | steady ratio (torch/jax time) | peak RSS MiB jax / torch | '
              'rel err | others (cores) jax / torch |' + (' GPU peak MiB jax / torch |' if args.gpu else ''))
    print(header + '\n|' + '---|' * (header.count('|') - 1), flush=True)
    for item in args.samplers:
        sampler, steps = item.split(':')
        steps = int(steps)
        evals = 2 * steps - 1 if sampler in ('heun', 'dpm_2') else steps
        res = {}
        for side in ('jax', 'torch'):
            spec = dict(side=side, config=args.config, weights=str(weights), input=str(tmp / 'x.npy'),
                        output=str(tmp / f'out_{side}.npy'), sampler=sampler, steps=steps, repeats=args.repeats,
                        gpu=args.gpu, dtype=dtype)
            res[side] = C.run_worker(__file__, spec)
        j, t = res['jax'], res['torch']
        err = C.rel_err(np.load(tmp / 'out_jax.npy'), np.load(tmp / 'out_torch.npy'))
        print(f"| {sampler} | {steps} | {evals} | {j['first']:.1f} | {j['time']:.1f} | {t['first']:.1f} | "
              f"{t['time']:.1f} | {t['time'] / j['time']:.2f}x | {j['peak_rss_mb']:.0f} / {t['peak_rss_mb']:.0f} | "
              f"{err:.1e} | {j['others_cores']:.2f} / {t['others_cores']:.2f} |" +
              (f" {j['gpu_peak_mb']:.0f} / {t['gpu_peak_mb']:.0f} |" if args.gpu else ''), flush=True)
    if args.gpu:
        print(f"\ndevice: {j['device']} (jax) / {t['device']} (PyTorch)")
    print(f'\n1-min load at end: {C.loadavg():.2f}')


if __name__ == '__main__':
    if not C.worker_main({'jax': jax_worker, 'torch': torch_worker}):
        main()
