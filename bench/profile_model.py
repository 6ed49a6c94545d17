#!/usr/bin/env python3
"""Where the time of one compiled kdiff_jax forward (or train step) goes on XLA:CPU, by HLO operation kind.

  .venv/bin/python bench/profile_model.py [--config cars64] [--batch 1] [--what forward|train] [--top 25]

Runs the compiled program under `jax.profiler.trace` (XLA:CPU emits one trace event per executed thunk), reads
the trace back with `jax.profiler.ProfileData`, and sums event durations per thunk, classified by the HLO
instruction it runs (convolution, dot, fusion kind, copy, …) from the optimized HLO text. The per-thunk times are
wall times on the executing thread, so with two intra-op threads the total can exceed the step's wall time.
Set XLA_FLAGS in the environment to compare compiler settings.
"""

from __future__ import annotations

import argparse
import collections
import glob
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


CONV_FLOPS = {}


def classify(hlo_text: str) -> dict[str, str]:
    """instruction name → a short kind (for a fusion: its kind plus the main op inside)."""
    kinds = {}
    computations = C.hlo_computations(hlo_text)
    for lines in computations.values():
        for line in lines:
            m = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = (\S+?)(?:\{[^}]*\})? (\w[\w\-]*)\(', line)
            if not m:
                continue
            name, op = m.group(1), m.group(3)
            if op == 'fusion':
                kind = re.search(r'kind=(\w+)', line)
                calls = re.search(r'calls=%?([\w.\-]+)', line)
                inner = computations.get(calls.group(1), []) if calls else []
                body = ' '.join(inner)
                main = next((k for k in ('convolution', 'dot', 'reduce-window', 'reduce', 'exponential', 'erf',
                                          'transpose', 'concatenate', 'pad', 'slice') if f' {k}(' in body), 'eltwise')
                kinds[name] = f'fusion[{kind.group(1) if kind else "?"}:{main}]'
                conv = next((l for l in inner if ' convolution(' in l), None)
                if conv:  # describe it: 'k×k c_in→c_out at h×w', from the kernel parameter's and output's shapes
                    out = re.search(r'= f32\[(\d+),(\d+),(\d+),(\d+)\]', conv)
                    win = re.search(r'size=(\d+)x(\d+)', conv)
                    args_ = re.search(r'convolution\(%?([\w.\-]+), %?([\w.\-]+)\)', conv)
                    kshape = next((re.search(r'f32\[([\d,]+)\]', l).group(1) for l in inner
                                   if re.match(rf'\s*%?{re.escape(args_.group(2))} = ', l)), '') if args_ else ''
                    if out and win and kshape:
                        ci = int(kshape.split(',')[2])
                        n, h, w, co = map(int, out.groups())
                        kinds[name] = f'conv {win.group(1)}x{win.group(2)} {ci}→{co} at {h}²'
                        CONV_FLOPS[name] = 2 * n * h * w * co * ci * int(win.group(1)) * int(win.group(2))
            else:
                kinds[name] = op
    return kinds


def profile_torch(args):
    import numpy as np
    import torch
    from torch.profiler import ProfilerActivity, profile
    tmp = C.temp_dir()
    weights = C.write_weights(args.config, tmp / 'w.npz')
    config, inner, denoiser, K = C.torch_model(args.config, str(weights))
    m = config.model
    x = torch.from_numpy(np.random.default_rng(0).standard_normal(
        (args.batch, m.input_channels, *m.input_size)).astype(np.float32))
    if args.what == 'forward':
        torch.set_grad_enabled(False)
        denoiser.eval()
        fn = lambda: denoiser(x, torch.ones(args.batch))
    else:
        inner.train()
        opt = torch.optim.AdamW(inner.parameters(), lr=1e-4)
        aug = torch.zeros(args.batch, 9)

        def fn():
            loss = denoiser.loss(torch.tanh(x), torch.randn_like(x), torch.ones(args.batch), aug_cond=aug).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
    fn()
    walls = []
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.runs):
            t0 = time.perf_counter()
            fn()
            walls.append(time.perf_counter() - t0)
    print(f'PyTorch {args.what} {args.config} batch {args.batch}: wall {np.median(walls) * 1e3:.1f} ms per run '
          f'(median of {args.runs}, under the profiler), 1-min load {C.loadavg():.2f}\n')
    rows = [(e.key, e.self_cpu_time_total / 1e3 / args.runs, e.count // args.runs) for e in prof.key_averages()]
    total = sum(r[1] for r in rows)
    print('| aten op (self time) | ms/run | calls/run | share |\n|---|---|---|---|')
    for key, ms, n in sorted(rows, key=lambda r: -r[1])[:args.top]:
        print(f'| {key} | {ms:.1f} | {n} | {ms / total:.0%} |')


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument('--config', default='cars64')
    p.add_argument('--batch', type=int, default=1)
    p.add_argument('--what', choices=['forward', 'train'], default='forward')
    p.add_argument('--runs', type=int, default=3)
    p.add_argument('--top', type=int, default=25)
    p.add_argument('--side', choices=['jax', 'torch'], default='jax',
                   help='torch: the same model in PyTorch k-diffusion under torch.profiler, by aten op')
    p.add_argument('--kind', help='also list every thunk of this kind, e.g. "fusion[kLoop:erf]"')
    args = p.parse_args()
    if args.side == 'torch':
        return profile_torch(args)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    jax.config.update('jax_enable_compilation_cache', False)
    tmp = C.temp_dir()
    weights = C.write_weights(args.config, tmp / 'w.npz')
    config, model = C.jax_model(args.config, str(weights))
    m = config.model
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((args.batch, *m.input_size, m.input_channels)).astype(np.float32))
    if args.what == 'forward':
        from kdiff_jax.factory import make_denoiser
        graphdef, state = nnx.split(make_denoiser(config, model))
        fn = jax.jit(lambda state, x, s: nnx.merge(graphdef, state)(x, s))
        fargs = (state, x, jnp.ones((args.batch,), jnp.float32))
    else:  # the train step as train.py compiles it (sharding, donation, compiler options)
        fn, state, batch = C.jax_train_step(args.config, str(weights), 'float32',
                                            C.train_batch(args.config, args.batch))
        fargs = (state, batch)
    compiled = fn.lower(*fargs).compile()
    hlo = compiled.as_text()
    kinds = classify(hlo)
    shapes = {}
    for line in hlo.split('\nENTRY', 1)[-1].splitlines():
        mm = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ', line)
        if mm:
            part = re.search(r'"outer_dimension_partitions":\[([^\]]*)\]', line)
            shapes[mm.group(1)] = mm.group(2) + (f' parts[{part.group(1)}]' if part and part.group(1) else '')
    if args.what == 'train':
        run = C.step_runner(compiled, *fargs)
    else:
        def run():
            jax.block_until_ready(compiled(*fargs))
    run()
    walls = []
    trace_dir = tempfile.mkdtemp(prefix='kdiff_trace_')
    with jax.profiler.trace(trace_dir):
        for _ in range(args.runs):
            t0 = time.perf_counter()
            run()
            walls.append(time.perf_counter() - t0)
    path = glob.glob(f'{trace_dir}/**/*.xplane.pb', recursive=True)[0]
    data = jax.profiler.ProfileData.from_file(path)
    per_name = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            for ev in line.events:
                if ev.name in kinds:
                    per_name[ev.name] += ev.duration_ns / 1e6 / args.runs
    per_kind, kind_flops, kind_count = collections.Counter(), collections.Counter(), collections.Counter()
    for name, ms in per_name.items():
        per_kind[kinds[name]] += ms
        kind_flops[kinds[name]] += CONV_FLOPS.get(name, 0)
        kind_count[kinds[name]] += 1
    total = sum(per_kind.values())
    print(f'{args.what} {args.config} batch {args.batch}: wall {np.median(walls) * 1e3:.1f} ms per run (median of '
          f'{args.runs}), thunk time {total:.1f} ms, XLA_FLAGS={C.os.environ.get("XLA_FLAGS", "")!r}, '
          f'1-min load {C.loadavg():.2f}')
    mem = compiled.memory_analysis()
    if mem is not None:  # XLA's buffer assignment: what the compiled program needs besides its inputs
        mib = lambda b: f'{b / 2 ** 20:.0f} MiB'
        print(f'XLA memory: arguments {mib(mem.argument_size_in_bytes)}, outputs {mib(mem.output_size_in_bytes)}, '
              f'aliased {mib(mem.alias_size_in_bytes)}, temporaries {mib(mem.temp_size_in_bytes)}, '
              f'generated code {mib(mem.generated_code_size_in_bytes)}')
    print()
    print('| HLO kind (convolutions: kernel, channels, output size) | thunks | ms/run | share | GFLOP/s |\n'
          '|---|---|---|---|---|')
    for kind, ms in per_kind.most_common():
        gfs = f'{kind_flops[kind] / ms / 1e6:.0f}' if kind_flops[kind] else ''
        print(f'| {kind} | {kind_count[kind]} | {ms:.1f} | {ms / total:.0%} | {gfs} |')
    print(f'\ntop {args.top} thunks:\n\n| thunk | kind | output | ms/run |\n|---|---|---|---|')
    for name, ms in per_name.most_common(args.top):
        print(f'| {name} | {kinds[name]} | {shapes.get(name, "")} | {ms:.2f} |')
    if args.kind:
        print(f'\nthunks of kind {args.kind}:\n')
        for name, ms in per_name.most_common():
            if kinds[name] == args.kind:
                print(f'| {name} | {shapes.get(name, "")} | {ms:.2f} |')


if __name__ == '__main__':
    main()
