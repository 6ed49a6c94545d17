"""Karras et al. (2022) preconditioned denoisers and their training losses, as k-diffusion defines them.

With σd = sigma_data:
  c_skip = σd² / (σ² + σd²),  c_out = σ·σd / √(σ² + σd²),  c_in = 1 / √(σ² + σd²)
  D(x, σ) = c_skip·x + c_out·F(c_in·x, σ)
Loss for clean x0, noise n, noised = x0 + σ·n and target = (x0 − c_skip·noised) / c_out:
  Denoiser:              mean over C,H,W of (F − target)²
  DenoiserWithVariance:  mean of ((F − target)² / exp(logvar) + logvar) / 2, logvar from the network
  SimpleLossDenoiser:    mean of (ε̂ − n)², ε̂ = (noised − D(noised, σ)) / σ
Preconditioning always runs in float32. Losses are per sample, shape [N].
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx


def append_dims(x, target_ndim: int):
    """Append trailing singleton axes to `x` until it has `target_ndim` axes."""
    if x.ndim > target_ndim:
        raise ValueError(f'input has {x.ndim} dims but target_ndim is {target_ndim}, which is less')
    return x.reshape(x.shape + (1,) * (target_ndim - x.ndim))


def to_d(x, sigma, denoised):
    """The probability-flow ODE derivative dx/dσ = (x − D(x, σ)) / σ."""
    return (x - denoised) / append_dims(sigma, x.ndim)


def _per_sample_mean(x):
    return x.reshape(x.shape[0], -1).mean(axis=1)


class Denoiser(nnx.Module):
    """D(x, σ) = c_skip·x + c_out·F(c_in·x, σ) around a network `inner_model` (e.g. the augment wrapper)."""

    def __init__(self, inner_model: nnx.Module, sigma_data: float = 1.):
        self.inner_model = inner_model
        self.sigma_data = float(sigma_data)

    def get_scalings(self, sigma):
        sd2 = self.sigma_data ** 2
        c_skip = sd2 / (sigma ** 2 + sd2)
        c_out = sigma * self.sigma_data / jnp.sqrt(sigma ** 2 + sd2)
        c_in = 1 / jnp.sqrt(sigma ** 2 + sd2)
        return c_skip, c_out, c_in

    def _scalings(self, x, sigma):
        sigma = jnp.asarray(sigma, jnp.float32)
        if sigma.ndim == 0:  # one σ for the whole batch, as k-diffusion accepts
            sigma = jnp.broadcast_to(sigma, x.shape[:1])
        return [append_dims(c, x.ndim) for c in self.get_scalings(sigma)]

    def _noised_and_target(self, x0, noise, sigma):
        c_skip, c_out, c_in = self._scalings(x0, sigma)
        noised = x0 + noise * append_dims(sigma, x0.ndim)
        return noised * c_in, (x0 - c_skip * noised) / c_out

    def __call__(self, x, sigma, **kwargs):
        c_skip, c_out, c_in = self._scalings(x, sigma)
        return self.inner_model(x * c_in, sigma, **kwargs) * c_out + x * c_skip

    def loss(self, x0, noise, sigma, **kwargs):
        model_input, target = self._noised_and_target(x0, noise, sigma)
        return _per_sample_mean(jnp.square(self.inner_model(model_input, sigma, **kwargs) - target))


class DenoiserWithVariance(Denoiser):
    """A Denoiser whose network also predicts a per-sample log-variance, learned by a Gaussian NLL."""

    def loss(self, x0, noise, sigma, **kwargs):
        model_input, target = self._noised_and_target(x0, noise, sigma)
        output, logvar = self.inner_model(model_input, sigma, return_variance=True, **kwargs)
        logvar = append_dims(logvar, output.ndim)
        return _per_sample_mean((jnp.square(output - target) / jnp.exp(logvar) + logvar) / 2)


class SimpleLossDenoiser(Denoiser):
    """L_simple (ε-prediction MSE) with the Karras preconditioner."""

    def loss(self, x0, noise, sigma, **kwargs):
        noised = x0 + noise * append_dims(sigma, x0.ndim)
        eps = to_d(noised, sigma, self(noised, sigma, **kwargs))
        return _per_sample_mean(jnp.square(eps - noise))
