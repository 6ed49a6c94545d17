#!/usr/bin/env python3
"""The kernel gradient of one 3×3 convolution (NHWC, 'SAME'), XLA's own vs matmul reformulations vs PyTorch.

  .venv/bin/python bench/conv_kernel_grad.py [--batch 8] [--size 64] [--channels 128]
  XLA_FLAGS='--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_use_onednn=true' .venv/bin/python bench/conv_kernel_grad.py

∂L/∂W[i, j, c, o] = Σ_{n,h,w} x_pad[n, h+i, w+j, c] · dy[n, h, w, o]. XLA:CPU computes it as a convolution whose
window is the whole feature map; the variants below compute the same sum with matmuls. Each line: median wall time
of 7 calls, GFLOP/s, and the relative max difference from XLA's gradient. Written for bench/RESULTS.md (training-step
profile); every variant is hand-written here because the point is to compare formulations.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def timed(fn, *args, repeats=7):
    fn(*args)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--size', type=int, default=64)
    p.add_argument('--channels', type=int, default=128)
    args = p.parse_args()
    import jax
    import jax.numpy as jnp
    n, h, c = args.batch, args.size, args.channels
    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((n, h, h, c)).astype(np.float32)
    dy_np = rng.standard_normal((n, h, h, c)).astype(np.float32)
    x, dy = jnp.asarray(x_np), jnp.asarray(dy_np)
    w = jnp.zeros((3, 3, c, c), jnp.float32)
    flops = 2 * n * h * h * c * c * 9
    pad = lambda a: jnp.pad(a, ((0, 0), (1, 1), (1, 1), (0, 0)))
    shifts = [(i, j) for i in range(3) for j in range(3)]

    def xla(x, dy):
        conv = lambda w: jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
        return jax.vjp(conv, w)[1](dy)[0]

    def shifted_dots(x, dy):
        xp = pad(x)
        return jnp.stack([jax.lax.dot_general(xp[:, i:i + h, j:j + h], dy, (((0, 1, 2), (0, 1, 2)), ((), ())))
                          for i, j in shifts]).reshape(3, 3, c, c)

    def im2col(x, dy):
        xp = pad(x)
        cols = jnp.concatenate([xp[:, i:i + h, j:j + h] for i, j in shifts], -1)
        return jax.lax.dot_general(cols, dy, (((0, 1, 2), (0, 1, 2)), ((), ()))).reshape(3, 3, c, c)

    def k_chunked(x, dy, parts=8):
        xp, d = pad(x), dy.reshape(parts, -1, c)
        return jnp.stack([jax.lax.dot_general(xp[:, i:i + h, j:j + h].reshape(parts, -1, c), d,
                                              (((1,), (1,)), ((0,), (0,)))).sum(0)
                          for i, j in shifts]).reshape(3, 3, c, c)

    def channel_major_nn(x, dy):
        xt = jax.lax.optimization_barrier(jnp.pad(jnp.transpose(x, (3, 0, 1, 2)), ((0, 0), (0, 0), (1, 1), (1, 1))))
        cols = jax.lax.optimization_barrier(
            jnp.stack([xt[:, :, i:i + h, j:j + h] for i, j in shifts]).reshape(9 * c, -1))
        return (cols @ dy.reshape(-1, c)).reshape(3, 3, c, c)

    wp = h + 2  # padded row length

    def flat_rows_scan(x, dy):
        # Pad x by one pixel and dy by two on the bottom/right, so both share the row layout of a padded image, and
        # flatten (image, row, column) into one axis: tap (i, j) is then the contiguous row offset i·(w+2)+j, and
        # ∂L/∂W[i, j]ᵀ = dyᵀ[c, K] @ x_flat[s:s+K, c], an NN matmul (K = n·(h+2)·(w+2): ~6% zero rows).
        xf = jnp.pad(pad(x).reshape(-1, c), ((0, 2 * wp + 2), (0, 0)))
        dyt = jnp.pad(dy, ((0, 0), (0, 2), (0, 2), (0, 0))).reshape(-1, c).T
        offsets = jnp.array([i * wp + j for i, j in shifts])
        tap = lambda _, s: (None, dyt @ jax.lax.dynamic_slice_in_dim(xf, s, dyt.shape[1], axis=0))
        return jax.lax.scan(tap, None, offsets)[1].reshape(3, 3, c, c).transpose(0, 1, 3, 2)

    def column_taps_conv1d(x, dy):
        # For each column tap j, a 1-D convolution over rows whose features are (image, column): the window runs over
        # the h rows and the contraction reads n·w contiguous values, not the batch alone as XLA's own does.
        xt = pad(x).transpose(3, 1, 2, 0)  # [c, h+2, w+2, n]
        d = dy.transpose(1, 2, 0, 3).reshape(h, h * n, c)  # [h, w·n, c]
        conv1d = lambda lhs: jax.lax.conv_general_dilated(lhs, d, (1,), ((0, 0),),
                                                          dimension_numbers=('NWC', 'WIO', 'NWC'))
        return jnp.stack([conv1d(xt[:, :, j:j + h].reshape(c, h + 2, h * n)).transpose(1, 0, 2) for j in range(3)], 1)

    reference = None
    print(f'kernel gradient of a 3x3 conv {c}→{c} at {h}², batch {n} ({flops / 1e9:.1f} GFLOP); '
          f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}\n')
    print('| variant | ms | GFLOP/s | rel. diff |\n|---|---|---|---|')
    for name, fn in (('XLA (jax.vjp of the conv)', xla), ('9 shifted-slice dots', shifted_dots),
                     ('im2col + one dot', im2col), ('K-chunked batched dots', k_chunked),
                     ('channel-major im2col + NN matmul', channel_major_nn),
                     ('flattened-row taps, NN matmuls in a scan', flat_rows_scan),
                     ('column taps, 1-D convolutions over rows', column_taps_conv1d)):
        jitted = jax.jit(fn)
        out = np.asarray(jitted(x, dy))
        reference = out if reference is None else reference
        t = timed(lambda *a: jitted(*a).block_until_ready(), x, dy)
        diff = np.abs(out - reference).max() / np.abs(reference).max()
        print(f'| {name} | {t * 1e3:.1f} | {flops / t / 1e9:.0f} | {diff:.1e} |')
    cols = jnp.asarray(rng.standard_normal((9 * c, n * h * h)).astype(np.float32))
    mm = jax.jit(lambda a, b: a @ b)
    t = timed(lambda *a: mm(*a).block_until_ready(), cols, dy.reshape(-1, c))
    print(f'| (plain matmul of the same size, operands ready) | {t * 1e3:.1f} | {flops / t / 1e9:.0f} | |')
    conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    w = jnp.asarray(rng.standard_normal((3, 3, c, c)).astype(np.float32))
    input_grad = lambda w, dy: jax.vjp(lambda x: conv(x, w), x)[1](dy)[0]
    for name, fn, args in (('(the forward convolution, same FLOPs)', conv, (x, w)),
                           ('(its input gradient, same FLOPs)', input_grad, (w, dy))):
        jitted = jax.jit(fn)
        t = timed(lambda *a: jitted(*a).block_until_ready(), *args)
        print(f'| {name} | {t * 1e3:.1f} | {flops / t / 1e9:.0f} | |')

    import torch
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    tx = torch.from_numpy(x_np).permute(0, 3, 1, 2).contiguous()
    tdy = torch.from_numpy(dy_np).permute(0, 3, 1, 2).contiguous()
    tw = torch.zeros(c, c, 3, 3, requires_grad=True)

    y = torch.nn.functional.conv2d(tx, tw, padding=1)
    torch_grad = lambda: torch.autograd.grad(y, tw, tdy, retain_graph=True)[0]

    t = timed(torch_grad)
    ours = torch_grad().permute(2, 3, 1, 0).numpy()
    diff = np.abs(ours - reference).max() / np.abs(reference).max()
    print(f'| PyTorch (conv2d backward, weight gradient) | {t * 1e3:.1f} | {flops / t / 1e9:.0f} | {diff:.1e} |')


if __name__ == '__main__':
    main()
