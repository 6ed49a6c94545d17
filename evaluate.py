#!/usr/bin/env python3
"""FID and KID (k-diffusion's definitions, Inception-v3 2015-12-05 features) between generated images and reals.

  python evaluate.py --reals configs/cars64.py --samples runs/cars64 -n 2000
  python evaluate.py --reals configs/cars128.py --samples cars.pth --sampler dpm_2 --steps 50 -n 5000
  python evaluate.py --reals path/to/real_images --samples out/ --config configs/cars64.py

--reals: a config (its dataset's first n un-augmented training images, as train.py --evaluate-every) or a folder.
--samples: a folder of images, or a checkpoint (kdiff_jax run or converted model directory, or a PyTorch .pth: its
model config is --config, else the --reals config) to sample n images from with --sampler/--steps, on the devices,
writing no image files.
Both sides are read at the model's input size and channels (the checkpoint's config, else --config, else the reals
config's), as the training data is: center crop and resize. Point --samples at a folder that holds only samples
(a folder whose images differ in size, e.g. with sample.py's grid in it, is refused).
Needs the FID Inception weights: --inception-weights PATH (pt_inception-2015-12-05-6726825d.pth).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--reals', required=True, help='a config file (its dataset) or a folder of real images')
    p.add_argument('--samples', required=True, help='a folder of generated images, or a checkpoint to sample from')
    p.add_argument('--config', help='the model config: for a PyTorch checkpoint, or the image size of two folders')
    p.add_argument('-n', type=int, default=2000, help='images from each side (a folder: at most all of it)')
    p.add_argument('--inception-weights', help='pt_inception-2015-12-05-6726825d.pth (default: '
                   '$KDIFF_JAX_INCEPTION_WEIGHTS or ~/.cache/kdiff_jax/)')
    p.add_argument('--sampler', default='dpmpp_2m', help='sampler for --samples CHECKPOINT')
    p.add_argument('--steps', type=int, default=50, help='sampling steps (karras schedule)')
    p.add_argument('--batch-size', type=int, default=64, help='images per compiled batch (split over devices)')
    p.add_argument('--seed', type=int, default=0, help='sampling seed')
    p.add_argument('--out', help='also write the results as JSON to this file')
    return p.parse_args(argv)


def _is_config(path: Path) -> bool:
    return path.is_file() and path.suffix in ('.py', '.json')


def main(argv=None) -> int:
    args = parse_args(argv)
    from kdiff_jax.compilation_cache import enable_compilation_cache
    from kdiff_jax.config import ConfigError, load_config
    from kdiff_jax.data.sources import DatasetError
    from kdiff_jax.interop import CheckpointError, StateDictMismatch
    enable_compilation_cache()
    import jax
    from kdiff_jax.evaluation import evaluator as E
    from kdiff_jax.evaluation.inception import FIDFeatureExtractor, resolve_inception_path
    from kdiff_jax.generate import TORCH_SUFFIXES, SamplingPlan, is_checkpoint, load_any_denoiser
    from kdiff_jax.training.sharding import data_mesh

    reals, samples = Path(args.reals), Path(args.samples)
    try:
        if args.n < 2:
            raise ValueError(f'-n must be >= 2, got {args.n}')
        inception_weights = resolve_inception_path(args.inception_weights)  # first: a missing file fails fast
        if _is_config(reals):
            reals_config = load_config(str(reals))
        elif reals.is_dir():
            reals_config = None
        else:
            raise FileNotFoundError(f'--reals {reals}: neither a config file nor a folder of images')
        denoiser = None
        if is_checkpoint(samples):  # a PyTorch file holds no config: --config, else the reals config
            model_config = args.config or (reals_config if samples.suffix in TORCH_SUFFIXES else None)
            denoiser, config = load_any_denoiser(samples, model_config)
        elif not samples.is_dir():
            raise FileNotFoundError(f'--samples {samples}: neither a checkpoint nor a folder of images')
        else:
            E.check_samples_folder(samples)
        if denoiser is None:  # the size and channels to compare at
            if args.config:
                config = load_config(args.config)
            elif reals_config is not None:
                config = reals_config
            else:
                raise ConfigError('two folders: pass --config for the image size and channels to compare at')
        extractor = FIDFeatureExtractor.load(inception_weights)  # after the cheap checks of the arguments
        plan = None
        if denoiser is not None:
            m = config.model
            plan = SamplingPlan(args.sampler, args.steps, 'karras', m.sigma_min, m.sigma_max)
        real_images = E.dataset_images(config, args.n, folder=None if reals_config else reals,
                                       dataset=reals_config.dataset if reals_config else None)
        sample_images = None if denoiser is not None else E.dataset_images(config, args.n, folder=samples)
    except (ValueError, ConfigError, DatasetError, CheckpointError, StateDictMismatch, FileNotFoundError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2

    features = E.FeatureSet(extractor, data_mesh(jax.local_devices()), args.batch_size)
    real_features = features.of_array(real_images, desc='reals features')
    if denoiser is not None:
        batches = E.sample_batches(denoiser, config, features.batch_size, features.mesh, args.seed, plan)
        fake_features = features.of_batches(batches, args.n, desc=f'sampling ({plan.sampler}, {plan.steps} steps)')
    else:
        fake_features = features.of_array(sample_images, desc='samples features')
    results = {**E.fid_kid(fake_features, real_features), 'n_samples': len(fake_features),
               'n_reals': len(real_features), 'reals': str(reals), 'samples': str(samples)}
    if denoiser is not None:
        results.update(sampler=plan.sampler, steps=plan.steps, seed=args.seed)
    print(f"FID {results['fid']:.4f}  KID {results['kid']:.6f}  ({results['n_samples']} samples vs "
          f"{results['n_reals']} reals)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + '\n')
        print(f'results: {Path(args.out).absolute()}')
    return 0


if __name__ == '__main__':
    from kdiff_jax.malloc import use_mimalloc
    use_mimalloc()  # restarts this process under mimalloc on Linux CPU hosts (kdiff_jax/malloc.py)
    sys.exit(main())
