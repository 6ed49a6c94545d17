"""Noise-level (σ) schedules, as k-diffusion names them.

Each `get_sigmas_*` returns n + 1 float32 values, from the largest σ down to a final 0 (the clean sample). The values
are computed on the host in float64 with numpy and rounded once to float32 (the precision policy in DESIGN.md), so
they equal k-diffusion's float32 torch schedules within float32 rounding. A schedule is an array, never a Python
constant inside a sampler: a new step count only changes an array's length.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np


def _check_n(n: int) -> int:
    if int(n) != n or n < 1:
        raise ValueError(f'the number of steps n must be an integer >= 1, got {n!r}')
    return int(n)


def _check_range(sigma_min: float, sigma_max: float, min_may_be_zero: bool = False):
    ok = (0 <= sigma_min < sigma_max) if min_may_be_zero else (0 < sigma_min < sigma_max)
    if not ok:
        lower = '0 <=' if min_may_be_zero else '0 <'
        raise ValueError(f'need {lower} sigma_min < sigma_max, got sigma_min={sigma_min!r}, sigma_max={sigma_max!r}')


def _finish(sigmas: np.ndarray):
    """float64 host values → float32 device array with a final 0 appended."""
    return jnp.asarray(np.append(sigmas, 0.).astype(np.float32))


def append_zero(x):
    """`x` with a 0 appended along its only axis."""
    x = jnp.asarray(x)
    return jnp.concatenate([x, jnp.zeros([1], x.dtype)])


def get_sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.):
    """Karras et al. (2022), eq. (5): σ_i = (σ_max^(1/ρ) + i/(n−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ, i = 0 … n−1.

    Uniform steps in σ^(1/ρ); ρ = 7 spends most steps at low noise. Then a final 0.
    """
    n = _check_n(n)
    _check_range(sigma_min, sigma_max, min_may_be_zero=True)
    ramp = np.linspace(0., 1., n)
    lo, hi = sigma_min ** (1. / rho), sigma_max ** (1. / rho)
    return _finish((hi + ramp * (lo - hi)) ** rho)


def get_sigmas_exponential(n: int, sigma_min: float, sigma_max: float):
    """Uniform steps in log σ: σ_i = exp(log σ_max + i/(n−1)·(log σ_min − log σ_max)). Then a final 0."""
    n = _check_n(n)
    _check_range(sigma_min, sigma_max)
    return _finish(np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n)))


def get_sigmas_polyexponential(n: int, sigma_min: float, sigma_max: float, rho: float = 1.):
    """Polynomial in log σ: σ_i = exp(r_i^ρ·(log σ_max − log σ_min) + log σ_min), r_i = 1 − i/(n−1). Then a final 0.

    ρ = 1 is the exponential schedule; larger ρ moves steps toward low noise.
    """
    n = _check_n(n)
    _check_range(sigma_min, sigma_max)
    ramp = np.linspace(1., 0., n) ** rho
    return _finish(np.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)))


def get_sigmas_vp(n: int, beta_d: float = 19.9, beta_min: float = 0.1, eps_s: float = 1e-3):
    """The continuous VP (variance-preserving) schedule of Song et al. (2021) in σ form.

    With t_i uniform from 1 down to eps_s: σ(t) = √(exp(β_d·t²/2 + β_min·t) − 1). Then a final 0.
    """
    n = _check_n(n)
    t = np.linspace(1., eps_s, n)
    return _finish(np.sqrt(np.expm1(beta_d * t ** 2 / 2 + beta_min * t)))
