"""Building blocks of k-diffusion's image U-Net, as Flax NNX modules in NHWC layout.

Every module mirrors the PyTorch module of k-diffusion 0.0.15 (`k_diffusion/layers.py`,
`k_diffusion/models/image_v1.py`) attribute for attribute, so a PyTorch state_dict key maps onto an NNX state path by
a plain rename (see `kdiff_jax.interop.torch_state`). Sequential containers keep PyTorch's indices: a
`Sequential`'s children live in `self.layers` (an `nnx.List`) and the name `layers` is dropped when mapping keys.

Precision policy: parameters are float32; convolutions and linear maps run in the compute `dtype`; group-norm
statistics, the AdaGN modulation, softmax and the noise embedding always run in float32.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from .dropout import Dropout
from .init import torch_default_init

Cond = dict[str, Any]

#: Drawn per call, not deferred (models/init.py): few parameters use it, and XLA:CPU hung running two of its vmapped
#: forms (random normal, then QR; batches of 16 at 256×768 and 256×256) in one program.
orthogonal_init = nnx.initializers.orthogonal()


class Buffer(nnx.Variable):
    """A fixed tensor stored in checkpoints but never trained (PyTorch's `register_buffer`)."""


def gelu(x):
    """GELU in its exact erf form, x·(1 + erf(x/√2))/2, as `torch.nn.GELU()` computes it (Flax's default is the tanh
    approximation). Written out rather than `jax.nn.gelu(approximate=False)`, which uses erfc(−x/√2): the same
    function, but XLA:CPU's erfc is ~3× slower than its erf (2.6× on the whole GELU, measured at 64²×128)."""
    return x * 0.5 * (1 + jax.lax.erf(x * math.sqrt(0.5)))


class GELU(nnx.Module):
    """Stateless module so that a `Sequential` keeps PyTorch's layer indices."""

    def __call__(self, x):
        return gelu(x)


class Identity(nnx.Module):
    def __call__(self, x):
        return x


class ConditionedModule(nnx.Module):
    """A module called as `module(x, cond)`; others in a `Sequential` are called as `module(x)`."""


def run_sequential(layers, x, cond: Cond):
    """Apply `layers` in order, passing `cond` to the conditioned ones (k-diffusion's ConditionedSequential)."""
    for layer in layers:
        x = layer(x, cond) if isinstance(layer, ConditionedModule) else layer(x)
    return x


class Conv1x1(nnx.Conv):
    """A 1×1 convolution (kernel [1, 1, c_in, c_out], as nnx.Conv's) computed as a matmul over the channel axis.

    The same function and parameters as nnx.Conv; XLA:CPU runs a matmul at 150-180 GFLOP/s at the U-Net's 1×1
    shapes where its 1×1 convolution reaches 60-120 (bench/RESULTS.md).
    """

    def __call__(self, inputs, out_sharding=None):
        kernel = self.kernel[...]
        bias = self.bias[...] if self.bias is not None else None
        inputs, kernel, bias = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
        y = jax.lax.dot_general(inputs, kernel[0, 0], (((inputs.ndim - 1,), (0,)), ((), ())),
                                precision=self.precision)
        return y if bias is None else y + bias


def conv(c_in, c_out, kernel_size, *, dtype, rngs, use_bias=True, kernel_init=torch_default_init):
    """A 2-D convolution with PyTorch's zero padding `kernel_size // 2`, NHWC, kernel HWIO (1×1: `Conv1x1`)."""
    pad = kernel_size // 2
    cls = Conv1x1 if kernel_size == 1 else nnx.Conv
    return cls(c_in, c_out, (kernel_size, kernel_size), padding=((pad, pad), (pad, pad)), use_bias=use_bias,
               kernel_init=kernel_init, dtype=dtype, rngs=rngs)


def dropout2d(rate: float, rngs: nnx.Rngs) -> Dropout:
    """`torch.nn.Dropout2d` for NHWC: whole channels are zeroed (mask shared over H and W), survivors scaled 1/(1-p)."""
    return Dropout(rate, broadcast_dims=(1, 2), rngs=rngs)


def _bcast(v):
    """[N, C] → [N, 1, 1, C], to broadcast over an NHWC tensor."""
    return v[:, None, None, :]


def _group_mean(per_channel, num_groups: int):
    """Each channel's group mean of a per-channel quantity [N, C] (groups are contiguous channel ranges)."""
    n, c = per_channel.shape
    return jnp.repeat(per_channel.reshape(n, num_groups, c // num_groups).mean(-1), c // num_groups, axis=1)


def _channel_stats(x, num_groups: int, eps: float):
    """x in float32, and each channel's group mean and 1/√(var + eps), both [N, C] (biased variance, two passes).

    Reduced over H and W per channel first, then over each group's channels, so every full-size pass of the training
    backward below keeps the channels innermost: on a [N, H·W, G, C/G] view, C/G (often 4) is innermost, which
    XLA:CPU vectorises poorly (bench/RESULTS.md, session 6).
    """
    xf = x.astype(jnp.float32)
    mean = _group_mean(xf.mean(axis=(1, 2)), num_groups)
    var = _group_mean(jnp.square(xf - _bcast(mean)).mean(axis=(1, 2)), num_groups)
    return xf, mean, jax.lax.rsqrt(var + eps)


def group_norm(x, num_groups: int, eps: float):
    """Group norm without affine, biased variance, statistics in float32 (`torch.nn.functional.group_norm`).

    Groups are contiguous channel ranges, as in PyTorch's NCHW layout. Statistics on a [N, H·W, G, C/G] view: for
    forward-only programs (sampling) XLA:CPU runs this ~5% faster than `_channel_stats` (cars64 forward, batch 8).
    """
    n, h, w, c = x.shape
    xg = x.astype(jnp.float32).reshape(n, h * w, num_groups, c // num_groups)
    mean = xg.mean(axis=(1, 3), keepdims=True)
    var = jnp.square(xg - mean).mean(axis=(1, 3), keepdims=True)
    return ((xg - mean) * jax.lax.rsqrt(var + eps)).reshape(n, h, w, c)


def _modulated_group_norm_fwd(x, scale, shift, num_groups: int, eps: float):
    xf, mean, rstd = _channel_stats(x, num_groups, eps)
    z = (xf - _bcast(mean)) * _bcast(rstd) * _bcast(1 + scale) + _bcast(shift)
    return z.astype(x.dtype), (x, mean, rstd, scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def modulated_group_norm(x, scale, shift, num_groups: int, eps: float):
    """z = GN(x)·(1 + scale) + shift, AdaGN's output: x [N, H, W, C], scale and shift float32 [N, C]; computed in
    float32, returned in x's dtype.

    Its gradient is written by hand, because autodiff of the two-pass statistics materialises x − μ, x̂ and several
    products, one full-size pass each. With x̂ = (x − μ)·r recomputed from x and the saved μ and r, per image and
    channel:
      ∂shift = Σ_hw ∂z,   ∂scale = Σ_hw ∂z·x̂,   ∂x = r·(∂z·(1 + scale) − m₁ − x̂·m₂),
    where m₁ and m₂ are the means of ∂z·(1 + scale) and ∂z·(1 + scale)·x̂ over each group's H·W·C/G elements; both
    follow from ∂shift and ∂scale per channel, so the backward is one reduction and one elementwise pass over x and
    ∂z. Reverse mode only (a `custom_vjp`): `AdaGN` uses it in training mode and `group_norm` otherwise, so forward-mode
    autodiff through an eval-mode model (the likelihood's JVPs) works. Tested against torch autograd in
    tests/test_model_parity.py.
    """
    return _modulated_group_norm_fwd(x, scale, shift, num_groups, eps)[0]


def _modulated_group_norm_bwd(num_groups: int, eps: float, residuals, dz):
    x, mean, rstd, scale = residuals
    _, h, w, _ = x.shape
    xhat = (x.astype(jnp.float32) - _bcast(mean)) * _bcast(rstd)
    dzf = dz.astype(jnp.float32)
    dshift = dzf.sum(axis=(1, 2))
    dscale = (dzf * xhat).sum(axis=(1, 2))
    gain = 1 + scale
    m1, m2 = (_group_mean(gain * d, num_groups) / (h * w) for d in (dshift, dscale))
    dx = _bcast(rstd) * (dzf * _bcast(gain) - _bcast(m1) - xhat * _bcast(m2))
    return dx.astype(x.dtype), dscale, dshift


modulated_group_norm.defvjp(_modulated_group_norm_fwd, _modulated_group_norm_bwd)


class AdaGN(ConditionedModule):
    """Adaptive group norm: y = GN(x)·(1 + scale) + shift, with [scale, shift] = Linear(cond[cond_key])."""

    def __init__(self, feats_in: int, c_out: int, num_groups: int, eps: float = 1e-5, cond_key: str = 'cond', *,
                 rngs: nnx.Rngs):
        self.num_groups = num_groups
        self.eps = eps
        self.cond_key = cond_key
        self.deterministic = False  # nnx's train()/eval() switch; see modulated_group_norm
        self.mapper = nnx.Linear(feats_in, c_out * 2, kernel_init=torch_default_init, rngs=rngs)

    def __call__(self, x, cond: Cond):
        # The mapper's matmul is split into [scale | shift] before its bias is added: the same numbers as splitting
        # mapper(cond), but XLA:CPU fuses all of this into the big normalize-modulate(-GELU) loop, and its loop
        # emitter vectorizes that loop only when the bias is added after the split (a slice of a sum inside the loop
        # defeats it: 2.3 ms → 0.2 ms at 64²×128, see bench/RESULTS.md).
        h = jax.lax.dot_general(cond[self.cond_key].astype(jnp.float32), self.mapper.kernel[...],
                                (((1,), (0,)), ((), ())), precision=self.mapper.precision)
        c = h.shape[-1] // 2
        bias = self.mapper.bias[...]
        scale, shift = h[:, :c] + bias[:c], h[:, c:] + bias[c:]
        if not self.deterministic:  # training: the hand-written backward
            return modulated_group_norm(x, scale, shift, self.num_groups, self.eps)
        y = group_norm(x, self.num_groups, self.eps)  # eval: plain ops, any autodiff mode
        return (y * (1 + scale[:, None, None, :]) + shift[:, None, None, :]).astype(x.dtype)


def attention(q, k, v, dropout: Dropout, bias=None):
    """Multi-head attention with k-diffusion's scaling: softmax((q·d^-¼)(k·d^-¼)ᵀ + bias) v.

    q: [N, Lq, H, D], k and v: [N, Lk, H, D]; logits and softmax in float32; `dropout` acts on the probabilities.
    """
    scale = q.shape[-1] ** -0.25
    logits = jnp.einsum('nqhd,nkhd->nhqk', q * scale, k * scale, preferred_element_type=jnp.float32)
    if bias is not None:
        logits = logits + bias
    probs = dropout(jax.nn.softmax(logits, axis=-1)).astype(v.dtype)
    return jnp.einsum('nhqk,nkhd->nqhd', probs, v)


class SelfAttention2d(ConditionedModule):
    """Self-attention over the H·W positions; qkv channels are laid out [q | k | v], each split into heads."""

    def __init__(self, c_in: int, n_head: int, norm_groups: int, feats_in: int, dropout_rate: float = 0., *,
                 dtype, rngs: nnx.Rngs):
        assert c_in % n_head == 0
        self.norm_in = AdaGN(feats_in, c_in, norm_groups, rngs=rngs)
        self.n_head = n_head
        self.qkv_proj = conv(c_in, c_in * 3, 1, dtype=dtype, rngs=rngs)
        self.out_proj = conv(c_in, c_in, 1, dtype=dtype, rngs=rngs)
        self.dropout = Dropout(dropout_rate, rngs=rngs)

    def __call__(self, x, cond: Cond):
        n, h, w, c = x.shape
        qkv = self.qkv_proj(self.norm_in(x, cond)).reshape(n, h * w, 3, self.n_head, c // self.n_head)
        y = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], self.dropout)
        return x + self.out_proj(y.reshape(n, h, w, c))


class CrossAttention2d(ConditionedModule):
    """Attention from image positions to a conditioning sequence `cond['cross']` [N, L, c_enc].

    Padded positions (`cond['cross_padding']`, 1 = padding) get -10000 added to their logits.
    """

    def __init__(self, c_dec: int, c_enc: int, n_head: int, norm_groups: int, feats_in: int,
                 dropout_rate: float = 0., cond_key: str = 'cross', cond_key_padding: str = 'cross_padding', *,
                 dtype, rngs: nnx.Rngs):
        assert c_dec % n_head == 0
        self.cond_key = cond_key
        self.cond_key_padding = cond_key_padding
        self.norm_enc = nnx.LayerNorm(c_enc, epsilon=1e-5, use_fast_variance=False, rngs=rngs)
        self.norm_dec = AdaGN(feats_in, c_dec, norm_groups, rngs=rngs)
        self.n_head = n_head
        self.q_proj = conv(c_dec, c_dec, 1, dtype=dtype, rngs=rngs)
        self.kv_proj = nnx.Linear(c_enc, c_dec * 2, kernel_init=torch_default_init, dtype=dtype, rngs=rngs)
        self.out_proj = conv(c_dec, c_dec, 1, dtype=dtype, rngs=rngs)
        self.dropout = Dropout(dropout_rate, rngs=rngs)

    def __call__(self, x, cond: Cond):
        n, h, w, c = x.shape
        d = c // self.n_head
        q = self.q_proj(self.norm_dec(x, cond)).reshape(n, h * w, self.n_head, d)
        enc = self.norm_enc(cond[self.cond_key].astype(jnp.float32))
        kv = self.kv_proj(enc).reshape(n, enc.shape[1], 2, self.n_head, d)
        bias = -10000. * cond[self.cond_key_padding].astype(jnp.float32)[:, None, None, :]
        y = attention(q, kv[:, :, 0], kv[:, :, 1], self.dropout, bias)
        return x + self.out_proj(y.reshape(n, h, w, c))


# Resampling. The 4-tap "linear" filter [1, 3, 3, 1]/8 of k-diffusion; the 2-D kernel is a saved buffer.
_LINEAR_TAPS = (1 / 8, 3 / 8, 3 / 8, 1 / 8)


def _weighted_sum(terms):
    """Σ w·x over (x, w) pairs, left to right (XLA fuses the whole sum into one elementwise loop)."""
    acc = None
    for x, w in terms:
        acc = x * w if acc is None else acc + x * w
    return acc


class Downsample2d(nnx.Module):
    """Anti-aliased 2× downsampling: reflect-pad 1, then the 4×4 filter applied to every channel, stride 2.

    PyTorch runs it as a dense c→c `conv2d` whose weight is the filter on the diagonal. The filter is k-diffusion's
    separable one, K = t·tᵀ (PyTorch checkpoints with another are refused: interop.load_state_dict), so here it
    runs as two 1-D passes, each a sum of 4 row (then column) slices times a tap: y[m] = Σ_{a,p ∈ {0,1}}
    t[2a + p]·x[2(m + a) + p], the rows paired by a free reshape. XLA:CPU runs a depthwise convolution as a slow
    generic one, and the 16 stride-2 slices of the 2-D filter have a slow backward (interior-padded scatters): the
    separable form takes half their time forward + backward (bench/RESULTS.md, session 7).
    The taps are read from the kernel: rows a = K·1/ΣK, columns b = 1ᵀK, so that a·bᵀ = K for any rank-1 K
    (exactly, for k-diffusion's, whose sums are exact in float32).
    """

    def __init__(self):
        self.kernel = Buffer(self.default_kernel())

    @staticmethod
    def default_kernel():
        taps = jnp.asarray(_LINEAR_TAPS, jnp.float32)
        return jnp.outer(taps, taps)

    def __call__(self, x):
        kernel = self.kernel[...].astype(x.dtype)
        if kernel.shape != (4, 4):
            raise ValueError(f'Downsample2d supports 4×4 filters, got {kernel.shape}')
        row_taps, col_taps = kernel.sum(1) / kernel.sum(), kernel.sum(0)
        n, h, w, c = x.shape[0], x.shape[1] // 2, x.shape[2] // 2, x.shape[3]
        x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode='reflect')[:, :2 * h + 2, :2 * w + 2]  # odd: as torch
        rows = x.reshape(n, h + 1, 2, 2 * w + 2, c)  # row 2i + p → [i, p]
        x = _weighted_sum((rows[:, a:a + h, p], row_taps[2 * a + p]) for a in range(2) for p in range(2))
        cols = x.reshape(n, h, w + 1, 2, c)
        return _weighted_sum((cols[:, :, a:a + w, p], col_taps[2 * a + p]) for a in range(2) for p in range(2))


class Upsample2d(nnx.Module):
    """2× upsampling: reflect-pad 1, then PyTorch's `conv_transpose2d(stride=2, padding=3)` with the 4×4 filter.

    In polyphase form: output pixel (2m + a, 2n + b) = Σ_{s,t ∈ {0,1}} x_pad[m + a + s, n + b + t] ·
    kernel[3 − a − 2s, 3 − b − 2t] (a transposed convolution adds x_pad[i]·kernel[k] to output i·2 + k − 3). The
    four phases are sums of shifted slices (one fused elementwise loop) interleaved by a reshape; XLA:CPU would run
    the equivalent input-dilated depthwise convolution as a slow generic convolution.
    """

    def __init__(self):
        self.kernel = Buffer(self.default_kernel())

    @staticmethod
    def default_kernel():
        taps = 2 * jnp.asarray(_LINEAR_TAPS, jnp.float32)
        return jnp.outer(taps, taps)

    def __call__(self, x):
        kernel = self.kernel[...].astype(x.dtype)
        if kernel.shape != (4, 4):
            raise ValueError(f'Upsample2d supports 4×4 filters, got {kernel.shape}')
        n, h, w, c = x.shape
        x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode='reflect')

        def phase(a, b):
            return _weighted_sum((x[:, a + s:a + s + h, b + t:b + t + w], kernel[3 - a - 2 * s, 3 - b - 2 * t])
                                 for s in range(2) for t in range(2))
        y = jnp.stack([jnp.stack([phase(a, b) for b in range(2)], axis=3) for a in range(2)], axis=2)
        return y.reshape(n, 2 * h, 2 * w, c)  # [n, h, a, w, b, c] → [n, 2h, 2w, c]


class FourierFeatures(nnx.Module):
    """Random Fourier features: f = 2π·x·Wᵀ, output [cos f, sin f]; W [out/2, in] ~ N(0, std²) is a saved buffer."""

    def __init__(self, in_features: int, out_features: int, std: float = 1., *, rngs: nnx.Rngs):
        assert out_features % 2 == 0
        self.weight = Buffer(jax.random.normal(rngs.params(), (out_features // 2, in_features)) * std)

    def __call__(self, x):
        f = 2 * math.pi * x.astype(jnp.float32) @ self.weight[...].T
        return jnp.concatenate([jnp.cos(f), jnp.sin(f)], axis=-1)
