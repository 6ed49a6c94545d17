"""Look-ups by name and a compiled sampling driver.

    sigmas = get_sigmas('karras', 50, 0.01, 80.)
    x = initial_noise(sample_keys(seed, indices), (n, 64, 64, 3)) * sigmas[0]
    samples = sample(denoiser, x, sigmas, 'dpmpp_2m', seed=seed, indices=indices)

`sample` runs a sampler under `jax.jit` (`sampling_program`, with `compiler_options.cpu_compiler_options`): an NNX
module is split (`nnx.split`) into its graph definition (static) and its state (an argument), so the compiled
program is cached per (model structure, sampler, static options, shapes): a new seed, new weights of the same
shapes, or a new σ array of the same length reuse it. x may be sharded over a 1-D mesh along its batch axis
(`NamedSharding`); the result has x's sharding, and each sample's noise depends only
on (seed, its index), never on the batch size or the number of devices. (dpm_adaptive's samples still depend on
their batch: its step sizes follow the error of the whole batch, as in k-diffusion.)
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from ..compiler_options import cpu_compiler_options
from . import schedules
from .noise import sample_keys
from .samplers import SAMPLERS

SCHEDULES = {
    'karras': schedules.get_sigmas_karras,
    'exponential': schedules.get_sigmas_exponential,
    'polyexponential': schedules.get_sigmas_polyexponential,
    'vp': schedules.get_sigmas_vp,
}
# Samplers that take (sigma_min, sigma_max[, n]) instead of a σ array.
RANGE_SAMPLERS = ('dpm_fast', 'dpm_adaptive')


def sampler_names() -> list[str]:
    return list(SAMPLERS)


def _sampler_key(name: str) -> str:
    key = name[len('sample_'):] if name.startswith('sample_') else name
    if key not in SAMPLERS:
        raise ValueError(f'unknown sampler {name!r}; expected one of: {", ".join(SAMPLERS)} '
                         f'(with or without the "sample_" prefix)')
    return key


def get_sampler(name: str) -> Callable:
    """The sampler function for a k-diffusion name, e.g. 'dpmpp_2m' or 'sample_dpmpp_2m'."""
    return SAMPLERS[_sampler_key(name)]


def get_sigmas(schedule: str, n: int, sigma_min: float, sigma_max: float, rho: float | None = None):
    """n + 1 noise levels (ending in 0) of the named schedule: 'karras' (ρ default 7), 'exponential',
    'polyexponential' (ρ default 1) or 'vp' (its σ range is set by its β parameters, so σ_min/σ_max are ignored)."""
    if schedule not in SCHEDULES:
        raise ValueError(f'unknown schedule {schedule!r}; expected one of: {", ".join(SCHEDULES)}')
    if schedule == 'karras':
        return schedules.get_sigmas_karras(n, sigma_min, sigma_max, 7. if rho is None else rho)
    if schedule == 'polyexponential':
        return schedules.get_sigmas_polyexponential(n, sigma_min, sigma_max, 1. if rho is None else rho)
    if schedule == 'exponential':
        return schedules.get_sigmas_exponential(n, sigma_min, sigma_max)
    return schedules.get_sigmas_vp(n)


def _is_array(v) -> bool:
    return isinstance(v, (jax.Array, np.ndarray))


def _run(state, x, sigmas, seed, indices, extra_args, dynamic_kwargs, *, model_def, sampler, static_kwargs,
         callback):
    model = nnx.merge(model_def, state) if state is not None else model_def
    kwargs = {'key': sample_keys(seed, indices), **dict(static_kwargs), **dynamic_kwargs}
    fn = SAMPLERS[sampler]
    if sampler in RANGE_SAMPLERS:
        sigma_min = jnp.min(jnp.where(sigmas > 0, sigmas, jnp.inf))
        sigma_max = jnp.max(sigmas)
        if sampler == 'dpm_fast':
            return fn(model, x, sigma_min, sigma_max, sigmas.shape[0] - 1, extra_args=extra_args, callback=callback,
                      **kwargs)
        return fn(model, x, sigma_min, sigma_max, extra_args=extra_args, callback=callback, **kwargs)
    return fn(model, x, sigmas, extra_args=extra_args, callback=callback, **kwargs)


@functools.cache
def sampling_program() -> Callable:
    """The jitted sampling driver that `sample` calls (one jit, so its compilation cache is shared), compiled with
    `cpu_compiler_options()`: on XLA:CPU the model's convolutions run on Eigen rather than YNNPACK."""
    return jax.jit(_run, static_argnames=('model_def', 'sampler', 'static_kwargs', 'callback'),
                   compiler_options=cpu_compiler_options())


