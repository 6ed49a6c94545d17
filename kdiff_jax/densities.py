"""Training noise-level (σ) densities of k-diffusion (`k_diffusion/utils.py`, `config.make_sample_density`).

Each density is written as a transform of standard draws (n ~ N(0, 1), u ~ U(0, 1)), so that it can be checked
against k-diffusion on the very same draws, plus a sampler `rand_*(key, shape, ...)` that makes the draws:
  lognormal        σ = exp(loc + scale·n)
  loglogistic      σ = exp(loc + scale·logit(u')),  u' uniform on [F(min), F(max)], F the log-logistic CDF
  loguniform       σ = exp(ln min + u·(ln max − ln min))
  v-diffusion      σ = σd·tan(π/2·u'),  u' uniform on [2/π·atan(min/σd), 2/π·atan(max/σd)]
  split-lognormal  σ = exp(loc − scale_1·|n|) with probability scale_1/(scale_1+scale_2), else exp(loc + scale_2·|n|)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp


def log_normal_from(n, loc=0., scale=1.):
    return jnp.exp(n * scale + loc)


def _sigmoid(x: float) -> float:
    return 0.0 if x == -math.inf else 1.0 if x == math.inf else 1 / (1 + math.exp(-x))


def log_logistic_from(u, loc=0., scale=1., min_value=0., max_value=math.inf):
    log_or_inf = lambda v: math.log(v) if v > 0 else -math.inf
    min_cdf = _sigmoid((log_or_inf(min_value) - loc) / scale)
    max_cdf = _sigmoid((log_or_inf(max_value) - loc) / scale) if max_value < math.inf else 1.0
    u = u * (max_cdf - min_cdf) + min_cdf
    return jnp.exp(jax.scipy.special.logit(u) * scale + loc)


def log_uniform_from(u, min_value, max_value):
    lo, hi = math.log(min_value), math.log(max_value)
    return jnp.exp(u * (hi - lo) + lo)


def v_diffusion_from(u, sigma_data=1., min_value=0., max_value=math.inf):
    min_cdf = math.atan(min_value / sigma_data) * 2 / math.pi
    max_cdf = math.atan(max_value / sigma_data) * 2 / math.pi
    u = u * (max_cdf - min_cdf) + min_cdf
    return jnp.tan(u * math.pi / 2) * sigma_data


def split_log_normal_from(n, u, loc, scale_1, scale_2):
    n = jnp.abs(n)
    ratio = scale_1 / (scale_1 + scale_2)
    return jnp.exp(jnp.where(u < ratio, n * -scale_1 + loc, n * scale_2 + loc))


def rand_log_normal(key, shape, loc=0., scale=1.):
    return log_normal_from(jax.random.normal(key, shape), loc, scale)


def rand_log_logistic(key, shape, loc=0., scale=1., min_value=0., max_value=math.inf):
    return log_logistic_from(jax.random.uniform(key, shape), loc, scale, min_value, max_value)


def rand_log_uniform(key, shape, min_value, max_value):
    return log_uniform_from(jax.random.uniform(key, shape), min_value, max_value)


def rand_v_diffusion(key, shape, sigma_data=1., min_value=0., max_value=math.inf):
    return v_diffusion_from(jax.random.uniform(key, shape), sigma_data, min_value, max_value)


def rand_split_log_normal(key, shape, loc, scale_1, scale_2):
    key_n, key_u = jax.random.split(key)
    return split_log_normal_from(jax.random.normal(key_n, shape), jax.random.uniform(key_u, shape),
                                 loc, scale_1, scale_2)


def _first(cfg: Mapping, *names, default=None):
    """The value of the first of `names` present in `cfg` (k-diffusion accepts aliases such as mean/loc)."""
    for name in names:
        if name in cfg and cfg[name] is not None:
            return cfg[name]
    if default is None:
        raise KeyError(f'sigma_sample_density needs one of {names}')
    return default


def make_sample_density(model_config: Mapping) -> Callable[[jax.Array, tuple[int, ...]], jax.Array]:
    """The σ sampler `(key, shape) -> σ` for `config.model`, with k-diffusion's keys, aliases and defaults."""
    sd = model_config['sigma_sample_density']
    sigma_data = model_config['sigma_data']
    kind = sd['type']
    if kind == 'lognormal':
        return functools.partial(rand_log_normal, loc=_first(sd, 'mean', 'loc'), scale=_first(sd, 'std', 'scale'))
    if kind == 'loglogistic':
        return functools.partial(rand_log_logistic, loc=_first(sd, 'loc', default=math.log(sigma_data)),
                                 scale=_first(sd, 'scale', default=0.5),
                                 min_value=_first(sd, 'min_value', default=0.),
                                 max_value=_first(sd, 'max_value', default=math.inf))
    if kind == 'loguniform':
        return functools.partial(rand_log_uniform, min_value=_first(sd, 'min_value', default=model_config['sigma_min']),
                                 max_value=_first(sd, 'max_value', default=model_config['sigma_max']))
    if kind in ('v-diffusion', 'cosine'):
        return functools.partial(rand_v_diffusion, sigma_data=sigma_data,
                                 min_value=_first(sd, 'min_value', default=1e-3),
                                 max_value=_first(sd, 'max_value', default=1e3))
    if kind == 'split-lognormal':
        return functools.partial(rand_split_log_normal, loc=_first(sd, 'mean', 'loc'),
                                 scale_1=_first(sd, 'std_1', 'scale_1'), scale_2=_first(sd, 'std_2', 'scale_2'))
    raise ValueError(f'unknown sigma_sample_density type {kind!r}; expected one of lognormal, loglogistic, '
                     'loguniform, v-diffusion, cosine, split-lognormal')
