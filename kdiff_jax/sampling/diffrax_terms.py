"""The probability-flow ODE and the reverse-time SDE of a denoiser as diffrax terms, in time t = σ.

Karras et al. (2022), "Elucidating the design space…" (EDM), eq. (6), for a noise schedule σ(t) and the noised data
density p(x; σ):

  dx± = −σ̇(t)·σ(t)·∇ₓ log p(x; σ(t)) dt  ±  β(t)·σ(t)²·∇ₓ log p(x; σ(t)) dt  +  √(2β(t))·σ(t) dω_t .

Here σ(t) = t (σ̇ = 1, time is the noise level) and the score is ∇ₓ log p(x; σ) = (D(x, σ) − x)/σ² for the ideal
denoiser D. The first term alone is the probability-flow ODE

  dx/dσ = f(x, σ) = (x − D(x, σ)) / σ                                                      (PF-ODE)

(k-diffusion's `to_d`). Sampling runs it backwards, from σ_max down to σ_min (diffrax accepts t1 < t0).

The second and third terms are a Langevin diffusion that, for any β ≥ 0, leaves every marginal p(x; σ) unchanged.
Going backwards (dx₋, dσ < 0) with a Brownian motion W̄ whose increments have variance |dσ|, and writing EDM's rate
β(t) as β/σ — β dimensionless, the rate at which noise is replaced per unit of log σ — gives

  dx = (1 + β(σ))·(x − D(x, σ))/σ · dσ  +  √(2·β(σ)·σ) · dW̄                                (reverse SDE)

  (−βσ²∇log p dσ with β → β/σ is β·(x − D)/σ·dσ; √(2β/σ)·σ = √(2βσ); the noise variance per step is 2βσ·|dσ|,
  i.e. 2β·σ²·|d log σ|.)

β = 0 is the PF-ODE. β = 1 is the classical reverse-time SDE of Song et al. (2021) for the variance-exploding
process (g² = dσ²/dσ = 2σ: dx = 2(x − D)/σ dσ + √(2σ) dW̄); it is the continuous limit of k-diffusion's ancestral
samplers and of `sample_dpmpp_2m_sde` / `sample_dpmpp_sde` with eta = 1 (their eta is this β). Karras's churn γ per
step of length Δ(log σ) corresponds to β ≈ γ / Δ(log σ). β may be a constant or a function of σ.

The noise is diagonal and additive (it does not depend on x), so Itô and Stratonovich solutions coincide and any
diffrax SDE solver converges (Euler–Maruyama, Heun, …). The drift is singular at σ = 0: integrate to σ_min > 0 and
finish with one denoising step x ← D(x, σ_min), as k-diffusion's samplers do on their last step.

Extra model arguments (`extra_args` of the samplers) travel as diffrax's `args` (a dict, or None).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx

from kdiff_jax.sampling.noise import BROWNIAN_STREAM, as_sample_keys

__all__ = ['ProbabilityFlowField', 'probability_flow_term', 'ReverseSDEDrift', 'ReverseSDEDiffusion',
           'reverse_sde_terms', 'PerSampleBrownianPath', 'denoise_at']

Beta = float | Callable[[jax.Array], jax.Array]


def denoise_at(model: Callable, x, sigma, args: dict[str, Any] | None = None):
    """D(x, σ): `model(x, σ·1_N, **args)` with the scalar σ broadcast to the batch (float32, the σ policy)."""
    extra = {} if args is None else args
    sigma_n = jnp.full((x.shape[0],), sigma, dtype=jnp.float32)
    return model(x, sigma_n, **extra)


def _beta_at(beta: Beta, sigma):
    return beta(sigma) if callable(beta) else jnp.asarray(beta, jnp.float32)


class ProbabilityFlowField(eqx.Module):
    """The PF-ODE vector field f(σ, x) = (x − D(x, σ))/σ for a model `model(x, sigma, **extra_args)`.

    Called as diffrax calls a vector field: `field(t, y, args)` with t = σ (a scalar) and y = x ([N, H, W, C]).
    `denoised(t, y, args)` gives D itself. (The solvers of `diffrax_solvers` only see diffrax's public term interface
    and recover D = x − σ·f, which agrees with the scan samplers to ~1e-7.)
    """

    model: Callable

    def denoised(self, t, y, args):
        """D(y, σ = t)."""
        return denoise_at(self.model, y, t, args)

    def __call__(self, t, y, args):
        return (y - self.denoised(t, y, args)) / t


def probability_flow_term(model: Callable) -> diffrax.ODETerm:
    """`diffrax.ODETerm` of the PF-ODE dx/dσ = (x − D(x, σ))/σ; integrate with t0 = σ_max, t1 = σ_min (or 0 with the
    `diffrax_solvers` solvers, which take the last step to σ = 0 as x ← D(x, σ_last))."""
    return diffrax.ODETerm(ProbabilityFlowField(model))


class ReverseSDEDrift(eqx.Module):
    """Drift of the reverse SDE: (1 + β(σ))·(x − D(x, σ))/σ (per unit dσ)."""

    model: Callable
    beta: Beta = 1.

    def __call__(self, t, y, args):
        f = (y - denoise_at(self.model, y, t, args)) / t
        return (1 + _beta_at(self.beta, t)).astype(y.dtype) * f


class ReverseSDEDiffusion(eqx.Module):
    """Diffusion of the reverse SDE: the diagonal operator √(2·β(σ)·σ)·I (additive noise, independent of x)."""

    beta: Beta = 1.

    def __call__(self, t, y, args):
        g = jnp.sqrt(2 * _beta_at(self.beta, t) * jnp.abs(t)).astype(y.dtype)
        return lx.DiagonalLinearOperator(jnp.full_like(y, g))


class PerSampleBrownianPath(diffrax.AbstractBrownianPath):
    """A Brownian motion W(σ) on [σ_lo, σ_hi] shaped like a batch x, one independent path per sample.

    Sample n's path is a `diffrax.VirtualBrownianTree` keyed by fold_in(keys[n], BROWNIAN_STREAM) (the project's
    per-sample randomness, `noise.py`): it depends on the sample's key alone, not on the batch, and refining the σ
    grid refines the same path. Increments W(b) − W(a) ~ N(0, |b − a|) per element. Queries are clamped into
    [σ_lo, σ_hi] (one-ulp overshoots of recomputed σ values).
    """

    t0: jax.Array
    t1: jax.Array
    tol: jax.Array
    keys: jax.Array
    shape: tuple[int, ...] = eqx.field(static=True)
    levy_area: type = eqx.field(static=True, default=diffrax.BrownianIncrement)

    def __init__(self, key, x, sigma_min, sigma_max, tol=None):
        """`key`: an int seed, one PRNG key or per-sample keys (see `noise.as_sample_keys`); `x` gives the shape.
        `tol`: the tree's resolution in σ units (default (σ_max − σ_min)·2⁻²⁰); below it diffrax interpolates with
        the Brownian-bridge law, so it only has to be smaller than the solver's steps."""
        keys = as_sample_keys(key, x.shape[0])
        self.keys = jax.vmap(lambda k: jax.random.fold_in(k, BROWNIAN_STREAM))(keys)
        self.t0 = jnp.asarray(sigma_min, jnp.float32)
        self.t1 = jnp.asarray(sigma_max, jnp.float32)
        self.tol = (self.t1 - self.t0) * 2. ** -20 if tol is None else jnp.asarray(tol, jnp.float32)
        self.shape = tuple(x.shape)

    def evaluate(self, t0, t1=None, left: bool = True, use_levy: bool = False):
        del left
        if use_levy:
            raise ValueError('PerSampleBrownianPath only provides Brownian increments (levy_area=BrownianIncrement)')
        t0 = jnp.clip(t0, self.t0, self.t1)
        t1 = None if t1 is None else jnp.clip(t1, self.t0, self.t1)
        struct = jax.ShapeDtypeStruct(self.shape[1:], jnp.float32)

        def one(key):
            tree = diffrax.VirtualBrownianTree(self.t0, self.t1, self.tol, struct, key)
            return tree.evaluate(t0, t1)

        return jax.vmap(one)(self.keys)


def reverse_sde_terms(model: Callable, brownian: diffrax.AbstractBrownianPath, beta: Beta = 1.) -> diffrax.MultiTerm:
    """The reverse SDE dx = (1 + β)(x − D)/σ dσ + √(2βσ) dW̄ as MultiTerm(ODETerm(drift), ControlTerm(diffusion, W)).

    `brownian` is a Brownian path over (at least) [σ_min, σ_max] shaped like x, e.g.
    `PerSampleBrownianPath(key, x, sigma_min, sigma_max)`. β = 0 reduces to the PF-ODE (with a zero noise term).
    """
    return diffrax.MultiTerm(diffrax.ODETerm(ReverseSDEDrift(model, beta)),
                             diffrax.ControlTerm(ReverseSDEDiffusion(beta), brownian))