def _batch_sharding(x):
    """(batch sharding of a 1-D array, replicated sharding) matching x's NamedSharding, or (None, None)."""
    sharding = getattr(x, 'sharding', None)
    if not isinstance(sharding, NamedSharding):
        return None, None
    spec = tuple(sharding.spec) + (None,)
    return NamedSharding(sharding.mesh, P(spec[0])), NamedSharding(sharding.mesh, P())


def integer_seed(seed) -> int:
    """`seed` as an int in [0, 2**32); a float or a string is an error, not truncated."""
    try:
        seed = operator.index(seed)
    except TypeError:
        raise TypeError(f'seed must be an integer, got {seed!r}') from None
    if not 0 <= seed < 2 ** 32:
        raise ValueError(f'seed must be in [0, 2**32), got {seed}')
    return seed


def sample(denoiser, x, sigmas, sampler: str = 'dpmpp_2m', *, seed: int = 0, indices=None,
           extra_args: Mapping | None = None, callback: Callable | None = None, **sampler_kwargs):
    """Run `sampler` (a k-diffusion name) from x at sigmas[0] down the σ schedule `sigmas`, compiled.

    denoiser: an NNX module (split; its state is an argument) or any hashable callable model(x, sigma, **extra_args).
    seed, indices: sample n's randomness derives from fold_in(PRNGKey(seed), indices[n]) (noise.py); indices defaults
        to arange(N). Draw a large set in batches by passing each batch's slice of indices.
    sampler_kwargs: the sampler's own keyword arguments (eta, s_noise, s_churn, order, solver_type, noise_sampler,
        key, …): arrays are traced arguments, everything else is static (part of the compilation key).
    dpm_fast / dpm_adaptive take σ_min = the smallest positive σ and σ_max = the largest of `sigmas` (and, for
    dpm_fast, n = len(sigmas) − 1 model evaluations); their result is at σ_min, as k-diffusion's.
    Returns the samples (and the info dict for dpm_adaptive with return_info=True).
    """
    name = _sampler_key(sampler)
    seed = integer_seed(seed)
    x = jnp.asarray(x) if not isinstance(x, jax.Array) else x
    sigmas = jnp.asarray(sigmas, jnp.float32)
    indices = jnp.arange(x.shape[0], dtype=jnp.uint32) if indices is None else jnp.asarray(indices, jnp.uint32)
    if indices.shape != (x.shape[0],):
        raise ValueError(f'indices must have shape ({x.shape[0]},) (one per sample), got {indices.shape}')
    static = tuple(sorted((k, v) for k, v in sampler_kwargs.items() if not _is_array(v)))
    dynamic = {k: v for k, v in sampler_kwargs.items() if _is_array(v)}
    if isinstance(denoiser, nnx.Module):
        model_def, state = nnx.split(denoiser)
    else:
        model_def, state = denoiser, None
    seed = jnp.uint32(seed)
    batch, replicated = _batch_sharding(x)
    if batch is not None:
        indices = jax.device_put(indices, batch)
        state, sigmas, seed = jax.device_put((state, sigmas, seed), replicated)
    extra_args = {} if extra_args is None else dict(extra_args)
    return sampling_program()(state, x, sigmas, seed, indices, extra_args, dynamic, model_def=model_def, sampler=name,
                              static_kwargs=static, callback=callback)
