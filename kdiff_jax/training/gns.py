"""The gradient noise scale (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training"), as k-diffusion's
`gns.GradientNoiseScale` estimates it.

With |G|² the squared norm of the true gradient and tr(Σ) the trace of the per-example gradient covariance, the
simple noise scale is B_simple = tr(Σ) / |G|² (the batch size at which gradient noise and signal balance). From the
squared norms of a small-batch gradient (size b, averaged over the small batches) and of the large-batch gradient
(size B, their mean), unbiased estimates are

  |G|²  ≈ (B·|g_B|² − b·|g_b|²) / (B − b),        tr(Σ) ≈ (|g_b|² − |g_B|²) / (1/b − 1/B),

each smoothed by an exponential moving average with decay β (0.9998), and B_simple = max(S, ε) / max(|G|², ε)
with S the smoothed tr(Σ). The state is a pytree of arrays so it lives in the jitted, checkpointed TrainState.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import struct

BETA = 0.9998
EPS = 1e-8


@struct.dataclass
class GNSState:
    ema_sq_norm: jax.Array    # EMA of the |G|² estimates (not debiased, as k-diffusion's)
    ema_var: jax.Array        # EMA of the tr(Σ) estimates
    beta_cumprod: jax.Array   # β^updates (for debiasing, as k-diffusion's get_stats)
    noise_scale: jax.Array    # the current B_simple (NaN before the first update)

    @classmethod
    def zeros(cls) -> GNSState:
        f = lambda v: jnp.asarray(v, jnp.float32)
        return cls(ema_sq_norm=f(0.), ema_var=f(0.), beta_cumprod=f(1.), noise_scale=f(jnp.nan))

    @classmethod
    def from_torch(cls, stats: Mapping) -> GNSState:
        """From k-diffusion's `GradientNoiseScale.state_dict()` (the `gns_stats` entry of its checkpoints)."""
        f = lambda k, default: jnp.asarray(float(stats.get(k, default)), jnp.float32)
        return cls(ema_sq_norm=f('ema_sq_norm', 0.), ema_var=f('ema_var', 0.), beta_cumprod=f('beta_cumprod', 1.),
                   noise_scale=f('gradient_noise_scale', float('nan')))


def gns_update(state: GNSState, sq_norm_small_batch, sq_norm_large_batch, n_small_batch, n_large_batch,
               beta: float = BETA, eps: float = EPS) -> GNSState:
    """One update with the mean squared norm of the small-batch gradients and the squared norm of their mean."""
    b, big = n_small_batch, n_large_batch
    est_sq_norm = (big * sq_norm_large_batch - b * sq_norm_small_batch) / (big - b)
    est_var = (sq_norm_small_batch - sq_norm_large_batch) / (1 / b - 1 / big)
    ema_sq_norm = beta * state.ema_sq_norm + (1 - beta) * est_sq_norm
    ema_var = beta * state.ema_var + (1 - beta) * est_var
    return GNSState(ema_sq_norm=ema_sq_norm, ema_var=ema_var, beta_cumprod=state.beta_cumprod * beta,
                    noise_scale=jnp.maximum(ema_var, eps) / jnp.maximum(ema_sq_norm, eps))


def grouped_value_and_grad(loss_fn, params, groups: int, batch, key):
    """(mean loss, mean gradient, |g_b|² averaged over groups, |g_B|²) of `loss_fn(params, batch, key) -> loss` over
    `groups` equal groups of the batch's rows (every array in `batch` is split on axis 0; group g uses
    fold_in(key, g)). With the batch sharded over `groups` devices each group's gradient is computed where its rows
    are and the mean is the all-reduce: the small/large batch pair of data-parallel training."""
    def split(a):
        if a is None:
            return None
        if a.shape[0] % groups:
            raise ValueError(f'batch of {a.shape[0]} does not split into {groups} gradient-noise-scale groups')
        return a.reshape(groups, a.shape[0] // groups, *a.shape[1:])

    grouped = jax.tree.map(split, batch)
    keys = jax.vmap(lambda g: jax.random.fold_in(key, g))(jnp.arange(groups))
    losses, grads = jax.vmap(jax.value_and_grad(loss_fn), in_axes=(None, 0, 0))(params, grouped, keys)
    mean_grad = jax.tree.map(lambda g: g.mean(0), grads)
    sq_small = sum(jnp.sum(g.astype(jnp.float32) ** 2) for g in jax.tree.leaves(grads)) / groups
    sq_large = sum(jnp.sum(g.astype(jnp.float32) ** 2) for g in jax.tree.leaves(mean_grad))
    return losses.mean(), mean_grad, sq_small, sq_large
