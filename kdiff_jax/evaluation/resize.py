"""Image resizing exactly as `resize_right.resize(x, out_shape=..., pad_mode='reflect')`, which k-diffusion's FID
and KID feature extractors use to bring samples to the Inception input size.

Hand-written because no library does resize_right's resampling: its cubic kernel (Keys, a = −0.5) stretched by the
scale factor when downscaling (antialiasing), its own output→input coordinate map, weights renormalised to sum to 1
per output pixel, and *reflect* padding at the borders (`jax.image.resize` has the kernel and antialiasing but always
renormalises over the pixels inside the image instead of reflecting; torchvision/PIL differ in kernel or padding).

The resize is separable and linear, so each resized axis is one small [out, in] matrix, built in numpy at trace time
(shapes are static) and applied with one dot per axis: for every output index o along an axis of length n → m,
scale s = m / n,

    p(o)   = o / s + (n − 1) / 2 − (m − 1) / (2 s)             input coordinate of the output pixel centre
    k(d)   = cubic(d)                      (s ≥ 1)             support 4
           = s · cubic(s · d)              (s < 1, antialias)  support 4 / s
    taps   = ceil(p − support/2 − ε) + 0, 1, …, ceil(support − ε) − 1     (ε = float32 machine epsilon)
    W[o, reflect(t)] += k(p − t) / Σ_t k(p − t)

with reflect(t) mirroring out-of-range taps about the edge pixels without repeating them (−1 → 1, n → n − 2), as
`torch.nn.functional.pad(mode='reflect')` does. An axis whose length already equals the target is left alone, as
resize_right leaves an axis with scale factor 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np

_EPS = float(np.finfo(np.float32).eps)
_CUBIC_SUPPORT = 4.0


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = −0.5 (resize_right's `interp_methods.cubic`)."""
    ax = np.abs(x)
    ax2, ax3 = ax * ax, ax * ax * ax
    return ((1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1.0)
            + (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * ((ax > 1.0) & (ax <= 2.0)))


def _reflect(index: np.ndarray, size: int) -> np.ndarray:
    """Map indices outside [0, size) into it by mirroring about the edge pixels (the edge is not repeated)."""
    if size == 1:
        return np.zeros_like(index)
    period = 2 * (size - 1)
    index = np.mod(index, period)
    return np.where(index >= size, period - index, index)


@lru_cache(maxsize=64)
def resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """The [out_size, in_size] float32 matrix that resizes one axis as resize_right does (cubic, antialiased,
    reflect-padded); row o holds the weights of output pixel o.

    The coordinates and weights are computed in float32, operation by operation in resize_right's order (on torch
    tensors its grid is float32): in float64 the grid of a 512 → 299 resize moves by ~3e-5 px, enough to change
    outputs by ~6e-5, while this way the two agree to the rounding of the final weighted sums (~1e-6).
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f'resize sizes must be positive, got {in_size} -> {out_size}')
    f32 = np.float32
    scale = out_size / in_size
    if scale < 1.0:  # antialiasing: a low-pass filter as wide as the output pixel spacing
        support = _CUBIC_SUPPORT / scale
        kernel = lambda d: f32(scale) * _cubic(f32(scale) * d)
    else:
        support = _CUBIC_SUPPORT
        kernel = _cubic
    grid = np.arange(out_size, dtype=f32) / f32(scale) + f32((in_size - 1) / 2) - f32((out_size - 1) / (2 * scale))
    left = np.ceil(grid - f32(support / 2) - f32(_EPS)).astype(np.int64)
    taps = left[:, None] + np.arange(math.ceil(support - _EPS))
    pad = -int(taps[0, 0])  # resize_right shifts grid and taps by its left padding before taking differences
    distance = (grid + f32(pad))[:, None] - (taps + pad).astype(f32)
    weights = kernel(distance)
    total = weights.sum(1, keepdims=True, dtype=f32)
    weights = weights / np.where(total == 0, f32(1), total)
    matrix = np.zeros((out_size, in_size), np.float32)
    rows = np.broadcast_to(np.arange(out_size)[:, None], taps.shape)
    np.add.at(matrix, (rows, _reflect(taps, in_size)), weights)
    return matrix


def resize_to(images: jax.Array, size: Sequence[int] = (299, 299)) -> jax.Array:
    """Resize NHWC `images` to `size` = (height, width) like `resize_right.resize(x_nchw, out_shape=size,
    pad_mode='reflect')` (cubic, antialiased when downscaling). Returns float32; an axis already at its target size
    is not touched."""
    images = jnp.asarray(images)
    if images.ndim != 4:
        raise ValueError(f'resize_to expects NHWC images, got shape {images.shape}')
    out_h, out_w = (int(s) for s in size)
    x = images.astype(jnp.float32)
    in_h, in_w = x.shape[1], x.shape[2]
    hi = jax.lax.Precision.HIGHEST
    if in_h != out_h:
        x = jnp.einsum('oh,nhwc->nowc', jnp.asarray(resize_matrix(in_h, out_h)), x, precision=hi)
    if in_w != out_w:
        x = jnp.einsum('ow,nhwc->nhoc', jnp.asarray(resize_matrix(in_w, out_w)), x, precision=hi)
    return x
