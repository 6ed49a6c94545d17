"""Closed forms for Gaussian data: the exact denoiser, log-density and probability-flow ODE solution.

Data x0 ~ N(μ, s²·I) with a per-dimension mean μ and scale s (arrays broadcastable to one sample's shape, e.g.
[H, W, C], or scalars). Noised to level σ, x = x0 + σ·n with n ~ N(0, I), so

  p(x; σ) = N(x; μ, (s² + σ²)·I)                                  (independent per dimension)
  log p(x; σ) = Σ_i −½·log(2π·v_i) − (x_i − μ_i)² / (2·v_i),       v_i = s_i² + σ²
  ∇ log p(x; σ) = −(x − μ) / (s² + σ²)

and by Tweedie's formula the exact (MMSE) denoiser is

  D(x, σ) = x + σ²·∇ log p(x; σ) = μ + s² / (s² + σ²) · (x − μ).

The probability-flow ODE dx/dσ = (x − D(x, σ)) / σ = σ / (s² + σ²) · (x − μ) is linear in x − μ, and
d/dσ log(x − μ) = σ / (s² + σ²) integrates to ½·log(s² + σ²), so its exact solution from σ1 to σ2 is

  x(σ2) = μ + √((s² + σ2²) / (s² + σ1²)) · (x(σ1) − μ).

Its divergence (needed by the likelihood) is the trace of the diagonal Jacobian: div f(σ) = Σ_i σ / (s_i² + σ²).

These are the independent references of the sampler and likelihood tests: a sampler applied to `GaussianDenoiser`
integrates this ODE, and `log_likelihood` should return `log_prob`. Everything runs in float32 (the sampler policy).
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp

from kdiff_jax.denoisers import append_dims

__all__ = ['GaussianDenoiser', 'gaussian_denoise', 'gaussian_log_prob', 'gaussian_pf_ode_solution',
           'gaussian_pf_ode_divergence']


def _sigma_like(sigma, x):
    """σ as float32, with trailing axes added so that it broadcasts against x ([N] σ → [N, 1, 1, 1])."""
    sigma = jnp.asarray(sigma, jnp.float32)
    return append_dims(sigma, x.ndim) if sigma.ndim else sigma


def _per_sample_sum(x):
    return x.reshape(x.shape[0], -1).sum(axis=1)


def gaussian_denoise(x, sigma, mean, scale):
    """D(x, σ) = μ + s²/(s² + σ²)·(x − μ), the exact denoiser of N(μ, s²) data. σ is a scalar or [N]."""
    sigma = _sigma_like(sigma, x)
    s2 = jnp.square(jnp.asarray(scale, jnp.float32))
    return mean + s2 / (s2 + sigma ** 2) * (x - mean)


def gaussian_log_prob(x, sigma, mean, scale):
    """log N(x; μ, (s² + σ²)·I) summed over each sample's dimensions: shape [N], nats."""
    sigma = _sigma_like(sigma, x)
    var = jnp.square(jnp.asarray(scale, jnp.float32)) + sigma ** 2
    var = jnp.broadcast_to(var, x.shape)
    return _per_sample_sum(-0.5 * jnp.log(2 * math.pi * var) - jnp.square(x - mean) / (2 * var))


def gaussian_pf_ode_solution(x, sigma_from, sigma_to, mean, scale):
    """The exact probability-flow ODE solution x(σ_to) = μ + √((s² + σ_to²)/(s² + σ_from²))·(x(σ_from) − μ).

    Valid in both directions and at σ_to = 0 (the ODE solution is smooth there for Gaussian data).
    """
    s2 = jnp.square(jnp.asarray(scale, jnp.float32))
    sigma_from, sigma_to = _sigma_like(sigma_from, x), _sigma_like(sigma_to, x)
    return mean + jnp.sqrt((s2 + sigma_to ** 2) / (s2 + sigma_from ** 2)) * (x - mean)


def gaussian_pf_ode_divergence(sigma, scale, shape):
    """div_x f = Σ_i σ/(s_i² + σ²) of the vector field f = (x − D)/σ, for one sample of `shape` (a scalar)."""
    s2 = jnp.broadcast_to(jnp.square(jnp.asarray(scale, jnp.float32)), shape)
    return jnp.sum(sigma / (s2 + sigma ** 2))


class GaussianDenoiser(eqx.Module):
    """The exact denoiser of N(μ, s²·I) data, as a model: `denoiser(x, sigma, **extra_args) -> D(x, σ)`.

    `mean` (μ) and `scale` (s) broadcast against one sample (e.g. [H, W, C], or scalars). A stateless pytree, so it
    can be passed through `jax.jit`. Extra keyword arguments are accepted and ignored (the model convention).
    """

    mean: jax.Array
    scale: jax.Array

    def __init__(self, mean=0., scale=1.):
        self.mean = jnp.asarray(mean, jnp.float32)
        self.scale = jnp.asarray(scale, jnp.float32)

    def __call__(self, x, sigma, **extra_args):
        del extra_args
        return gaussian_denoise(x, sigma, self.mean, self.scale)

    def log_prob(self, x, sigma):
        """log p(x; σ) = log N(x; μ, (s² + σ²)·I) per sample, [N]."""
        return gaussian_log_prob(x, sigma, self.mean, self.scale)

    def pf_ode_solution(self, x, sigma_from, sigma_to):
        """x(σ_to) of the probability-flow ODE through x at σ_from (exact)."""
        return gaussian_pf_ode_solution(x, sigma_from, sigma_to, self.mean, self.scale)

    def divergence(self, sigma, shape):
        """div f at σ for one sample of `shape` (constant in x: the Jacobian is diagonal)."""
        return gaussian_pf_ode_divergence(sigma, self.scale, shape)

    def sample(self, key, shape, sigma=0.):
        """Draws from p(x; σ): μ + √(s² + σ²)·n, n ~ N(0, I) of `shape` ([N, ...])."""
        std = jnp.sqrt(jnp.square(self.scale) + jnp.square(jnp.asarray(sigma, jnp.float32)))
        return self.mean + std * jax.random.normal(key, shape, jnp.float32)
