#!/usr/bin/env python3
"""Sample images from a kdiff_jax checkpoint, or from a PyTorch k-diffusion checkpoint converted on the fly.

  python sample.py --checkpoint ckpts/cars128 --sampler dpmpp_2m --steps 50 -n 64 --grid
  python sample.py --checkpoint cars.pth --config configs/cars128.py --sampler dpm_2 --steps 256 --churn 40 \\
      --s-noise 1.003 --grid --video
Samples k's noise comes from (--seed, k) alone: the same image whatever --batch-size or device count (except with
dpm_adaptive, whose step sizes follow the error of the whole batch, as in k-diffusion).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--checkpoint', required=True, help='kdiff_jax checkpoint directory, or .pth/.safetensors')
    p.add_argument('--config', help='config of the model (needed for PyTorch checkpoints, which hold none)')
    p.add_argument('--which', default='model_ema', choices=['model_ema', 'model'],
                   help='weights of a PyTorch train.py checkpoint to use')
    p.add_argument('--sampler', default='dpmpp_2m', help='a k-diffusion sampler name (e.g. lms, dpm_2, dpmpp_2m)')
    p.add_argument('--steps', type=int, default=50, help='number of steps')
    p.add_argument('--schedule', default='karras', help='σ schedule: karras, exponential, polyexponential, vp')
    p.add_argument('--sigma-min', type=float, help="smallest σ (default: the config's sigma_min)")
    p.add_argument('--sigma-max', type=float, help="largest σ (default: the config's sigma_max)")
    p.add_argument('--rho', type=float, help='ρ of the karras/polyexponential schedule')
    p.add_argument('--churn', type=float, help='s_churn (euler, heun, dpm_2)')
    p.add_argument('--s-tmin', type=float, help='s_tmin (euler, heun, dpm_2)')
    p.add_argument('--s-tmax', type=float, help='s_tmax (euler, heun, dpm_2)')
    p.add_argument('--s-noise', type=float, help='s_noise')
    p.add_argument('--eta', type=float, help='eta (ancestral and SDE samplers)')
    p.add_argument('-n', type=int, default=64, help='number of images')
    p.add_argument('--batch-size', type=int, default=64, help='images per compiled batch (split over devices)')
    p.add_argument('--seed', type=int, default=0, help='random seed')
    p.add_argument('--prefix', default='out/sample', help='output path prefix')
    p.add_argument('--grid', action='store_true', help='also write one grid image of all samples')
    p.add_argument('--video', action='store_true', help='write GIF and MP4 of the denoised prediction per step')
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import numpy as np
    from kdiff_jax.compilation_cache import enable_compilation_cache
    from kdiff_jax.config import ConfigError
    from kdiff_jax.generate import SamplingPlan, generate, load_any_denoiser
    from kdiff_jax.images import save_animation, save_grid, to_pil, to_uint8
    from kdiff_jax.interop import CheckpointError, StateDictMismatch
    enable_compilation_cache()
    options = {name: value for name, value in (('s_churn', args.churn), ('s_tmin', args.s_tmin),
                                               ('s_tmax', args.s_tmax), ('s_noise', args.s_noise),
                                               ('eta', args.eta)) if value is not None}
    prefix = Path(args.prefix)
    try:
        if args.n < 1:
            raise ValueError(f'-n must be >= 1, got {args.n}')
        stale = sorted(p.name for p in prefix.parent.glob(f'{prefix.name}_[0-9][0-9][0-9][0-9][0-9].png')
                       if int(p.stem[-5:]) >= args.n)
        if stale:  # they would be left beside the new samples and read as theirs (evaluate.py --samples)
            raise FileExistsError(f'{prefix.parent} already holds {len(stale)} samples numbered from {args.n} up '
                                  f'({stale[0]}, …) under --prefix {prefix}: sampling -n {args.n} would leave them '
                                  'beside the new ones. Remove them or choose another --prefix')
        SamplingPlan(args.sampler, args.steps, args.schedule, 0.01, 80., args.rho, options)  # check args first
        denoiser, config = load_any_denoiser(args.checkpoint, args.config, args.which)
        m = config.model
        plan = SamplingPlan(args.sampler, args.steps, args.schedule,
                            m.sigma_min if args.sigma_min is None else args.sigma_min,
                            m.sigma_max if args.sigma_max is None else args.sigma_max, args.rho, options)
    except (ValueError, ConfigError, CheckpointError, StateDictMismatch, FileNotFoundError, FileExistsError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    result = generate(denoiser, config, plan, args.n, batch_size=args.batch_size, seed=args.seed, record=args.video)
    images, frames = result if args.video else (result, None)
    broken = np.flatnonzero(~np.isfinite(np.asarray(images)).reshape(len(images), -1).all(axis=1))
    if broken.size:
        print(f'error: {broken.size} of {len(images)} samples hold NaN or infinite values (the first: sample '
              f'{broken[0]}); nothing written. The weights give no finite images: a diverged run?', file=sys.stderr)
        return 2
    prefix.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for k, image in enumerate(to_uint8(images)):
        path = prefix.parent / f'{prefix.name}_{k:05}.png'
        to_pil(image).save(path)
    written.append(f'{len(images)} images {prefix}_*.png')
    if args.grid:
        written.append(str(save_grid(images, f'{prefix}_grid.png')))
    if args.video:
        written += [str(save_animation(frames, f'{prefix}_trajectory{ext}')) for ext in ('.gif', '.mp4')]
    print('wrote ' + ', '.join(written))
    return 0


if __name__ == '__main__':
    from kdiff_jax.malloc import use_mimalloc
    use_mimalloc()  # restarts this process under mimalloc on Linux CPU hosts (kdiff_jax/malloc.py)
    sys.exit(main())
