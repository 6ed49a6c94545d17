"""diffrax forms of the samplers (kdiff_jax.sampling.diffrax_solvers / diffrax_terms).

1. Each fixed-schedule diffrax solver equals the scan sampler of the same name (same model, same initial noise) on a
   small nonlinear denoiser (10 steps) and on the Gaussian closed form (50 steps): relative error ≤ 1e-5. (The scan
   samplers are checked against k-diffusion on the converted U-Net in test_sampler_parity.py.)
2. Against the Gaussian closed form: the theoretical order of convergence on a schedule ending at σ_min, and the same
   order with k-diffusion's final step to σ = 0 (reference D(x(σ_min), σ_min), which is exactly what Euler, Heun,
   DPM2 and DPM-Solver++ compute on that last step); integration forwards in σ too.
3. Adaptive sampling (Tsit5, Dopri5 + PID controller) reaches the exact solution within its tolerance.
4. The reverse SDE (β > 0) samples the right marginals; β = 0 is the PF-ODE.
"""

from __future__ import annotations

import math

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdiff_jax.gaussian import GaussianDenoiser
from kdiff_jax.sampling import samplers, schedules
from kdiff_jax.sampling.diffrax_solvers import (DPM2, LMS, DPMSolverPP2M, Euler, Heun, sample_diffrax,
                                                sample_ode_adaptive)
from kdiff_jax.sampling.diffrax_terms import PerSampleBrownianPath, probability_flow_term, reverse_sde_terms
from tests.parity import rel_err

SHAPE = (2, 4, 4, 1)
SIGMA_MIN, SIGMA_MAX = 0.5, 80.

PAIRS = [
    ('euler', Euler, samplers.sample_euler, 1, 32),
    ('heun', Heun, samplers.sample_heun, 2, 32),
    ('dpm_2', DPM2, samplers.sample_dpm_2, 2, 32),
    ('dpmpp_2m', DPMSolverPP2M, samplers.sample_dpmpp_2m, 2, 64),
    ('lms', LMS, samplers.sample_lms, 4, 64),
]
IDS = [p[0] for p in PAIRS]


def gaussian():
    mean = 0.3 * jax.random.normal(jax.random.PRNGKey(1), SHAPE[1:])
    scale = 0.3 + 0.4 * jax.random.uniform(jax.random.PRNGKey(2), SHAPE[1:])
    return GaussianDenoiser(mean, scale)


def start(g, shape=SHAPE):
    return g.sample(jax.random.PRNGKey(0), shape, SIGMA_MAX)


def rel(out, ref, centre=0.):
    return float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref - centre))


# --- 1. equal to the scan samplers ---------------------------------------------------------------------------------

def toy_denoiser(x, sigma):
    """A nonlinear, σ-dependent denoiser with Karras preconditioning (σ_d = 0.5) around a tiny network that mixes
    channels and neighbouring pixels: cheap to compile, and nothing about it is linear like the Gaussian."""
    sd = 0.5
    sigma = sigma.reshape(-1, 1, 1, 1)
    c_skip, c_out, c_in = sd ** 2 / (sigma ** 2 + sd ** 2), sigma * sd / jnp.sqrt(sigma ** 2 + sd ** 2), \
        1 / jnp.sqrt(sigma ** 2 + sd ** 2)
    w = jnp.array([[0.9, -0.4, 0.2], [0.3, 0.8, -0.5], [-0.2, 0.4, 1.1]])
    h = c_in * x
    inner = jnp.tanh(h @ w + 0.3 * jnp.roll(h, 1, axis=1) - 0.2 * jnp.roll(h, -1, axis=2)) * (1 + 0.1 * jnp.log(sigma))
    return c_skip * x + c_out * inner


@pytest.mark.parametrize('name,solver,scan,order,n', PAIRS, ids=IDS)
def test_equals_scan_sampler_on_nonlinear_model(name, solver, scan, order, n):
    x = 80. * jax.random.normal(jax.random.PRNGKey(3), (2, 8, 8, 3))
    sigmas = schedules.get_sigmas_karras(10, 0.01, 80.)
    ours = sample_diffrax(toy_denoiser, x, sigmas, solver=solver())
    assert rel_err(ours, scan(toy_denoiser, x, sigmas)) <= 1e-5


@pytest.mark.parametrize('name,solver,scan,order,n', PAIRS, ids=IDS)
def test_equals_scan_sampler_on_gaussian(name, solver, scan, order, n):
    g = gaussian()
    x = start(g)
    sigmas = schedules.get_sigmas_karras(50, 0.01, 80.)
    assert rel_err(sample_diffrax(g, x, sigmas, solver=solver()), scan(g, x, sigmas)) <= 1e-5


