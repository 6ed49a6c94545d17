#!/usr/bin/env python3
"""Training-step throughput, kdiff_jax vs PyTorch k-diffusion 0.0.15, same converted weights, one run.

  .venv/bin/python bench/train_step.py [--config cars64] [--batch 8] [--target-s 20]
  python3 bench/train_step.py --gpu --batch 64          # on a GPU: bf16 (see bench/gpu.sh)

One step is k-diffusion's train.py step: noise and σ drawn (the config's density), the Karras loss with dropout on,
backward, AdamW (the config's hyperparameters), LR schedule step and EMA update. kdiff_jax runs
`make_train_step` compiled by `jit_train_step` over a 1-device data mesh (state donated); PyTorch runs
`denoiser.loss(...).mean().backward()`, `opt.step()`, `sched.step()`, `opt.zero_grad()` and `K.utils.ema_update`.
Each side runs in its own worker process (bench/_common.py); images/s from the median step time after one warm-up
step (as many steps as fit in --target-s, 2 to 10). `--rounds N` repeats the pair N times, alternating which side
goes first: on a machine whose speed drifts (this VM's step times vary by 10–20% over an hour), the median of
the rounds' ratios is the figure to compare. The FLOPs of one step are XLA's cost analysis of the lowered
(not yet optimised) kdiff_jax step, counted once and used for both sides (with --gpu the step is lowered on the CPU
for this: XLA:GPU gives no count before optimisation); the fp32 matmul ceiling is each framework's 2048² matmul.

The "pipelined" line times the same number of steps dispatched back to back with one wait at the end, as
kdiff_jax's train.py runs them (it reads metrics every 25 steps); on a GPU this hides the host's work between
steps. On XLA:CPU it can be slower than stepping synchronously (demo config, batch 8: 48.5 against 35.3 ms per
step), since queued work competes with the running step for the same cores.

--profile DIR runs a few more steps of each side under its profiler (in the last round) and writes kernel summaries,
the traces and the optimized HLO there (bench/gpu_trace.py reads them again).

With --gpu both sides run on the GPU: kdiff_jax with the model's compute dtype bf16 (parameters, normalisation
statistics and the loss stay fp32), PyTorch under a bf16 autocast with TF32 allowed, as k-diffusion's train.py
sets it. MFU is the step's FLOPs over its time over the card's data-sheet dense bf16 peak; the measured ceiling is
then a bf16 8192² matmul.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import gpu_trace  # noqa: E402

PROFILED_STEPS = 3  # steps run under the profiler with --profile, after the timed ones


def timed_steps(spec, first_s: float) -> int:
    """How many steps to time: as many as fit in --target-s, 2 to 10 (to 50 on a GPU, where steps are short)."""
    return C.repeats_for(first_s, spec['target_s'], hi=50 if spec['gpu'] else 10)


def profile_side(spec, side: str, result: dict, fn):
    """Run one side's profile after its measurements: the peak RSS reported is the one before it, and a failure is
    written to <side>_train_kernels.md instead of losing the timings."""
    import traceback
    result['peak_rss_mb'] = C.memory_status()['VmHWM']
    try:
        fn()
    except Exception:  # noqa: BLE001 -- the profile is extra; the timed steps are already measured
        (Path(spec['profile']) / f'{side}_train_kernels.md').write_text(f'profile failed:\n{traceback.format_exc()}')


def gzip_to(src: Path, dst: Path):
    """Compress `src` into `dst` and delete `src` (traces and HLO text compress ~5x; the device run brings files
    back up to 16 MiB each)."""
    with open(src, 'rb') as f, gzip.open(dst, 'wb') as g:
        shutil.copyfileobj(f, g)
    src.unlink()


def profile_jax(run, compiled, out: Path, step_s: float):
    """PROFILED_STEPS steps under jax.profiler.trace: the trace (jax_train.xplane.pb.gz), the optimized HLO
    (jax_train_hlo.txt.gz) and the kernel summary with the fusions' traffic (jax_train_kernels.md)."""
    import jax
    with jax.profiler.trace(str(out / 'jax_trace')):
        for _ in range(PROFILED_STEPS):
            run()
    trace = glob.glob(str(out / 'jax_trace/**/*.xplane.pb'), recursive=True)[0]
    gzip_to(Path(trace), out / 'jax_train.xplane.pb.gz')
    shutil.rmtree(out / 'jax_trace')
    hlo = compiled.as_text()
    with gzip.open(out / 'jax_train_hlo.txt.gz', 'wt') as f:
        f.write(hlo)
    (out / 'jax_train_kernels.md').write_text(
        gpu_trace.summarize_xplane(str(out / 'jax_train.xplane.pb.gz'), PROFILED_STEPS, step_s * 1e3, hlo_text=hlo))


