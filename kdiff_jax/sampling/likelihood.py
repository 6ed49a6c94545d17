"""Exact log-likelihood of data under a denoiser's probability-flow ODE, integrated with diffrax on device.

The PF-ODE dx/dσ = f(x, σ) = (x − D(x, σ))/σ transports p(·; σ_min) to p(·; σ_max). Along a trajectory, the
instantaneous change of variables (Chen et al. 2018; Song et al. 2021) gives d/dσ log p(x(σ); σ) = −div f(x(σ), σ),
so for data x = x(σ_min):

  log p(x; σ_min) = log p(x(σ_max); σ_max) + ∫_{σ_min}^{σ_max} div f(x(σ), σ) dσ ,

with the prior p(·; σ_max) ≈ N(0, σ_max²·I) (the data are negligible next to σ_max). We integrate the augmented
state (x, ℓ), dℓ/dσ = div f, from σ_min to σ_max with `diffrax.Dopri5` and a `PIDController(rtol, atol)`, as
k-diffusion's `log_likelihood` does with torchdiffeq's dopri5, and return log N(x(σ_max); 0, σ_max²) + ℓ(σ_max)
per sample, in nats (summed over the sample's dimensions; divide by dims·log 2 for bits/dim).

Divergence:
  'rademacher' / 'gaussian'  Hutchinson's estimator div f ≈ (1/k)·Σ_j v_jᵀ·(∂f/∂x)·v_j with k probes v_j drawn
                             once per sample and fixed along the trajectory (k-diffusion: k = 1, Rademacher). Each
                             J·v is one forward-mode product (`jax.linearize` once per evaluation, then k JVPs).
                             E[v vᵀ] = I makes it unbiased; for a Rademacher probe the variance is
                             2·Σ_{i≠j} J_ij² — zero for a diagonal Jacobian, e.g. Gaussian data, where one probe is
                             exact up to the ODE error. Gaussian probes add 2·Σ_i J_ii² more (never exact).
  'exact'                    the trace Σ_i e_iᵀ·J·e_i with one JVP per dimension of a sample (all samples at once),
                             `exact_batch` of them vectorised at a time. Cost ∝ dims: for small inputs and tests.

The probes are drawn per sample (fold_in of the sample's key, `noise.as_sample_keys`), so a sample's estimate does
not depend on its batch. The model must act on each sample independently (as a denoiser in eval mode does): the
per-sample sums of vᵀJv then equal each sample's own estimate. Everything is traceable: wrap in `jax.jit` (the
string/int options static), with the batch sharded over devices if wanted.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp

from kdiff_jax.sampling.diffrax_terms import denoise_at
from kdiff_jax.sampling.noise import as_sample_keys

__all__ = ['log_likelihood', 'draw_probes', 'pf_ode_divergence']

PROBES = ('rademacher', 'gaussian', 'exact')


def _per_sample_sum(x):
    return x.reshape(x.shape[0], -1).sum(axis=1)


def draw_probes(key, x, n_probes: int = 1, probe: str = 'rademacher'):
    """Hutchinson probes [n_probes, *x.shape]: probe j of sample n from fold_in(k_n, j), k_n the sample's key.

    `key`: an int seed, one PRNG key or per-sample keys (see `noise.as_sample_keys`). Rademacher: ±1 with equal
    probability; Gaussian: N(0, 1).
    """
    if probe not in ('rademacher', 'gaussian'):
        raise ValueError(f"probe must be 'rademacher' or 'gaussian' to draw probes, got {probe!r}")
    keys = as_sample_keys(key, x.shape[0])
    shape, dtype = x.shape[1:], x.dtype

    def one(k, j):
        kj = jax.random.fold_in(k, j)
        if probe == 'rademacher':
            return jax.random.rademacher(kj, shape, dtype)
        return jax.random.normal(kj, shape, dtype)

    return jnp.stack([jax.vmap(lambda k: one(k, j))(keys) for j in range(n_probes)])


def pf_ode_divergence(f: Callable, x, probes=None, exact_batch: int = 64):
    """(f(x), div f(x)) per sample for f: [N, ...] → [N, ...] acting on each sample separately.

    With `probes` ([k, *x.shape]) the Hutchinson estimate (1/k)·Σ_j Σ_dims v_j·(J v_j); without, the exact trace
    Σ_i (J e_i)_i over a sample's dimensions, `exact_batch` basis directions per vectorised batch.
    """
    fx, jvp = jax.linearize(f, x)
    if probes is not None:
        jv = jax.vmap(jvp)(probes)
        return fx, jnp.mean(jax.vmap(_per_sample_sum)(probes * jv), axis=0)
    n, dims = x.shape[0], math.prod(x.shape[1:])

    def diagonal_entry(i):
        basis = jnp.zeros((dims,), x.dtype).at[i].set(1).reshape(x.shape[1:])
        tangent = jnp.broadcast_to(basis, x.shape)
        return jvp(tangent).reshape(n, dims)[:, i]

    entries = jax.lax.map(diagonal_entry, jnp.arange(dims), batch_size=min(exact_batch, dims))
    return fx, entries.sum(axis=0)


class _AugmentedField(eqx.Module):
    """d(x, ℓ)/dσ = (f(x, σ), div f(x, σ)) with f = (x − D(x, σ))/σ; probes None means the exact trace."""

    model: Callable
    probes: jax.Array | None
    exact_batch: int = eqx.field(static=True, default=64)

    def __call__(self, t, y, args):
        x, _ = y

        def f(x):
            return (x - denoise_at(self.model, x, t, args)) / t

        fx, div = pf_ode_divergence(f, x, self.probes, self.exact_batch)
        return fx, div


def _mixed_rms_norm(tree):
    """max over the leaves of each leaf's RMS (torchdiffeq's norm for a tuple state): x and ℓ count separately."""
    return jnp.max(jnp.stack([jnp.sqrt(jnp.mean(jnp.square(leaf))) for leaf in jax.tree.leaves(tree)]))


def log_likelihood(model: Callable, x, sigma_min, sigma_max, extra_args: dict[str, Any] | None = None,
                   atol: float = 1e-4, rtol: float = 1e-4, *, key=None, n_probes: int = 1,
                   probe: str = 'rademacher', probes=None, solver: diffrax.AbstractSolver | None = None,
                   max_steps: int = 4096, exact_batch: int = 64, throw: bool = False):
    """Per-sample log-likelihood (nats) of data x under the PF-ODE of `model`, and an info dict.

    Mirrors k-diffusion's `log_likelihood(model, x, sigma_min, sigma_max, extra_args, atol, rtol)` →
    (ll, {'fevals'}): ll = log N(x(σ_max); 0, σ_max²) + ∫_{σ_min}^{σ_max} div f dσ, integrated with Dopri5 (or
    `solver`) under PIDController(rtol, atol), the error of x and of ℓ normed separately and the worse one used
    (torchdiffeq's mixed norm).

    Divergence: `probe` = 'rademacher' (k-diffusion's) or 'gaussian' with `n_probes` Hutchinson probes drawn from
    `key` (an int seed, a PRNG key or per-sample keys), or 'exact' (the full trace, one JVP per dimension; no key).
    `probes` ([k, *x.shape] or [*x.shape]) supplies the probe vectors directly instead (then key is not needed).

    Returns (ll [N] float32, info) with info = {'steps', 'n_accept', 'n_reject', 'success'} (device values; solver
    steps, not model evaluations: Dopri5 makes 6 evaluations per step, each a forward pass plus k JVPs). With
    `throw=False` (default) a failed solve (max_steps reached) is reported by info['success'] instead of raising:
    diffrax's error check is a host callback, which also makes a batch-sharded result come back replicated.
    """
    if probe not in PROBES:
        raise ValueError(f'probe must be one of {PROBES}, got {probe!r}')
    try:  # k-diffusion's solver refuses these too; here a reversed or empty range would integrate to a wrong ll
        low, high = float(sigma_min), float(sigma_max)
    except TypeError:  # traced inside jit: not checked
        low = high = None
    if low is not None and not 0 < low < high:
        raise ValueError(f'need 0 < sigma_min < sigma_max, got sigma_min={low}, sigma_max={high}')
    x = jnp.asarray(x, jnp.float32)
    if probes is not None:
        probes = jnp.asarray(probes, x.dtype)
        probes = probes[None] if probes.shape == x.shape else probes
        if probes.shape[1:] != x.shape:
            raise ValueError(f'probes must have shape [k, *x.shape] = [k, {", ".join(map(str, x.shape))}], '
                             f'got {probes.shape}')
    elif probe != 'exact':
        if key is None:
            raise ValueError(f"log_likelihood with probe={probe!r} draws probes: pass key= (an int seed, a PRNG key "
                             f"or per-sample keys), probes=, or probe='exact'")
        if int(n_probes) != n_probes or n_probes < 1:
            raise ValueError(f'n_probes must be an integer >= 1, got {n_probes!r}')
        probes = draw_probes(key, x, int(n_probes), probe)
    sigma_min = jnp.asarray(sigma_min, jnp.float32)
    sigma_max = jnp.asarray(sigma_max, jnp.float32)
    solver = diffrax.Dopri5() if solver is None else solver
    term = diffrax.ODETerm(_AugmentedField(model, probes, exact_batch))
    controller = diffrax.PIDController(rtol=rtol, atol=atol, norm=_mixed_rms_norm)
    y0 = (x, jnp.zeros((x.shape[0],), jnp.float32))
    sol = diffrax.diffeqsolve(term, solver, t0=sigma_min, t1=sigma_max, dt0=None, y0=y0, args=extra_args,
                              stepsize_controller=controller, max_steps=max_steps,
                              saveat=diffrax.SaveAt(t1=True), throw=throw)
    latent, delta_ll = sol.ys[0][-1], sol.ys[1][-1]
    prior = _per_sample_sum(-0.5 * jnp.square(latent / sigma_max) - jnp.log(sigma_max) - 0.5 * math.log(2 * math.pi))
    stats = sol.stats
    info = {'steps': stats['num_steps'], 'n_accept': stats['num_accepted_steps'],
            'n_reject': stats['num_rejected_steps'], 'success': sol.result == diffrax.RESULTS.successful}
    return prior + delta_ll, info