def test_diffeqsolve_directly_and_callback():
    """The documented diffeqsolve call, and the callback: k-diffusion's n calls with x and D(x, σ_i) at σ_0…σ_{n−1}."""
    g = gaussian()
    x = start(g)
    sigmas = schedules.get_sigmas_karras(6, 0.1, 80.)
    sol = diffrax.diffeqsolve(probability_flow_term(g), DPMSolverPP2M(), t0=sigmas[0], t1=sigmas[-1], dt0=None,
                              y0=x, stepsize_controller=diffrax.StepTo(ts=sigmas), max_steps=16)
    ref = samplers.sample_dpmpp_2m(g, x, sigmas)
    assert rel_err(sol.ys[-1], ref) <= 1e-5
    ours, theirs = [], []
    out = sample_diffrax(g, x, sigmas, solver=DPMSolverPP2M(), callback=ours.append)
    samplers.sample_dpmpp_2m(g, x, sigmas, callback=theirs.append)
    assert rel_err(out, ref) <= 1e-5
    assert [c['i'] for c in ours] == [c['i'] for c in theirs] == list(range(6))
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(float(a['sigma']), float(b['sigma']), rtol=1e-6)
        assert rel_err(a['x'], b['x']) <= 1e-5 and rel_err(a['denoised'], b['denoised']) <= 1e-5


def test_lms_order_argument():
    g = gaussian()
    x = start(g)
    sigmas = schedules.get_sigmas_karras(12, 0.1, 80.)
    assert rel_err(sample_diffrax(g, x, sigmas, solver=LMS(2)), samplers.sample_lms(g, x, sigmas, order=2)) <= 1e-5
    with pytest.raises(ValueError, match='LMS order'):
        LMS(5)


# --- 2. order of convergence on the closed form --------------------------------------------------------------------

def observed_order(g, x, solver, n, to_zero: bool):
    """log2(e_n / e_2n) on Karras schedules σ_max → σ_min (then → 0 if `to_zero`)."""
    errors = []
    for steps in (n, 2 * n):
        sigmas = schedules.get_sigmas_karras(steps, SIGMA_MIN, SIGMA_MAX)
        x_min = g.pf_ode_solution(x, SIGMA_MAX, SIGMA_MIN)
        if to_zero:
            ref = g(x_min, jnp.full((x.shape[0],), SIGMA_MIN))
        else:
            sigmas, ref = sigmas[:-1], x_min
        errors.append(rel(sample_diffrax(g, x, sigmas, solver=solver), ref, g.mean))
    return math.log2(errors[0] / errors[1]), errors


@pytest.mark.parametrize('name,solver,scan,order,n', PAIRS, ids=IDS)
def test_order_of_convergence(name, solver, scan, order, n):
    g = gaussian()
    x = start(g)
    p, errors = observed_order(g, x, solver(), n, to_zero=False)
    assert abs(p - order) <= 0.3, f'{name}: order {p:.2f}, errors {errors}'
    if name != 'lms':  # LMS's last step to 0 extrapolates its polynomial instead of denoising
        p, errors = observed_order(g, x, solver(), n, to_zero=True)
        assert abs(p - order) <= 0.3, f'{name} (to 0): order {p:.2f}, errors {errors}'


@pytest.mark.parametrize('solver', [Heun(), DPMSolverPP2M()], ids=['heun', 'dpmpp_2m'])
def test_forward_integration(solver):
    """σ increasing (encoding data into noise): the solvers read the direction from diffrax's terms."""
    g = gaussian()
    x = g.sample(jax.random.PRNGKey(4), SHAPE, SIGMA_MIN)
    sigmas = jnp.flip(schedules.get_sigmas_karras(64, SIGMA_MIN, SIGMA_MAX)[:-1])
    out = sample_diffrax(g, x, sigmas, solver=solver)
    assert rel(out, g.pf_ode_solution(x, SIGMA_MIN, SIGMA_MAX), g.mean) < 2e-3


# --- 3. adaptive ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('solver', [diffrax.Tsit5(), diffrax.Dopri5()], ids=['tsit5', 'dopri5'])
def test_adaptive_reaches_closed_form(solver):
    g = gaussian()
    x = start(g)
    x_min = g.pf_ode_solution(x, SIGMA_MAX, SIGMA_MIN)
    for tol, bound in ((1e-3, 1e-2), (1e-5, 1e-4)):
        out, info = sample_ode_adaptive(g, x, SIGMA_MIN, SIGMA_MAX, solver=solver, rtol=tol, atol=tol,
                                        denoise=False, return_info=True)
        assert bool(info['success']) and int(info['n_accept']) > 3
        assert rel(out, x_min, g.mean) < bound, (tol, rel(out, x_min, g.mean), info)
    denoised = sample_ode_adaptive(g, x, SIGMA_MIN, SIGMA_MAX, solver=solver, rtol=1e-5, atol=1e-5)
    assert rel(denoised, g(x_min, jnp.full((SHAPE[0],), SIGMA_MIN)), g.mean) < 1e-4


def test_adaptive_under_jit_with_extra_args():
    """Traceable, with extra_args passed to the model through diffrax's args."""
    g = gaussian()
    x = start(g)

    def model(x, sigma, shift):
        return g(x - shift, sigma) + shift

    run = jax.jit(lambda x, shift: sample_ode_adaptive(model, x, SIGMA_MIN, SIGMA_MAX, {'shift': shift},
                                                       rtol=1e-5, atol=1e-5, denoise=False))
    shifted = GaussianDenoiser(g.mean + 1., g.scale)
    assert rel(run(x + 1., jnp.float32(1.)), shifted.pf_ode_solution(x + 1., SIGMA_MAX, SIGMA_MIN), g.mean + 1) < 1e-4


