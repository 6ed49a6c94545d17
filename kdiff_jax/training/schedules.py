"""Learning-rate and EMA-decay schedules of k-diffusion 0.0.15 (`utils.InverseLR`, `ExponentialLR`, `EMAWarmup`).

Written by hand: optax has no schedule with k-diffusion's exponential warmup factor. `t` counts optimizer updates
(gradient-accumulation micro-batches do not advance it), starting at 0 for the first update:
  warmup(t)     = 1 − warmup^(t+1)
  inverse       lr(t) = warmup(t)·max(min_lr, lr·(1 + t/inv_gamma)^−power)
  exponential   lr(t) = warmup(t)·max(min_lr, lr·decay^(t/num_steps))
  constant      lr(t) = lr
  EMA decay(t)  = clip(1 − (1 + t/inv_gamma)^−power, min_value, max_value)   (0 at t = 0: the EMA starts as a copy)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax.numpy as jnp


def _warmup(t, warmup: float):
    return 1 - warmup ** (t + 1)


def make_lr_schedule(sched_config: Mapping, lr: float) -> Callable:
    """An optax schedule `t -> lr(t)` for `config.lr_sched` with base learning rate `lr`."""
    kind = sched_config['type']
    if kind == 'constant':
        return lambda t: jnp.full((), lr, jnp.float32)
    warmup, min_lr = sched_config['warmup'], sched_config['min_lr']
    if kind == 'inverse':
        inv_gamma, power = sched_config['inv_gamma'], sched_config['power']
        return lambda t: _warmup(t, warmup) * jnp.maximum(min_lr, lr * (1 + t / inv_gamma) ** -power)
    if kind == 'exponential':
        num_steps, decay = sched_config['num_steps'], sched_config['decay']
        return lambda t: _warmup(t, warmup) * jnp.maximum(min_lr, lr * (decay ** (1 / num_steps)) ** t)
    raise ValueError(f'unknown lr_sched.type {kind!r}; expected constant, inverse or exponential')


def ema_decay(t, power: float, max_value: float, inv_gamma: float = 1., min_value: float = 0.):
    """EMA decay for the update after `t` previous EMA updates (k-diffusion's EMAWarmup.get_value)."""
    value = 1 - (1 + jnp.asarray(t, jnp.float32) / inv_gamma) ** -power
    return jnp.clip(value, min_value, max_value)
