#!/usr/bin/env python3
"""Op-level timing of the cars64 U-Net's building blocks in isolation, XLA:CPU vs PyTorch (oneDNN), one process each.

  .venv/bin/python bench/profile_ops.py [--batch 1] [--repeats 20] [--ops conv3 conv1 gn ...] [--xla-flags "..."]

Each op runs at the shapes it has inside cars64 (skip_stages 1: 64² × 128, 32² × 256, 16² × 256, 8² × 256). The
XLA side runs in a subprocess with the given XLA_FLAGS (so several flag sets can be compared), the PyTorch side in
another. Prints ms per call (median) and GFLOP/s where the op has FLOPs worth counting.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (name, N-independent shape description): shapes at which each op occurs in cars64.
CONV3 = [(64, 128, 128), (64, 256, 128), (32, 256, 256), (32, 512, 256), (16, 256, 256), (8, 256, 256)]
CONV1 = [(64, 256, 128), (32, 512, 256), (16, 256, 768), (8, 256, 768), (16, 256, 256)]
GN = [(64, 128, 4), (64, 256, 8), (32, 256, 8), (32, 512, 16), (16, 256, 8), (8, 256, 8)]
ATTN = [(16, 256, 4), (8, 256, 4)]
RESAMPLE = [(64, 128), (32, 256), (16, 256)]


def timed(fn, repeats):
    fn()
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def run_jax(args):
    import jax
    import jax.numpy as jnp
    import numpy as np
    sys.path.insert(0, str(ROOT))
    from kdiff_jax.models import layers

    jax.config.update('jax_enable_compilation_cache', False)
    rng = np.random.default_rng(0)
    n = args.batch
    out = []

    def bench(name, fn, *arrays, flops=0.):
        f = jax.jit(fn)
        arrays = [jnp.asarray(a) for a in arrays]
        t = timed(lambda: f(*arrays).block_until_ready(), args.repeats)
        out.append((name, t, flops))

    for op in args.ops:
        if op == 'conv3':
            for hw, ci, co in CONV3:
                x = rng.standard_normal((n, hw, hw, ci), np.float32)
                w = rng.standard_normal((3, 3, ci, co), np.float32) * 0.05
                conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                                                 dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
                bench(f'conv3x3 {hw}² {ci}→{co}', conv, x, w, flops=2 * 9 * ci * co * hw * hw * n)
        elif op == 'conv3_im2col':
            for hw, ci, co in CONV3:
                x = rng.standard_normal((n, hw, hw, ci), np.float32)
                w = rng.standard_normal((3, 3, ci, co), np.float32) * 0.05

                def conv(x, w):
                    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
                    cols = jnp.concatenate([xp[:, i:i + hw, j:j + hw] for i in range(3) for j in range(3)], -1)
                    return jnp.einsum('nhwk,ko->nhwo', cols, w.reshape(-1, w.shape[-1]))
                bench(f'conv3x3 im2col {hw}² {ci}→{co}', conv, x, w, flops=2 * 9 * ci * co * hw * hw * n)
        elif op == 'conv3_taps':
            for hw, ci, co in CONV3:
                x = rng.standard_normal((n, hw, hw, ci), np.float32)
                w = rng.standard_normal((3, 3, ci, co), np.float32) * 0.05

                def conv(x, w):
                    # rows of the padded image flattened: tap (i, j) is a contiguous row range
                    wp = hw + 2
                    xp = jnp.pad(x, ((0, 0), (1, 2), (1, 1), (0, 0))).reshape(n, (hw + 3) * wp, -1)
                    acc = 0.
                    for i in range(3):
                        for j in range(3):
                            s = i * wp + j
                            acc = acc + jnp.einsum('npc,co->npo', xp[:, s:s + hw * wp], w[i, j])
                    return acc.reshape(n, hw, wp, -1)[:, :, :hw]
                bench(f'conv3x3 taps {hw}² {ci}→{co}', conv, x, w, flops=2 * 9 * ci * co * hw * hw * n)
        elif op == 'conv1':
            for hw, ci, co in CONV1:
                x = rng.standard_normal((n, hw, hw, ci), np.float32)
                w = rng.standard_normal((1, 1, ci, co), np.float32) * 0.05
                conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), ((0, 0), (0, 0)),
                                                                 dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
                bench(f'conv1x1 {hw}² {ci}→{co}', conv, x, w, flops=2 * ci * co * hw * hw * n)
                bench(f'conv1x1 as einsum {hw}² {ci}→{co}', lambda x, w: jnp.einsum('nhwc,co->nhwo', x, w[0, 0]),
                      x, w, flops=2 * ci * co * hw * hw * n)
        elif op == 'gn':
            for hw, c, g in GN:
                x = rng.standard_normal((n, hw, hw, c), np.float32)
                s = rng.standard_normal((n, c), np.float32)
                fn = lambda x, s: (layers.group_norm(x, g, 1e-5) * (1 + s[:, None, None]) + s[:, None, None])
                bench(f'adagn {hw}² c{c} g{g}', fn, x, s)
                fn2 = lambda x, s: layers.gelu(layers.group_norm(x, g, 1e-5) * (1 + s[:, None, None])
                                               + s[:, None, None])
                bench(f'adagn+gelu {hw}² c{c} g{g}', fn2, x, s)
        elif op == 'gelu':
            for hw, c, g in GN:
                x = rng.standard_normal((n, hw, hw, c), np.float32)
                bench(f'gelu {hw}² c{c}', layers.gelu, x)
        elif op == 'attn':
            for hw, c, h in ATTN:
                d = c // h
                q, k, v = (rng.standard_normal((n, hw * hw, h, d), np.float32) for _ in range(3))
                drop = layers.nnx.Dropout(0.)
                fl = 4 * n * h * (hw * hw) ** 2 * d
                bench(f'attention {hw}² c{c} h{h}', lambda q, k, v: layers.attention(q, k, v, drop), q, k, v,
                      flops=fl)
                sc = d ** -0.5
                bench(f'attention dpa {hw}² c{c} h{h}',
                      lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=sc), q, k, v, flops=fl)
        elif op == 'resample':
            for hw, c in RESAMPLE:
                x = rng.standard_normal((n, hw, hw, c), np.float32)
                down, up = layers.Downsample2d(), layers.Upsample2d()
                bench(f'downsample {hw}² c{c}', lambda x: down(x), x)
                x2 = rng.standard_normal((n, hw // 2, hw // 2, c), np.float32)
                bench(f'upsample {hw // 2}²→{hw}² c{c}', lambda x: up(x), x2)
        elif op == 'matmul':
            for m in (2048,):
                a = rng.standard_normal((m, m), np.float32)
                bench(f'matmul {m}²', lambda a: a @ a, a, flops=2 * m ** 3)
    return out


def run_torch(args):
    import numpy as np
    import torch
    import torch.nn.functional as F
    torch.set_grad_enabled(False)
    rng = np.random.default_rng(0)
    n = args.batch
    out = []

    def bench(name, fn, *arrays, flops=0.):
        arrays = [torch.from_numpy(a) for a in arrays]
        out.append((name, timed(lambda: fn(*arrays), args.repeats), flops))

    for op in args.ops:
        if op == 'conv3':
            for hw, ci, co in CONV3:
                x = rng.standard_normal((n, ci, hw, hw), np.float32)
                w = rng.standard_normal((co, ci, 3, 3), np.float32) * 0.05
                bench(f'conv3x3 {hw}² {ci}→{co}', lambda x, w: F.conv2d(x, w, padding=1), x, w,
                      flops=2 * 9 * ci * co * hw * hw * n)
        elif op == 'conv1':
            for hw, ci, co in CONV1:
                x = rng.standard_normal((n, ci, hw, hw), np.float32)
                w = rng.standard_normal((co, ci, 1, 1), np.float32) * 0.05
                bench(f'conv1x1 {hw}² {ci}→{co}', F.conv2d, x, w, flops=2 * ci * co * hw * hw * n)
        elif op == 'gn':
            for hw, c, g in GN:
                x = rng.standard_normal((n, c, hw, hw), np.float32)
                s = rng.standard_normal((n, c, 1, 1), np.float32)
                bench(f'adagn {hw}² c{c} g{g}', lambda x, s: torch.addcmul(s, F.group_norm(x, g), s + 1), x, s)
                bench(f'adagn+gelu {hw}² c{c} g{g}',
                      lambda x, s: F.gelu(torch.addcmul(s, F.group_norm(x, g), s + 1)), x, s)
        elif op == 'gelu':
            for hw, c, g in GN:
                x = rng.standard_normal((n, c, hw, hw), np.float32)
                bench(f'gelu {hw}² c{c}', F.gelu, x)
        elif op == 'attn':
            for hw, c, h in ATTN:
                d = c // h
                q, k, v = (rng.standard_normal((n, h, hw * hw, d), np.float32) for _ in range(3))
                fl = 4 * n * h * (hw * hw) ** 2 * d
                sc = d ** -0.25

                def attn(q, k, v):
                    att = ((q * sc) @ (k.transpose(2, 3) * sc)).softmax(3)
                    return (att @ v).transpose(1, 2).contiguous()
                bench(f'attention {hw}² c{c} h{h}', attn, q, k, v, flops=fl)
        elif op == 'resample':
            for hw, c in RESAMPLE:
                x = rng.standard_normal((n, c, hw, hw), np.float32)
                k1 = torch.tensor([1 / 8, 3 / 8, 3 / 8, 1 / 8])
                k2 = (k1[None] * k1[:, None])[None, None].expand(c, 1, 4, 4).contiguous()

                def down(x):
                    return F.conv2d(F.pad(x, (1,) * 4, 'reflect'), k2, stride=2, groups=c)

                def up(x):
                    return F.conv_transpose2d(F.pad(x, (1,) * 4, 'reflect'), k2 * 4, stride=2, padding=3, groups=c)
                bench(f'downsample {hw}² c{c}', down, x)
                x2 = rng.standard_normal((n, c, hw // 2, hw // 2), np.float32)
                bench(f'upsample {hw // 2}²→{hw}² c{c}', up, x2)
        elif op == 'matmul':
            a = rng.standard_normal((2048, 2048), np.float32)
            bench('matmul 2048²', lambda a: a @ a, a, flops=2 * 2048 ** 3)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument('--batch', type=int, default=1)
    p.add_argument('--repeats', type=int, default=20)
    p.add_argument('--ops', nargs='+', default=['conv3', 'conv1', 'gn', 'gelu', 'attn', 'resample', 'matmul'])
    p.add_argument('--xla-flags', action='append', default=None,
                   help='one XLA_FLAGS string per XLA column (repeatable); default: the environment\'s')
    p.add_argument('--no-torch', action='store_true')
    p.add_argument('--worker', choices=['jax', 'torch'])
    args = p.parse_args()
    if args.worker:
        res = run_jax(args) if args.worker == 'jax' else run_torch(args)
        print('RESULT ' + json.dumps(res))
        return
    base = [sys.executable, __file__, '--batch', str(args.batch), '--repeats', str(args.repeats), '--ops', *args.ops]
    columns = []
    for flags in (args.xla_flags or [os.environ.get('XLA_FLAGS', '')]):
        env = dict(os.environ, XLA_FLAGS=flags)
        r = subprocess.run(base + ['--worker', 'jax'], env=env, capture_output=True, text=True)
        if r.returncode:
            sys.exit(r.stderr[-3000:])
        columns.append((f'XLA [{flags or "default"}]', json.loads(r.stdout.split('RESULT ', 1)[1])))
    if not args.no_torch:
        r = subprocess.run(base + ['--worker', 'torch'], capture_output=True, text=True)
        if r.returncode:
            sys.exit(r.stderr[-3000:])
        columns.append(('PyTorch', json.loads(r.stdout.split('RESULT ', 1)[1])))
    load = open('/proc/loadavg').read().split()[0]
    print(f'batch {args.batch}, 1-min load after run {load}\n')
    names = list(dict.fromkeys(name for _, res in columns for name, _, _ in res))
    print('| op | ' + ' | '.join(c for c, _ in columns) + ' |')
    print('|---|' + '---|' * len(columns))
    for name in names:
        cells = []
        for _, res in columns:
            hit = [(t, f) for nm, t, f in res if nm == name]
            if not hit:
                cells.append('')
                continue
            t, f = hit[0]
            cells.append(f'{t * 1e3:.2f} ms' + (f' ({f / t / 1e9:.0f} GF/s)' if f else ''))
        print(f'| {name} | ' + ' | '.join(cells) + ' |')


if __name__ == '__main__':
    main()
