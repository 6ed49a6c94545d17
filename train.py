#!/usr/bin/env python3
"""Train Karras et al. (2022) diffusion models with k-diffusion's recipe, in JAX, on every local device or host.

  python train.py --config configs/cars64.py --name cars
  python train.py --config configs/demo.py --config.model.dropout_rate=0.1 --end-step 2000

Re-running the same command resumes from the run's latest checkpoint (<out-dir>/<name>/checkpoints).
--batch-size is the global batch of one micro-step, over all devices and hosts (k-diffusion's is per process: a
k-diffusion run on G GPUs with --batch-size B corresponds to --batch-size G·B here).
Multi-host: start one process per host with --coordinator-address HOST:PORT --num-processes N --process-id I.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--config', required=True, help='the configuration file (.py or k-diffusion .json)')
    p.add_argument('--name', default='model', help='the name of the run (its directory under --out-dir)')
    p.add_argument('--out-dir', default='runs', help='where runs are written')
    p.add_argument('--batch-size', type=int, default=64, help='the global batch size of one micro-step')
    p.add_argument('--grad-accum-steps', type=int, default=1, help='the number of gradient accumulation steps')
    p.add_argument('--lr', type=float, help='the learning rate (overrides the config)')
    p.add_argument('--resume', help='a kdiff_jax checkpoint directory or a PyTorch k-diffusion train.py checkpoint')
    p.add_argument('--grow', help='the checkpoint to grow from (kdiff_jax directory or PyTorch .pth)')
    p.add_argument('--grow-config', help='the configuration file of the model to grow from')
    p.add_argument('--demo-every', type=int, default=500, help='save a demo grid every this many steps')
    p.add_argument('--save-every', type=int, default=10000, help='save a checkpoint every this many steps')
    p.add_argument('--keep', type=int, default=3, help='how many checkpoints to keep')
    p.add_argument('--evaluate-every', type=int, default=-1, help='evaluate FID/KID every this many steps')
    p.add_argument('--evaluate-n', type=int, default=2000, help='the number of samples to draw to evaluate')
    p.add_argument('--inception-weights', help='the FID Inception-v3 weights, pt_inception-2015-12-05-6726825d.pth '
                   '(default: $KDIFF_JAX_INCEPTION_WEIGHTS or ~/.cache/kdiff_jax/)')
    p.add_argument('--sample-n', type=int, default=64, help='the number of images to sample for demo grids')
    p.add_argument('--seed', type=int, default=0, help='the random seed')
    p.add_argument('--end-step', type=int, help='stop after this many steps (micro-batches)')
    p.add_argument('--gns', action='store_true', help='measure the gradient noise scale')
    p.add_argument('--num-workers', type=int, default=0, help='data loader worker processes')
    p.add_argument('--coordinator-address', help='multi-host: HOST:PORT of process 0')
    p.add_argument('--num-processes', type=int, default=1, help='multi-host: number of processes')
    p.add_argument('--process-id', type=int, default=0, help='multi-host: this process')
    return p.parse_known_args(argv)


def main(argv=None) -> int:
    args, overrides = parse_args(argv)
    from kdiff_jax.config import ConfigError, apply_overrides, load_config
    try:
        config = apply_overrides(load_config(args.config), overrides)
    except ConfigError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    if args.num_processes > 1:
        import jax
        jax.config.update('jax_cpu_collectives_implementation', 'gloo')
        jax.distributed.initialize(coordinator_address=args.coordinator_address, num_processes=args.num_processes,
                                   process_id=args.process_id)
    from kdiff_jax.compilation_cache import enable_compilation_cache
    from kdiff_jax.training.loop import TrainOptions, train
    enable_compilation_cache()
    options = TrainOptions(**{k: v for k, v in vars(args).items()
                              if k in TrainOptions.__dataclass_fields__})
    from kdiff_jax.data.sources import DatasetError
    from kdiff_jax.interop import CheckpointError, StateDictMismatch
    from kdiff_jax.training.loop import TrainingDiverged
    try:
        train(options, config)
    except (CheckpointError, StateDictMismatch, ConfigError, DatasetError, TrainingDiverged) as e:
        # an unusable option, checkpoint, grow source or Inception weights (incl. missing), a PyTorch checkpoint of
        # another model, a dataset not prepared (all raised while setting up, before any step), or a run that
        # diverged (stopped after saving): one clear message
        print(f'error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    from kdiff_jax.malloc import use_mimalloc
    use_mimalloc()  # restarts this process under mimalloc on Linux CPU hosts (kdiff_jax/malloc.py)
    sys.exit(main())