def test_adaptive_callback_and_controller():
    """A given controller is used (its steps are those of the same settings given as arguments, not the
    default's); the callback sees σ_max and every accepted step (not the rejected ones)."""
    g = gaussian()
    x = start(g)
    seen = []
    settings = dict(rtol=1e-5, atol=1e-5, pcoeff=0.3, icoeff=0.4)
    out, info = sample_ode_adaptive(g, x, SIGMA_MIN, SIGMA_MAX, callback=seen.append, return_info=True,
                                    stepsize_controller=diffrax.PIDController(**settings))
    _, same = sample_ode_adaptive(g, x, SIGMA_MIN, SIGMA_MAX, return_info=True, **settings)
    _, default = sample_ode_adaptive(g, x, SIGMA_MIN, SIGMA_MAX, return_info=True)
    counts = lambda info: (int(info['n_accept']), int(info['n_reject']))  # noqa: E731
    assert counts(info) == counts(same) and counts(info)[0] > counts(default)[0], (info, same, default)
    sigmas = [float(c['sigma']) for c in seen]
    assert [c['i'] for c in seen] == list(range(int(info['n_accept']) + 1))
    assert sigmas[0] == SIGMA_MAX and abs(sigmas[-1] - SIGMA_MIN) < 1e-6 and np.all(np.diff(sigmas) < 0)
    np.testing.assert_allclose(seen[-1]['denoised'], out, rtol=1e-6)


# --- 4. reverse SDE ------------------------------------------------------------------------------------------------

SDE_N, SDE_SIGMA_MIN, SDE_STEPS = 4096, 0.05, 64


def _solve_sde(g, x, beta, key=1):
    sigmas = schedules.get_sigmas_karras(SDE_STEPS, SDE_SIGMA_MIN, SIGMA_MAX)[:-1]
    terms = reverse_sde_terms(g, PerSampleBrownianPath(key, x, SDE_SIGMA_MIN, SIGMA_MAX), beta)
    sol = diffrax.diffeqsolve(terms, diffrax.Heun(), t0=SIGMA_MAX, t1=SDE_SIGMA_MIN, dt0=None, y0=x,
                              stepsize_controller=diffrax.StepTo(ts=sigmas), max_steps=SDE_STEPS)
    return sol.ys[-1]


@pytest.mark.parametrize('beta', [1., lambda sigma: jnp.where(sigma < 5., 2., 0.)], ids=['beta1', 'beta_of_sigma'])
def test_reverse_sde_marginals(beta):
    """x(σ_max) ~ N(μ, s² + σ_max²) → x(σ_min) ~ N(μ, s² + σ_min²) for any β ≥ 0 (Heun: additive noise, so Itô =
    Stratonovich). 4096 samples of 4 pixels, pooled after standardising: mean within 5 standard errors, variance
    within 5 standard errors + 2% (discretisation, 64 steps)."""
    g = GaussianDenoiser(jnp.array([0.3, -0.2, 0.1, 0.5]).reshape(2, 2, 1),
                         jnp.array([0.2, 0.5, 0.8, 0.4]).reshape(2, 2, 1))
    x = g.sample(jax.random.PRNGKey(5), (SDE_N, 2, 2, 1), SIGMA_MAX)
    out = _solve_sde(g, x, beta)
    z = np.asarray((out - g.mean) / jnp.sqrt(g.scale ** 2 + SDE_SIGMA_MIN ** 2), np.float64).ravel()
    assert abs(z.mean()) < 5 / math.sqrt(z.size), z.mean()
    assert abs(z.var() - 1) < 5 * math.sqrt(2 / z.size) + 0.02, z.var()
    # The noise is really there: the samples are not the PF-ODE's images of their starting points.
    ode = g.pf_ode_solution(x, SIGMA_MAX, SDE_SIGMA_MIN)
    assert rel(out, ode, g.mean) > 0.3


def test_reverse_sde_beta_zero_is_pf_ode():
    g = gaussian()
    x = start(g)
    out = _solve_sde(g, x, 0.)
    assert rel(out, g.pf_ode_solution(x, SIGMA_MAX, SDE_SIGMA_MIN), g.mean) < 1e-2


def test_brownian_path_is_per_sample():
    """Sample n's Brownian increments depend on its key alone, not on the batch around it; increments ~ N(0, Δσ)."""
    x = jnp.zeros((256, 2, 2, 1))
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(9), i))(jnp.arange(256))
    full = PerSampleBrownianPath(keys, x, 0.1, 80.).evaluate(10., 30.)
    shuffled = PerSampleBrownianPath(keys[::-1], x, 0.1, 80.).evaluate(10., 30.)
    np.testing.assert_array_equal(full[::-1], shuffled)
    w = np.asarray(full, np.float64).ravel() / math.sqrt(20.)
    assert abs(w.mean()) < 5 / math.sqrt(w.size) and abs(w.var() - 1) < 5 * math.sqrt(2 / w.size)