def profile_torch(run, out: Path, step_s: float, gpu: bool):
    """PROFILED_STEPS steps under torch.profiler: the gzipped Chrome trace and the kernel summary (on the CPU, the
    op table) in torch_train_kernels.md."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])) as prof:
        for _ in range(PROFILED_STEPS):
            run()
    raw = out / 'torch_train_trace.json'
    prof.export_chrome_trace(str(raw))
    gzip_to(raw, out / 'torch_train_trace.json.gz')
    (out / 'torch_train_kernels.md').write_text(
        gpu_trace.summarize_chrome_trace(str(out / 'torch_train_trace.json.gz'), PROFILED_STEPS, step_s * 1e3)
        if gpu else prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=25))


def lowered_flops(lowered) -> float:
    """XLA's FLOP count of a lowered program, or nan where the backend gives none (XLA:GPU does not analyse the
    unoptimised program; `flops_worker` then counts on the CPU)."""
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float((cost or {}).get('flops', float('nan')))


def flops_worker(spec):
    """The step's FLOPs, lowered (not compiled) on the CPU in float32. The bf16 step's count differs only by its
    dtype conversions, which XLA counts as element operations (+0.5% at the demo config; tests/test_bench.py)."""
    import numpy as np
    with np.load(spec['batch']) as f:
        step, state, batch = C.jax_train_step(spec['config'], spec['weights'], 'float32', dict(f))
    return dict(flops=lowered_flops(step.lower(state, batch)))


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
    flops = lowered_flops(lowered)
    run = C.step_runner(compiled, state, batch)
    t0 = C.time.perf_counter()
    metrics = run()
    first = C.time.perf_counter() - t0
    t, times = C.median_time(run, timed_steps(spec, first))
    pipelined = C.pipelined_time(lambda: run(block=False), jax.block_until_ready, len(times))
    result = dict(time=t, times=times, pipelined=pipelined, compile_s=compile_s, flops=flops,
                  loss=float(metrics['loss']), ceiling=C.jax_matmul_ceiling(spec['gpu']),
                  peak_after_compile_mb=peak_after_compile,
                  step_buffers_mb=(buffers.argument_size_in_bytes + buffers.output_size_in_bytes
                                   - buffers.alias_size_in_bytes + buffers.temp_size_in_bytes) / 2 ** 20,
                  rss_after_steps_mb=C.memory_status()['VmRSS'], **C.jax_gpu_memory(spec['gpu']))
    if spec['profile']:  # a few more steps under the profiler, with the optimized HLO they ran
        profile_side(spec, 'jax', result, lambda: profile_jax(run, compiled, Path(spec['profile']), t))
    return result


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

    def run(sync: bool = True):  # k-diffusion 0.0.15 train.py, one micro-step without gradient accumulation
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
        if sync:  # k-diffusion's train.py calls .item() on every step's loss (a sync)
            state['loss'] = loss.item()
            C.torch_sync(spec['gpu'])
    t0 = C.time.perf_counter()
    run()
    first = C.time.perf_counter() - t0
    first_loss = state['loss']  # the timed steps overwrite state['loss']; the report compares first steps
    t, times = C.median_time(run, timed_steps(spec, first))
    pipelined = C.pipelined_time(lambda: run(sync=False), lambda _: C.torch_sync(spec['gpu']), len(times))
    result = dict(time=t, times=times, pipelined=pipelined, loss=first_loss,
                  ceiling=C.torch_matmul_ceiling(spec['gpu']), threads=torch.get_num_threads(),
                  **C.torch_gpu_memory(spec['gpu']))
    if spec['profile']:
        profile_side(spec, 'torch', result, lambda: profile_torch(run, Path(spec['profile']), t, spec['gpu']))
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument('--config', default='cars64')
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--target-s', type=float, default=20., help='timed seconds per side (2-10 steps)')
    p.add_argument('--rounds', type=int, default=1, help='measure both sides this many times, alternating which '
                   'goes first (one row per round, and the median ratio)')
    p.add_argument('--max-load', type=float, default=1.3, help='wait for the 1-min load to drop below this')
    p.add_argument('--profile', metavar='DIR', help='after timing, profile a few steps of each side into DIR: '
                   'kernel summaries (*_kernels.md), the raw traces and the optimized HLO (bench/gpu_trace.py)')
    C.add_device_args(p)
    args = p.parse_args()
    import numpy as np
    dtype = C.run_dtype(args)
    tmp = C.begin(f'Training step throughput (bench/train_step.py): {args.config}, batch {args.batch}'
                  f'{C.device_label(args)}', args.max_load)
    weights = C.write_weights(args.config, tmp / 'w.npz')
    np.savez(tmp / 'batch.npz', **C.train_batch(args.config, args.batch))
    common = dict(config=args.config, weights=str(weights), batch=str(tmp / 'batch.npz'))
    rounds = []
    for i in range(args.rounds):  # the side that goes first alternates, so a drifting machine favours neither
        res = {}
        for side in ('jax', 'torch') if i % 2 == 0 else ('torch', 'jax'):
            last = i == args.rounds - 1  # --profile: the last round's workers only (one set of traces)
            res[side] = C.run_worker(__file__, dict(side=side, target_s=args.target_s, gpu=args.gpu, dtype=dtype,
                                                    profile=last and args.profile and str(Path(args.profile).resolve()),
                                                    **common))
        rounds.append((res['jax'], res['torch']))
    j, t = rounds[-1]
    if j['flops'] != j['flops']:  # nan: the backend (XLA:GPU) gave no count; count on the CPU
        j['flops'] = C.run_worker(__file__, dict(side='flops', **common), env={'JAX_PLATFORMS': 'cpu'})['flops']
    gf = j['flops'] / 1e9
    ips_j, ips_t = args.batch / j['time'], args.batch / t['time']
    header = ('| config | batch | kdiff_jax img/s | PyTorch img/s | ratio | step s jax / torch | XLA compile s | '
              'GFLOP/step | kdiff_jax GFLOP/s (% of XLA matmul) | PyTorch GFLOP/s (% of torch matmul) | '
              'peak RSS MiB jax / torch | others (cores) jax / torch |')
    print(header + '\n|' + '---|' * (header.count('|') - 1))
    for rj, rt in rounds:
        print(f"| {args.config} | {args.batch} | {args.batch / rj['time']:.2f} | {args.batch / rt['time']:.2f} | "
              f"{rt['time'] / rj['time']:.2f}x | {rj['time']:.2f} / {rt['time']:.2f} | {rj['compile_s']:.1f} | "
              f"{gf:.0f} | {gf / rj['time']:.0f} ({gf / rj['time'] / rj['ceiling']:.0%}) | {gf / rt['time']:.0f} "
              f"({gf / rt['time'] / rt['ceiling']:.0%}) | {rj['peak_rss_mb']:.0f} / {rt['peak_rss_mb']:.0f} | "
              f"{rj['others_cores']:.2f} / {rt['others_cores']:.2f} |")
    if len(rounds) > 1:
        ratios = sorted(rt['time'] / rj['time'] for rj, rt in rounds)
        print(f"\n{len(rounds)} rounds (one row each, the first side alternating): ratio median "
              f"{ratios[len(ratios) // 2]:.2f}x, range {ratios[0]:.2f}–{ratios[-1]:.2f}x; the lines below are the last "
              "round's")
    print(f"\nsteps timed: jax {len(j['times'])}, torch {len(t['times'])}; first-step loss jax {j['loss']:.4f}, "
          f"torch {t['loss']:.4f} (different noise draws); {'bf16' if args.gpu else 'fp32'} matmul ceiling XLA "
          f"{j['ceiling']:.0f}, PyTorch "
          f"{t['ceiling']:.0f} GFLOP/s; 1-min load at end: {C.loadavg():.2f}")
    pj, pt = args.batch / j['pipelined'], args.batch / t['pipelined']
    print(f"pipelined, i.e. {len(j['times'])} / {len(t['times'])} steps dispatched back to back and waited for once "
          f"(kdiff_jax's train.py runs so; k-diffusion's train.py syncs on every step's loss): kdiff_jax {pj:.2f}, "
          f"PyTorch {pt:.2f} img/s; kdiff_jax pipelined against PyTorch synced every step: {pj / ips_t:.2f}x")
    print(f"kdiff_jax memory: peak RSS {j['peak_after_compile_mb']:.0f} MiB already at the end of compilation (no step "
          f"run yet); the compiled step's buffers (XLA buffer assignment: state in/out less donated, temporaries) "
          f"{j['step_buffers_mb']:.0f} MiB; resident after the timed steps {j['rss_after_steps_mb']:.0f} MiB")
    if args.gpu:
        peak = C.bf16_peak_tflops(j['device'])
        header = ('| GPU | kdiff_jax MFU | PyTorch MFU | MFU pipelined jax / torch | dense bf16 peak TFLOP/s '
                  '(data sheet) | bf16 matmul TFLOP/s jax / torch | GPU peak MiB jax / torch |')
        print('\n' + header + '\n|' + '---|' * (header.count('|') - 1))
        mfu_j, mfu_t = gf / j['time'] / 1e3 / peak, gf / t['time'] / 1e3 / peak
        mfu_pj, mfu_pt = gf / j['pipelined'] / 1e3 / peak, gf / t['pipelined'] / 1e3 / peak
        print(f"| {j['device']} / {t['device']} | {mfu_j:.1%} | {mfu_t:.1%} | {mfu_pj:.1%} / {mfu_pt:.1%} | "
              f"{peak:.0f} | {j['ceiling'] / 1e3:.0f} / {t['ceiling'] / 1e3:.0f} | {j['gpu_peak_mb']:.0f} / "
              f"{t['gpu_peak_mb']:.0f} |")
    if args.profile:
        for side in ('jax', 'torch'):
            kernels = Path(args.profile) / f'{side}_train_kernels.md'
            print('\n' + (kernels.read_text() if kernels.exists() else f'(no {kernels})'))
        print(f'\nprofiles, traces and the optimized HLO: {Path(args.profile).resolve()}')


if __name__ == '__main__':
    if not C.worker_main({'jax': jax_worker, 'torch': torch_worker, 'flops': flops_worker}):
        main()
