"""The samplers against the closed form of Gaussian data (kdiff_jax.gaussian), an independent reference.

Data x0 ~ N(μ, s²) per pixel: the exact denoiser is D(x, σ) = μ + s²/(s²+σ²)·(x − μ) and the probability-flow ODE
has the exact solution x(σ2) = μ + √((s²+σ2²)/(s²+σ1²))·(x(σ1) − μ).

Order of convergence. Each deterministic sampler integrates the ODE from σ_max = 80 to σ_min = 0.5 on a Karras
schedule (ρ = 7) whose final 0 is dropped, so the last step lands on σ_min and the reference is the exact x(σ_min).
(With the final 0 kept, every sampler's last step is x ← D(x, σ_min) — or, for LMS, an extrapolation of its
polynomial to 0 — a step whose error is fixed by σ_min and does not shrink with N; the exact reference would then be
D(x(σ_min), σ_min), not x(0); see test_diffrax_solvers.py.) The sampler and the exact map are both linear in
x − μ, so the error ratio is deterministic. With N and 2N steps, p = log2(e_N / e_2N) must be the theoretical order
within ±0.3. LMS(4) needs N = 64 to reach its asymptotic range (its startup steps are of order 1…3; measured
p = 3.8 at 64/128) and DPM-Solver++(2M) 64 (2.26 at 32/64, 2.15 at 64/128); the others are there at 32.

Stochastic samplers (dpmpp_sde, dpmpp_2m_sde, dpmpp_3m_sde — the last absent from k-diffusion 0.0.15, so this is its
check): started from x ~ N(μ, s² + σ_max²), they sample p(x; σ), and their final denoising step x ← D(x, σ_min)
returns N(μ, s⁴/(s²+σ_min²)). The standardised samples' mean and variance must match within sampling error. The
marginal alone cannot tell these samplers from their η = 0 (ODE) form, which maps N(μ, s² + σ_max²) to the same law.
The joint law with the starting point can: the exact reverse process leaves x(σ_min) = x0 + σ_min·ε' with x(σ_max) =
x0 + σ_max·ε (ε, ε' independent of x0 and of each other), so the output D(x(σ_min), σ_min) has correlation
s²/√((s²+σ_min²)(s²+σ_max²)) (≈ 0.006 here) with x(σ_max); the ODE's output has 1, and η = 0.5 gave 0.07 (the
multistep samplers) to 0.3 (dpmpp_sde).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdiff_jax.gaussian import GaussianDenoiser
from kdiff_jax.sampling import noise, samplers, schedules

SIGMA_MIN, SIGMA_MAX = 0.5, 80.
SHAPE = (2, 4, 4, 1)


def gaussian():
    mean = 0.3 * jax.random.normal(jax.random.PRNGKey(1), SHAPE[1:])
    scale = 0.3 + 0.4 * jax.random.uniform(jax.random.PRNGKey(2), SHAPE[1:])
    return GaussianDenoiser(mean, scale)


def start(g: GaussianDenoiser):
    """x at σ_max drawn from p(x; σ_max)."""
    return g.sample(jax.random.PRNGKey(0), SHAPE, SIGMA_MAX)


def observed_order(run, g, x, n: int) -> tuple[float, float, float]:
    """(p, e_N, e_2N) for `run(sigmas)` on Karras schedules of n and 2n steps ending at σ_min."""
    errors = []
    for steps in (n, 2 * n):
        sigmas = schedules.get_sigmas_karras(steps, SIGMA_MIN, SIGMA_MAX)[:-1]
        ref = g.pf_ode_solution(x, SIGMA_MAX, sigmas[-1])
        out = run(sigmas)
        errors.append(float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref - g.mean)))
    return math.log2(errors[0] / errors[1]), errors[0], errors[1]


def test_gaussian_closed_form_is_consistent():
    """The denoiser is Tweedie's formula for the log-density, and the ODE solution solves dx/dσ = (x − D)/σ."""
    g = gaussian()
    x, sigma = start(g) / 40, jnp.full((SHAPE[0],), 2.)
    score = jax.grad(lambda y: g.log_prob(y, sigma).sum())(x)
    np.testing.assert_allclose(g(x, sigma), x + 4. * score, rtol=1e-5, atol=1e-6)
    eps = 1e-2  # central difference of the solution in σ
    dx = (g.pf_ode_solution(x, 2., 2. + eps) - g.pf_ode_solution(x, 2., 2. - eps)) / (2 * eps)
    np.testing.assert_allclose(dx, (x - g(x, sigma)) / 2., rtol=1e-3, atol=1e-4)
    # The log-density integrates to 1 in one dimension (trapezoid over ±10 std).
    one = GaussianDenoiser(0.2, 0.5)
    grid = jnp.linspace(-6, 6, 4001).reshape(-1, 1, 1, 1)
    mass = jnp.trapezoid(jnp.exp(one.log_prob(grid, 0.3)), grid.ravel())
    assert abs(float(mass) - 1) < 1e-4


DETERMINISTIC = [
    ('euler', samplers.sample_euler, 1, 32),
    ('heun', samplers.sample_heun, 2, 32),
    ('dpm_2', samplers.sample_dpm_2, 2, 32),
    ('dpmpp_2m', samplers.sample_dpmpp_2m, 2, 64),
    ('lms', samplers.sample_lms, 4, 64),
]


