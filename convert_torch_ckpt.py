#!/usr/bin/env python3
"""Convert PyTorch k-diffusion checkpoints to kdiff_jax checkpoints, and back.

  PyTorch → kdiff_jax:  python convert_torch_ckpt.py --checkpoint cars.pth --config configs/cars128.py --out ckpts/cars128
  kdiff_jax → PyTorch:  python convert_torch_ckpt.py --checkpoint ckpts/cars128 --out cars128.safetensors   (or .pth)

The direction follows --out: a `.pth`/`.safetensors` file exports, anything else is the kdiff_jax directory to write.
Nothing is overwritten but an earlier kdiff_jax model checkpoint at --out (replaced once the new one is complete); an
existing --out file, training run or other folder is an error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

TORCH_SUFFIXES = ('.pth', '.pt', '.ckpt', '.safetensors')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--checkpoint', required=True,
                   help='PyTorch train.py checkpoint / state_dict (.pth, .safetensors), or a kdiff_jax checkpoint '
                        'directory to export')
    p.add_argument('--config', help='kdiff_jax .py or k-diffusion .json config of the model (import only)')
    p.add_argument('--which', default='model_ema', choices=['model_ema', 'model'],
                   help='which weights of a train.py checkpoint to convert (default: model_ema, used for sampling)')
    p.add_argument('--out', required=True, help='kdiff_jax checkpoint directory, or a .pth/.safetensors to export')
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from kdiff_jax.checkpoint import load_model, save_model
    from kdiff_jax.config import ConfigError, load_config
    from kdiff_jax.factory import count_params
    from kdiff_jax.interop import CheckpointError, StateDictMismatch, export_torch_state_dict, \
        model_from_torch_checkpoint

    try:
        if Path(args.out).suffix in TORCH_SUFFIXES:
            if Path(args.out).exists():  # perhaps the PyTorch checkpoint it came from: never overwritten
                raise FileExistsError(f'--out {args.out} exists: not overwritten (choose another path, or remove it)')
            print(f'reading kdiff_jax checkpoint {args.checkpoint}')
            model = load_model(args.checkpoint, load_config(args.config) if args.config else None)
            out = export_torch_state_dict(model, args.out)
            print(f'wrote k-diffusion state_dict ({count_params(model):,} parameters) to {out}')
            return 0
        if not args.config:
            raise ConfigError('--config is required to convert a PyTorch checkpoint (PyTorch checkpoints hold no '
                              'config); e.g. --config configs/cars128.py')
        config = load_config(args.config)
        print(f'reading {args.checkpoint} ({args.which}) with weights_only=True')
        model = model_from_torch_checkpoint(args.checkpoint, config, which=args.which)
        out = save_model(args.out, model, config)
        print(f'wrote kdiff_jax checkpoint ({count_params(model):,} parameters) to {out}')
        print(f'load it with: kdiff_jax.load_denoiser({str(out)!r})')
        return 0
    except (CheckpointError, StateDictMismatch, ConfigError, FileNotFoundError, FileExistsError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
