#!/usr/bin/env python3
"""Training-step throughput, kdiff_jax vs PyTorch k-diffusion 0.0.15, same converted weights, one run.

  .venv/bin/python bench/train_step.py [--config cars64] [--batch 8] [--target-s 20]
  python3 bench/train_step.py --gpu --batch 64          # on a GPU: bf16 (see bench/gpu.sh)

One step is k-diffusion's train.py step: noise and σ drawn (the config's density), the Karras loss with dropout on,
backward, AdamW (the config's hyperparameters), LR schedule step and EMA update. kdiff_jax runs
`make_train_step` compiled by `jit_train_step` over a 1-device data mesh (state donated); PyTorch runs
`denoiser.loss(...).mean().backward()`, `opt.step()`, `sched.step()`, `opt.zero_grad()` and `K.utils.ema_update`.
Each side runs in its own worker process (bench/_common.py); images/s from the median step time after one warm-up
step (as many steps as fit in --target-s, 2 to 10). The FLOPs of one step are XLA's cost analysis of the lowered
(not yet optimised) kdiff_jax step, counted once and used for both sides; the fp32 matmul ceiling is each
framework's 2048² matmul.

With --gpu both sides run on the GPU: kdiff_jax with the model's compute dtype bf16 (parameters, normalisation
statistics and the loss stay fp32), PyTorch under a bf16 autocast with TF32 allowed, as k-diffusion's train.py
sets it. MFU is the step's FLOPs over its time over the card's data-sheet dense bf16 peak; the measured ceiling is
then a bf16 8192² matmul.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def timed_steps(spec, first_s: float) -> int:
    """How many steps to time: as many as fit in --target-s, 2 to 10 (to 50 on a GPU, where steps are short)."""
    return C.repeats_for(first_s, spec['target_s'], hi=50 if spec['gpu'] else 10)


def jax_worker(spec):
    import jax
    import numpy as np
    jax.config.update('jax_enable_compilation_cache', False)
    with np.load(spec['batch']) as f:
        step, state, batch = C.jax_train_step(spec['config'], spec['weights'], spec['dtype'], dict(f))
    t0 = C.time.perf_counter()
    lowered = step.lower(state, batch)
    compiled = lowered.compile()
    compile_s = C.time.perf_counter() - t0
    peak_after_compile = C.memory_status()['VmHWM']  # before any step ran: what compiling took
    buffers = compiled.memory_analysis()  # XLA's buffer assignment of the step
    # FLOPs of the program as written, before backend passes: on a GPU the compiled program's convolutions are cuDNN
    # custom calls that XLA's cost analysis does not count. (On the CPU the two counts differ by < 5%.)
    cost = lowered.cost_analysis()
    flops = (cost[0] if isinstance(cost, list) else cost).get('flops', float('nan'))
    run = C.step_runner(compiled, state, batch)
    t0 = C.time.perf_counter()
    metrics = run()
    first = C.time.perf_counter() - t0
    t, times = C.median_time(run, timed_steps(spec, first))
    return dict(time=t, times=times, compile_s=compile_s, flops=flops, loss=float(metrics['loss']),
                ceiling=C.jax_matmul_ceiling(spec['gpu']), peak_after_compile_mb=peak_after_compile,
                step_buffers_mb=(buffers.argument_size_in_bytes + buffers.output_size_in_bytes
                                 - buffers.alias_size_in_bytes + buffers.temp_size_in_bytes) / 2 ** 20,
                rss_after_steps_mb=C.memory_status()['VmRSS'], **C.jax_gpu_memory(spec['gpu']))


def torch_worker(spec):
    import numpy as np
    import torch
    from kdiff_jax.config import to_kdiffusion_dict
    device = 'cuda' if spec['gpu'] else 'cpu'
    config, inner, denoiser, K = C.torch_model(spec['config'], spec['weights'], device)
    kd = to_kdiffusion_dict(config)
    torch.manual_seed(0)
    inner.train()
    ema = K.config.make_model(kd).eval().to(device)
    ema.load_state_dict(inner.state_dict())
    o = config.optimizer
    opt = torch.optim.AdamW(inner.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.)  # train.py's 'constant' lr_sched (the config's)
    ema_sched = K.utils.EMAWarmup(power=config.ema_sched.power, max_value=config.ema_sched.max_value)
    sample_density = K.config.make_sample_density(kd['model'])
    with np.load(spec['batch']) as f:
        reals = torch.from_numpy(np.ascontiguousarray(f['image'].transpose(0, 3, 1, 2))).to(device)
        kwargs = {'aug_cond': torch.from_numpy(f['aug_cond']).to(device)} if config.model.augment_wrapper else {}
    state = {}
    precision = C.torch_precision(spec)

    def run():  # k-diffusion 0.0.15 train.py, one micro-step without gradient accumulation
        noise = torch.randn_like(reals)
        sigma = sample_density([reals.shape[0]], device=device)
        with precision:
            losses = denoiser.loss(reals, noise, sigma, **kwargs)
        loss = losses.mean()
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        K.utils.ema_update(inner, ema, ema_sched.get_value())
        ema_sched.step()
        state['loss'] = loss.item()
        C.torch_sync(spec['gpu'])
    t0 = C.time.perf_counter()
    run()
    first = C.time.perf_counter() - t0
    t, times = C.median_time(run, timed_steps(spec, first))
    return dict(time=t, times=times, loss=state['loss'], ceiling=C.torch_matmul_ceiling(spec['gpu']),
                threads=torch.get_num_threads(), **C.torch_gpu_memory(spec['gpu']))


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument('--config', default='cars64')
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--target-s', type=float, default=20., help='timed seconds per side (2-10 steps)')
    p.add_argument('--max-load', type=float, default=1.3, help='wait for the 1-min load to drop below this')
    C.add_device_args(p)
    args = p.parse_args()
    import numpy as np
    dtype = C.run_dtype(args)
    tmp = C.begin(f'Training step throughput (bench/train_step.py): {args.config}, batch {args.batch}'
                  f'{C.device_label(args)}', args.max_load)
    weights = C.write_weights(args.config, tmp / 'w.npz')
    np.savez(tmp / 'batch.npz', **C.train_batch(args.config, args.batch))
    res = {}
    for side in ('jax', 'torch'):
        spec = dict(side=side, config=args.config, weights=str(weights), batch=str(tmp / 'batch.npz'),
                    target_s=args.target_s, gpu=args.gpu, dtype=dtype)
        res[side] = C.run_worker(__file__, spec)
    j, t = res['jax'], res['torch']
    gf = j['flops'] / 1e9
    ips_j, ips_t = args.batch / j['time'], args.batch / t['time']
    header = ('| config | batch | kdiff_jax img/s | PyTorch img/s | ratio | step s jax / torch | XLA compile s | '
              'GFLOP/step | kdiff_jax GFLOP/s (% of XLA matmul) | PyTorch GFLOP/s (% of torch matmul) | '
              'peak RSS MiB jax / torch | others (cores) jax / torch |')
    print(header + '\n|' + '---|' * (header.count('|') - 1))
    print(f"| {args.config} | {args.batch} | {ips_j:.2f} | {ips_t:.2f} | {ips_j / ips_t:.2f}x | {j['time']:.2f} / "
          f"{t['time']:.2f} | {j['compile_s']:.1f} | {gf:.0f} | {gf / j['time']:.0f} "
          f"({gf / j['time'] / j['ceiling']:.0%}) | {gf / t['time']:.0f} ({gf / t['time'] / t['ceiling']:.0%}) | "
          f"{j['peak_rss_mb']:.0f} / {t['peak_rss_mb']:.0f} | {j['others_cores']:.2f} / {t['others_cores']:.2f} |")
    print(f"\nsteps timed: jax {len(j['times'])}, torch {len(t['times'])}; first-step loss jax {j['loss']:.4f}, "
          f"torch {t['loss']:.4f} (different noise draws); {'bf16' if args.gpu else 'fp32'} matmul ceiling XLA "
          f"{j['ceiling']:.0f}, PyTorch "
          f"{t['ceiling']:.0f} GFLOP/s; 1-min load at end: {C.loadavg():.2f}")
    print(f"kdiff_jax memory: peak RSS {j['peak_after_compile_mb']:.0f} MiB already at the end of compilation (no step "
          f"run yet); the compiled step's buffers (XLA buffer assignment: state in/out less donated, temporaries) "
          f"{j['step_buffers_mb']:.0f} MiB; resident after the timed steps {j['rss_after_steps_mb']:.0f} MiB")
    if args.gpu:
        peak = C.bf16_peak_tflops(j['device'])
        header = ('| GPU | kdiff_jax MFU | PyTorch MFU | dense bf16 peak TFLOP/s (data sheet) | '
                  'bf16 matmul TFLOP/s jax / torch | GPU peak MiB jax / torch |')
        print('\n' + header + '\n|' + '---|' * (header.count('|') - 1))
        mfu_j, mfu_t = gf / j['time'] / 1e3 / peak, gf / t['time'] / 1e3 / peak
        print(f"| {j['device']} / {t['device']} | {mfu_j:.1%} | {mfu_t:.1%} | "
              f"{peak:.0f} | {j['ceiling'] / 1e3:.0f} / {t['ceiling'] / 1e3:.0f} | {j['gpu_peak_mb']:.0f} / "
              f"{t['gpu_peak_mb']:.0f} |")


if __name__ == '__main__':
    if not C.worker_main({'jax': jax_worker, 'torch': torch_worker}):
        main()