@pytest.mark.parametrize('name,sampler,order,n', DETERMINISTIC, ids=[d[0] for d in DETERMINISTIC])
def test_deterministic_sampler_order(name, sampler, order, n):
    g = gaussian()
    x = start(g)
    p, e_n, e_2n = observed_order(lambda sigmas: sampler(g, x, sigmas), g, x, n)
    assert abs(p - order) <= 0.3, f'{name}: order {p:.2f} (errors {e_n:.3e} → {e_2n:.3e}), expected {order}'


def test_dpm_fast_order_3():
    """dpm_fast takes m = ⌊nfe/3⌋ + 1 steps uniform in log σ, of order 3 except the last: nfe = 3k + 2 makes the last
    one 2nd order (local error O(h³), same as the others), so nfe = 23 → 47 halves h and the error falls as h³."""
    g = gaussian()
    x = start(g)
    ref = g.pf_ode_solution(x, SIGMA_MAX, SIGMA_MIN)
    errors = [float(jnp.linalg.norm(samplers.sample_dpm_fast(g, x, SIGMA_MIN, SIGMA_MAX, nfe) - ref)
                    / jnp.linalg.norm(ref - g.mean)) for nfe in (23, 47)]
    p = math.log2(errors[0] / errors[1])
    assert abs(p - 3) <= 0.3, f'dpm_fast: order {p:.2f} (errors {errors})'


# --- stochastic samplers: the marginal law -------------------------------------------------------------------------

SDE_N = 4096
SDE_SIGMA_MIN, SDE_SIGMA_MAX = 0.05, 80.
SDE_STEPS = 64


def _sde_gaussian():
    mean = jnp.array([0.3, -0.2, 0.1, 0.5]).reshape(2, 2, 1)
    scale = jnp.array([0.2, 0.5, 0.8, 0.4]).reshape(2, 2, 1)
    return GaussianDenoiser(mean, scale)


def assert_reverse_process_correlation(out, x, scale, what: str):
    """The per-pixel correlation of the samples with their starting points, pooled over the pixels, is the exact
    reverse process's within 5 standard errors (1/√(samples·pixels) at correlations near 0; see the module doc)."""
    a, b = (np.asarray(v, np.float64).reshape(SDE_N, -1) for v in (out, x))
    a, b = a - a.mean(0), b - b.mean(0)
    measured = (a * b).sum(0) / np.sqrt((a * a).sum(0) * (b * b).sum(0))
    s2 = np.asarray(scale, np.float64).ravel() ** 2
    exact = s2 / np.sqrt((s2 + SDE_SIGMA_MIN ** 2) * (s2 + SDE_SIGMA_MAX ** 2))
    assert abs(np.mean(measured - exact)) < 5 / math.sqrt(a.size), f'{what}: correlations {measured} vs {exact}'


def assert_standard_normal(z, what: str):
    """Mean 0 and variance 1 of the pooled standardised values, within 5 standard errors (+2% variance bias for the
    discretisation at 64 steps)."""
    z = np.asarray(z, np.float64).ravel()
    n = z.size
    mean, var = z.mean(), z.var()
    assert abs(mean) < 5 / math.sqrt(n), f'{what}: mean {mean:.4f}'
    assert abs(var - 1) < 5 * math.sqrt(2 / n) + 0.02, f'{what}: variance {var:.4f}'


STOCHASTIC = [
    ('dpmpp_3m_sde', lambda g, x, s, k: samplers.sample_dpmpp_3m_sde(g, x, s, noise_sampler=k)),
    ('dpmpp_2m_sde', lambda g, x, s, k: samplers.sample_dpmpp_2m_sde(g, x, s, noise_sampler=k)),
    ('dpmpp_2m_sde_heun', lambda g, x, s, k: samplers.sample_dpmpp_2m_sde(g, x, s, noise_sampler=k,
                                                                          solver_type='heun')),
    ('dpmpp_sde', lambda g, x, s, k: samplers.sample_dpmpp_sde(g, x, s, key=k)),
]


@pytest.mark.parametrize('name,run', STOCHASTIC, ids=[s[0] for s in STOCHASTIC])
def test_sde_sampler_marginals_and_joint_law(name, run):
    """Samples of N(μ, s²) data, and their correlation with the starting noise. One draw per step for the multistep
    SDE samplers (independent normals are their Brownian increments in law; cheaper than 4096 trees); dpmpp_sde,
    whose two draws per step overlap, keeps its Brownian-tree default."""
    g = _sde_gaussian()
    keys = noise.sample_keys(7, jnp.arange(SDE_N))
    x = g.mean + jnp.sqrt(g.scale ** 2 + SDE_SIGMA_MAX ** 2) * noise.initial_noise(keys, (SDE_N, 2, 2, 1))
    sigmas = schedules.get_sigmas_karras(SDE_STEPS, SDE_SIGMA_MIN, SDE_SIGMA_MAX)
    source = keys if name == 'dpmpp_sde' else noise.default_noise_sampler(keys, x)
    out = run(g, x, sigmas, source)
    var_final = g.scale ** 4 / (g.scale ** 2 + SDE_SIGMA_MIN ** 2)  # of D(x, σ_min), x ~ N(μ, s² + σ_min²)
    assert_standard_normal((out - g.mean) / jnp.sqrt(var_final), name)
    assert_reverse_process_correlation(out, x, g.scale, name)

