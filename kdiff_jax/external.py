"""Wrappers that turn other diffusion models into k-diffusion denoisers D(x, σ), as k-diffusion 0.0.15's `external.py`.

Every wrapper takes a JAX model `inner_model(x, t, **kwargs)` (x NHWC, t of shape [N]) that predicts either the noise
ε or the velocity v, and exposes `wrapper(x, sigma, **kwargs) -> denoised` and `wrapper.loss(x0, noise, sigma)`, so
the samplers and `log_likelihood` of `kdiff_jax.sampling` run on it unchanged.

Continuous v-objective models (v-diffusion), with σd = 1 and t ∈ [0, 1):
  σ = tan(πt/2),  t = (2/π)·atan(σ)
  c_skip = σd²/(σ²+σd²),  c_out = −σ·σd/√(σ²+σd²),  c_in = 1/√(σ²+σd²)
  D(x, σ) = c_skip·x + c_out·v(c_in·x, t(σ))

Discrete-time DDPM models with cumulative products ᾱ_0 … ᾱ_{T−1} are trained on x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε, which is
(x0 + σ_t·ε)·√ᾱ_t with σ_t = √((1−ᾱ_t)/ᾱ_t), and √ᾱ_t = 1/√(σ_t²+1) = c_in. A continuous σ is mapped to a
fractional timestep by interpolating linearly in log σ between table entries (`DiscreteSchedule`).
  ε-models:  D(x, σ) = x − σ·ε(c_in·x, t(σ))
  v-models:  as the continuous v-model above, with t(σ) from the table.

All wrappers are Flax NNX modules: the schedule tables are `Buffer`s (saved, never trained) and a wrapped NNX model is
a child module, so `nnx.split` / `nnx.jit` see its parameters. A wrapped plain function or plain object is static.
Preconditioning and the σ ↔ t maps run in float32; the tables are computed in float64 on the host, then stored in
float32.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdiff_jax.denoisers import append_dims
from kdiff_jax.models.layers import Buffer

__all__ = ['VDenoiser', 'DiscreteSchedule', 'DiscreteEpsDDPMDenoiser', 'OpenAIDenoiser', 'CompVisDenoiser',
           'DiscreteVDDPMDenoiser', 'CompVisVDenoiser', 'sigmas_from_alphas_cumprod']


def _append_zero(x):
    """x with a trailing 0 appended (k-diffusion's `append_zero`)."""
    return jnp.concatenate([x, jnp.zeros((1,), x.dtype)])


def _per_sample_mean(x):
    """Mean over every axis but the first: shape [N]."""
    return x.reshape(x.shape[0], -1).mean(axis=1)


def _f32(x):
    return jnp.asarray(x).astype(jnp.float32)


def _v_scalings(sigma, sigma_data: float):
    """(c_skip, c_out, c_in) of a v-objective model: σd²/(σ²+σd²), −σ·σd/√(σ²+σd²), 1/√(σ²+σd²)."""
    sd2 = sigma_data ** 2
    c_skip = sd2 / (sigma ** 2 + sd2)
    c_out = -sigma * sigma_data / jnp.sqrt(sigma ** 2 + sd2)
    c_in = 1 / jnp.sqrt(sigma ** 2 + sd2)
    return c_skip, c_out, c_in


def sigmas_from_alphas_cumprod(alphas_cumprod) -> np.ndarray:
    """σ_t = √((1 − ᾱ_t) / ᾱ_t) for each timestep, computed in float64 on the host.

    `alphas_cumprod` is anything `np.asarray` accepts (NumPy, a concrete JAX array, a CPU torch tensor); it must be
    1-D with at least two entries, each in (0, 1].
    """
    a = np.asarray(alphas_cumprod, dtype=np.float64)
    if a.ndim != 1 or a.shape[0] < 2:
        raise ValueError(f'alphas_cumprod must be 1-D with at least 2 entries, got shape {a.shape}')
    if not np.all((a > 0) & (a <= 1)):
        raise ValueError('alphas_cumprod must lie in (0, 1]; got values in '
                         f'[{a.min()}, {a.max()}]')
    return np.sqrt((1 - a) / a)


def _table(value):
    """The array inside a `Buffer`/`Variable` (a CompVis NNX model may hold `alphas_cumprod` as one), else `value`."""
    return value[...] if isinstance(value, nnx.Variable) else value


class VDenoiser(nnx.Module):
    """A continuous-time v-objective model (v-diffusion-pytorch style) as a denoiser, σd = 1.

    `inner_model(x, t, **kwargs)` predicts v at t = (2/π)·atan(σ); the wrapper returns
    D(x, σ) = c_skip·x + c_out·v(c_in·x, t) with the scalings of the module docstring.
    """

    def __init__(self, inner_model: Callable[..., Any]):
        self.inner_model = inner_model
        self.sigma_data = 1.

    def get_scalings(self, sigma):
        """(c_skip, c_out, c_in) for σ (float32, same shape as σ)."""
        return _v_scalings(_f32(sigma), self.sigma_data)

    def sigma_to_t(self, sigma):
        """t = (2/π)·atan(σ)."""
        return jnp.arctan(_f32(sigma)) * (2 / math.pi)

    def t_to_sigma(self, t):
        """σ = tan(πt/2)."""
        return jnp.tan(_f32(t) * (math.pi / 2))

    def loss(self, input, noise, sigma, **kwargs):
        """Per-sample MSE between v(c_in·(x0 + σn), t) and the target (x0 − c_skip·(x0 + σn)) / c_out; shape [N]."""
        c_skip, c_out, c_in = [append_dims(c, input.ndim) for c in self.get_scalings(sigma)]
        noised = input + noise * append_dims(_f32(sigma), input.ndim)
        output = self.inner_model(noised * c_in, self.sigma_to_t(sigma), **kwargs)
        target = (input - c_skip * noised) / c_out
        return _per_sample_mean(jnp.square(output - target))

    def __call__(self, input, sigma, **kwargs):
        c_skip, c_out, c_in = [append_dims(c, input.ndim) for c in self.get_scalings(sigma)]
        return self.inner_model(input * c_in, self.sigma_to_t(sigma), **kwargs) * c_out + input * c_skip


class DiscreteSchedule(nnx.Module):
    """A table of discrete noise levels σ_0 … σ_{T−1} (increasing with t) and the maps between σ and fractional t.

    `sigmas` and `log_sigmas` are float32 `Buffer`s; `quantize` (static) makes `sigma_to_t` return the nearest
    integer timestep instead of an interpolated one.
    """

    def __init__(self, sigmas, quantize: bool):
        sigmas64 = np.asarray(sigmas, dtype=np.float64)
        if sigmas64.ndim != 1 or sigmas64.shape[0] < 2:
            raise ValueError(f'sigmas must be 1-D with at least 2 entries, got shape {sigmas64.shape}')
        sigmas32 = jnp.asarray(sigmas64, jnp.float32)
        self.sigmas = Buffer(sigmas32)
        # log of the float32 table with the same op sigma_to_t applies to its input, so that a table entry maps to
        # exactly its own timestep.
        self.log_sigmas = Buffer(jnp.log(sigmas32))
        self.quantize = bool(quantize)

    @property
    def num_timesteps(self) -> int:
        return self.sigmas.shape[0]

    @property
    def sigma_min(self):
        """σ_0, the smallest noise level of the table."""
        return self.sigmas[0]

    @property
    def sigma_max(self):
        """σ_{T−1}, the largest noise level of the table."""
        return self.sigmas[-1]

    def get_sigmas(self, n: int | None = None):
        """A descending sampling schedule ending in 0, shape [n + 1].

        With n: σ(t) at n timesteps evenly spaced from T−1 down to 0 (fractional t interpolated by `t_to_sigma`).
        Without n: every table entry, from σ_{T−1} down to σ_0.
        n is a Python int (it sets the shape); the timesteps are spaced in float64 on the host, then the table is
        interpolated on device, so the call is traceable for a fixed n.
        """
        if n is None:
            return _append_zero(self.sigmas[...][::-1])
        if int(n) < 1:
            raise ValueError(f'get_sigmas: n must be >= 1, got {n}')
        t = jnp.asarray(np.linspace(self.num_timesteps - 1, 0, int(n)), jnp.float32)
        return _append_zero(self.t_to_sigma(t))

    def sigma_to_t(self, sigma, quantize: bool | None = None):
        """Fractional timestep for σ (any shape), float32; `quantize` overrides the module's setting.

        quantize: argmin_i |log σ − log σ_i| (the first such i on a tie).
        otherwise: with i = the last index with log σ_i ≤ log σ (0 when there is none), clipped to at most T−2,
          w = clip((log σ_i − log σ) / (log σ_i − log σ_{i+1}), 0, 1),  t = (1 − w)·i + w·(i + 1).
        So σ below σ_0 maps to 0 and σ above σ_{T−1} to T−1; σ = 0 maps to 0.
        """
        quantize = self.quantize if quantize is None else quantize
        sigma = _f32(sigma)
        shape = sigma.shape
        log_sigma = jnp.log(sigma.reshape(-1))
        log_sigmas = self.log_sigmas[...]
        dists = log_sigma[None, :] - log_sigmas[:, None]  # [T, M]
        if quantize:
            return jnp.argmin(jnp.abs(dists), axis=0).reshape(shape)
        steps = jnp.arange(log_sigmas.shape[0])[:, None]
        low_idx = jnp.max(jnp.where(dists >= 0, steps, 0), axis=0)
        low_idx = jnp.minimum(low_idx, log_sigmas.shape[0] - 2)
        high_idx = low_idx + 1
        low, high = log_sigmas[low_idx], log_sigmas[high_idx]
        w = jnp.clip((low - log_sigma) / (low - high), 0, 1)
        t = (1 - w) * low_idx + w * high_idx
        return t.reshape(shape)

    def t_to_sigma(self, t):
        """σ at fractional timestep t ∈ [0, T−1]: exp((1 − w)·log σ_⌊t⌋ + w·log σ_⌈t⌉), w = t − ⌊t⌋.

        Indices outside the table are clipped to its ends.
        """
        t = _f32(t)
        last = self.num_timesteps - 1
        low_idx = jnp.clip(jnp.floor(t), 0, last).astype(jnp.int32)
        high_idx = jnp.clip(jnp.ceil(t), 0, last).astype(jnp.int32)
        w = t - jnp.floor(t)
        log_sigmas = self.log_sigmas[...]
        return jnp.exp((1 - w) * log_sigmas[low_idx] + w * log_sigmas[high_idx])


class DiscreteEpsDDPMDenoiser(DiscreteSchedule):
    """A discrete-time DDPM model that predicts ε, as a denoiser: D(x, σ) = x − σ·ε(c_in·x, t(σ)).

    `model(x, t, **kwargs)` takes the DDPM-scaled input c_in·x = √ᾱ_t·x and a float timestep t of shape [N] (fractional
    unless `quantize`). σ_t = √((1 − ᾱ_t)/ᾱ_t) from `alphas_cumprod` (length T).
    """

    def __init__(self, model: Callable[..., Any], alphas_cumprod, quantize: bool):
        super().__init__(sigmas_from_alphas_cumprod(alphas_cumprod), quantize)
        self.inner_model = model
        self.sigma_data = 1.

    def get_scalings(self, sigma):
        """(c_out, c_in) = (−σ, 1/√(σ² + σd²))."""
        sigma = _f32(sigma)
        return -sigma, 1 / jnp.sqrt(sigma ** 2 + self.sigma_data ** 2)

    def get_eps(self, *args, **kwargs):
        """The wrapped model's ε prediction."""
        return self.inner_model(*args, **kwargs)

    def loss(self, input, noise, sigma, **kwargs):
        """Per-sample MSE between ε(c_in·(x0 + σn), t(σ)) and the noise n; shape [N]."""
        _, c_in = [append_dims(c, input.ndim) for c in self.get_scalings(sigma)]
        noised = input + noise * append_dims(_f32(sigma), input.ndim)
        eps = self.get_eps(noised * c_in, self.sigma_to_t(sigma), **kwargs)
        return _per_sample_mean(jnp.square(eps - noise))

    def __call__(self, input, sigma, **kwargs):
        c_out, c_in = [append_dims(c, input.ndim) for c in self.get_scalings(sigma)]
        eps = self.get_eps(input * c_in, self.sigma_to_t(sigma), **kwargs)
        return input + eps * c_out


class OpenAIDenoiser(DiscreteEpsDDPMDenoiser):
    """An OpenAI guided-/improved-diffusion model ported to JAX, as a denoiser.

    `model(x, t, **kwargs)` is the UNet (NHWC in, NHWC out). With `has_learned_sigmas` it outputs 2·C channels,
    [ε | variance interpolation], and only the first half of the channel (last) axis is used — like torch's
    `chunk(2, dim=1)[0]`, the first ⌈C_out/2⌉ channels. `diffusion` is the `GaussianDiffusion` object (or anything with
    an `alphas_cumprod` attribute) or the `alphas_cumprod` array itself.
    """

    def __init__(self, model: Callable[..., Any], diffusion, quantize: bool = False, has_learned_sigmas: bool = True):
        alphas_cumprod = getattr(diffusion, 'alphas_cumprod', diffusion)
        super().__init__(model, alphas_cumprod, quantize=quantize)
        self.has_learned_sigmas = bool(has_learned_sigmas)

    def get_eps(self, *args, **kwargs):
        output = self.inner_model(*args, **kwargs)
        if self.has_learned_sigmas:
            return output[..., :(output.shape[-1] + 1) // 2]
        return output


class CompVisDenoiser(DiscreteEpsDDPMDenoiser):
    """A CompVis latent-diffusion / Stable Diffusion ε-model ported to JAX, as a denoiser.

    `model` must have `model.alphas_cumprod` (length-T array) and `model.apply_model(x, t, cond)` returning ε for the
    NHWC input x and timesteps t [N]; the wrapper calls `apply_model(x, t, **kwargs)`, so pass the conditioning as
    `wrapper(x, sigma, cond=...)`. If `model` is an `nnx.Module` its parameters are part of the wrapper's state.
    """

    def __init__(self, model, quantize: bool = False):
        if not hasattr(model, 'apply_model') or not hasattr(model, 'alphas_cumprod'):
            raise TypeError(f'CompVisDenoiser needs an object with apply_model(x, t, cond) and alphas_cumprod; got '
                            f'{type(model).__name__}')
        super().__init__(model, _table(model.alphas_cumprod), quantize=quantize)

    def get_eps(self, *args, **kwargs):
        return self.inner_model.apply_model(*args, **kwargs)


class DiscreteVDDPMDenoiser(DiscreteSchedule):
    """A discrete-time DDPM model that predicts v, as a denoiser: D(x, σ) = c_skip·x + c_out·v(c_in·x, t(σ)).

    Scalings as the continuous v-model (σd = 1); `model(x, t, **kwargs)` with float t of shape [N]; σ_t from
    `alphas_cumprod` as for the ε-model.
    """

    def __init__(self, model: Callable[..., Any], alphas_cumprod, quantize: bool):
        super().__init__(sigmas_from_alphas_cumprod(alphas_cumprod), quantize)
        self.inner_model = model
        self.sigma_data = 1.

    def get_scalings(self, sigma):
        """(c_skip, c_out, c_in) = (σd²/(σ²+σd²), −σ·σd/√(σ²+σd²), 1/√(σ²+σd²))."""
        return _v_scalings(_f32(sigma), self.sigma_data)

    def get_v(self, *args, **kwargs):
        """The wrapped model's v prediction."""
        return self.inner_model(*args, **kwargs)

    def loss(self, input, noise, sigma, **kwargs):
        """Per-sample MSE between v(c_in·(x0 + σn), t(σ)) and (x0 − c_skip·(x0 + σn)) / c_out; shape [N]."""
        c_skip, c_out, c_in = [append_dims(c, input.ndim) for c in self.get_scalings(sigma)]
        noised = input + noise * append_dims(_f32(sigma), input.ndim)
        output = self.get_v(noised * c_in, self.sigma_to_t(sigma), **kwargs)
        target = (input - c_skip * noised) / c_out
        return _per_sample_mean(jnp.square(output - target))

    def __call__(self, input, sigma, **kwargs):
        c_skip, c_out, c_in = [append_dims(c, input.ndim) for c in self.get_scalings(sigma)]
        return self.get_v(input * c_in, self.sigma_to_t(sigma), **kwargs) * c_out + input * c_skip


class CompVisVDenoiser(DiscreteVDDPMDenoiser):
    """A CompVis-style v-model (e.g. Stable Diffusion 2 at 768 px) ported to JAX, as a denoiser.

    `model` must have `model.alphas_cumprod` and `model.apply_model(x, t, cond)` returning v. As in k-diffusion, only
    `cond` is passed on: call `wrapper(x, sigma, cond=...)`; other keyword arguments are ignored.
    """

    def __init__(self, model, quantize: bool = False):
        if not hasattr(model, 'apply_model') or not hasattr(model, 'alphas_cumprod'):
            raise TypeError(f'CompVisVDenoiser needs an object with apply_model(x, t, cond) and alphas_cumprod; got '
                            f'{type(model).__name__}')
        super().__init__(model, _table(model.alphas_cumprod), quantize=quantize)

    def get_v(self, x, t, cond, **kwargs):
        return self.inner_model.apply_model(x, t, cond)

