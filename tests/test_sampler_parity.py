"""The samplers equal k-diffusion 0.0.15's on a converted random-weight model, with the same model-evaluation counts
and callbacks; they compile to one loop whose size does not grow with the step count and has no host round trip.

Stochastic samplers are compared by giving both sides the same noise: k-diffusion a noise_sampler that returns
precomputed draws in call order (and, for the churn samplers, `torch.randn_like` patched to do the same); ours a
noise_sampler that indexes the same stack by its draw index i. Equal results therefore also test our draw order.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from kdiff_jax import sampling as S
from tests.parity import make_pair, nchw, nhwc, rel_err, small_config
from tests.oracle import import_k_diffusion

K = import_k_diffusion()

SIGMA_MIN, SIGMA_MAX = 0.01, 80.
BATCH, SIZE = 2, 8
TOL = 1e-4
STEPS = [10, 50]
SIGMA_DATA = 0.5

# name → (sampler, k-diffusion keyword args); churn samplers use torch.randn_like inside the oracle.
DETERMINISTIC = {
    'euler': ('euler', {}),
    'heun': ('heun', {}),
    'dpm_2': ('dpm_2', {}),
    'lms': ('lms', {}),
    'dpmpp_2m': ('dpmpp_2m', {}),
    'dpm_fast': ('dpm_fast', {}),
}
CHURN = dict(s_tmin=0.05, s_tmax=50., s_noise=1.003)
STOCHASTIC = {
    'euler_ancestral': ('euler_ancestral', {}),
    'euler_ancestral_eta0.6': ('euler_ancestral', dict(eta=0.6, s_noise=1.01)),
    'euler_ancestral_eta3': ('euler_ancestral', dict(eta=3.)),  # σ_up = σ_to: σ_down = 0, not NaN
    'dpm_2_ancestral': ('dpm_2_ancestral', {}),
    'dpmpp_2s_ancestral': ('dpmpp_2s_ancestral', {}),
    'dpmpp_sde': ('dpmpp_sde', {}),
    'dpmpp_2m_sde_midpoint': ('dpmpp_2m_sde', dict(solver_type='midpoint')),
    'dpmpp_2m_sde_heun': ('dpmpp_2m_sde', dict(solver_type='heun', eta=0.8)),
    'dpm_fast_eta1': ('dpm_fast', dict(eta=1.)),
    'euler_churn': ('euler', CHURN),
    'heun_churn': ('heun', CHURN),
    'dpm_2_churn': ('dpm_2', CHURN),
}
CHURN_SAMPLERS = ('euler', 'heun', 'dpm_2')
MEASURED: dict[str, float] = {}


@pytest.fixture(scope='module')
def pair():
    """A one-stage random-weight image_v1 (ResBlock, self-attention, mapping network, augmentation conditioning):
    nonlinear in x and σ, which is what the sampler comparison needs (the network's parity with k-diffusion is
    test_model_parity's). Each test compiles a whole sampling loop around it; the 3-stage parity model took ~2x as
    long to compile, on ~40 loops."""
    return make_pair(small_config(input_size=[SIZE, SIZE], depths=[1, 1], channels=[16, 16],
                                  self_attn_depths=[False, True]))


@pytest.fixture(scope='module', autouse=True)
def _one_torch_thread():
    """The oracle's tiny models run much faster on one thread than oversubscribed on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module', autouse=True)
def _record_errors():
    """Write the measured errors to $KDIFF_PARITY_JSON (the README's table) when set."""
    yield
    path = os.environ.get('KDIFF_PARITY_JSON')
    if path:
        with open(path, 'w') as f:
            json.dump(MEASURED, f, indent=1, sort_keys=True)


def _case(name, steps):
    """(sampler, keyword args) of a named case; churn cases get s_churn = 0.3·steps: γ = 0.3 inside [s_tmin, s_tmax]."""
    sampler, kwargs = {**DETERMINISTIC, **STOCHASTIC}[name]
    return sampler, dict(kwargs, s_churn=0.3 * steps) if name.endswith('_churn') else dict(kwargs)


def _x0(seed=0, batch=BATCH, size=SIZE):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((batch, size, size, 3)) * SIGMA_MAX).astype(np.float32)


def _noise(steps, seed=1, batch=BATCH, size=SIZE):
    """Enough draws for any sampler (at most 2 per step), [D, N, H, W, C]."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((2 * steps + 2, batch, size, size, 3)).astype(np.float32)


def _sigmas(steps):
    return S.get_sigmas_karras(steps, SIGMA_MIN, SIGMA_MAX)


def _our_noise_sampler(noise):
    stack = jnp.asarray(noise)
    return lambda sigma, sigma_next, i: stack[i]


def _torch_draws(noise):
    draws = iter([nchw(d) for d in noise])
    return lambda *args, **kwargs: next(draws)


def run_k_diffusion(model, sampler, x, sigmas, kwargs, noise=None, monkeypatch=None, callback=None):
    """k-diffusion's sampler; dpm_fast gets (σ_min, σ_max, n) from the σ array as our driver does."""
    fn = getattr(K.sampling, 'sample_' + sampler)
    kwargs = dict(kwargs)
    if noise is not None:
        if sampler in CHURN_SAMPLERS:
            monkeypatch.setattr(torch, 'randn_like', _torch_draws(noise))
        else:
            kwargs['noise_sampler'] = _torch_draws(noise)
    sig = np.asarray(sigmas)
    with torch.no_grad():
        if sampler == 'dpm_fast':
            out = fn(model, nchw(x), float(sig[sig > 0].min()), float(sig.max()), len(sig) - 1, disable=True,
                     callback=callback, **kwargs)
        else:
            out = fn(model, nchw(x), torch.from_numpy(sig.copy()), disable=True, callback=callback, **kwargs)
    return nhwc(out)


def run_ours(model, sampler, x, sigmas, kwargs, noise=None, callback=None):
    kwargs = dict(kwargs)
    if noise is not None:
        kwargs['noise_sampler'] = _our_noise_sampler(noise)
    return np.asarray(S.sample(model, jnp.asarray(x), sigmas, sampler, callback=callback, **kwargs))


@pytest.mark.parametrize('steps', STEPS)
@pytest.mark.parametrize('name', list(DETERMINISTIC))
def test_deterministic_sampler_matches_k_diffusion(pair, name, steps):
    torch_model, model = pair
    sampler, kwargs = _case(name, steps)
    x, sigmas = _x0(), _sigmas(steps)
    err = rel_err(run_ours(model, sampler, x, sigmas, kwargs), run_k_diffusion(torch_model, sampler, x, sigmas, kwargs))
    MEASURED[f'{name}@{steps}'] = err
    assert err <= TOL, f'{name} at {steps} steps: relative error {err:.2e}'


@pytest.mark.parametrize('steps', STEPS)
@pytest.mark.parametrize('name', list(STOCHASTIC))
def test_stochastic_sampler_matches_k_diffusion_with_the_same_noise(pair, name, steps, monkeypatch):
    torch_model, model = pair
    sampler, kwargs = _case(name, steps)
    x, sigmas, noise = _x0(), _sigmas(steps), _noise(steps)
    ours = run_ours(model, sampler, x, sigmas, kwargs, noise)
    ref = run_k_diffusion(torch_model, sampler, x, sigmas, kwargs, noise, monkeypatch)
    err = rel_err(ours, ref)
    MEASURED[f'{name}@{steps}'] = err
    assert err <= TOL, f'{name} at {steps} steps: relative error {err:.2e}'


@pytest.mark.parametrize('order', [2, 3])
def test_dpm_adaptive_matches_k_diffusion(pair, order):
    torch_model, model = pair
    x = _x0()
    kwargs = dict(order=order, rtol=0.05, atol=0.0078)
    with torch.no_grad():
        ref, ref_info = K.sampling.sample_dpm_adaptive(torch_model, nchw(x), SIGMA_MIN, SIGMA_MAX, disable=True,
                                                       return_info=True, **kwargs)
    ours, info = jax.jit(lambda x: S.sample_dpm_adaptive(model, x, SIGMA_MIN, SIGMA_MAX, return_info=True,
                                                         **kwargs))(jnp.asarray(x))
    err = rel_err(ours, nhwc(ref))
    MEASURED[f'dpm_adaptive_order{order}'] = err
    MEASURED[f'dpm_adaptive_order{order}_n_accept_ours_vs_kd'] = [int(info['n_accept']), ref_info['n_accept']]
    assert abs(int(info['n_accept']) - ref_info['n_accept']) <= 1, (info, ref_info)
    assert abs(int(info['nfe']) - ref_info['nfe']) <= order * abs(int(info['steps']) - ref_info['steps'])
    assert err <= 1e-3


# ------------------------------------------------------------------------ evaluation counts and callbacks (cheap model)

def _gaussian_denoiser(x, sigma):
    """The exact denoiser for data ~ N(0, σd²): D(x, σ) = x·σd²/(σ² + σd²)."""
    s2 = sigma.reshape(-1, *([1] * (x.ndim - 1))) ** 2
    return x * SIGMA_DATA ** 2 / (s2 + SIGMA_DATA ** 2)


class TorchGaussian(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x, sigma):
        self.calls += 1
        s2 = sigma.reshape(-1, 1, 1, 1) ** 2
        return x * SIGMA_DATA ** 2 / (s2 + SIGMA_DATA ** 2)


class CountedGaussian:
    """The Gaussian denoiser counting its evaluations on the host (one debug callback per evaluation that runs)."""

    def __init__(self):
        self.calls = 0

    def _count(self, _):
        self.calls += 1

    def __call__(self, x, sigma):
        jax.debug.callback(self._count, sigma[0])
        return _gaussian_denoiser(x, sigma)


ALL_CASES = {**DETERMINISTIC, **STOCHASTIC}




@pytest.mark.parametrize('name', list(ALL_CASES))
def test_model_evaluation_counts_and_callbacks_equal_k_diffusion(name, monkeypatch):
    steps, size = 7, 4
    sampler, kwargs = _case(name, steps)
    x, sigmas, noise = _x0(size=size), _sigmas(steps), _noise(steps, size=size)
    noise = noise if name in STOCHASTIC else None
    ref_model, ref_calls = TorchGaussian(), []
    ref = run_k_diffusion(ref_model, sampler, x, sigmas, kwargs, noise, monkeypatch, callback=ref_calls.append)
    model, our_calls = CountedGaussian(), []
    ours = run_ours(model, sampler, x, sigmas, kwargs, noise, callback=our_calls.append)
    jax.effects_barrier()
    assert model.calls == ref_model.calls, f'{name}: {model.calls} model evaluations, k-diffusion {ref_model.calls}'
    assert rel_err(ours, ref) <= TOL
    assert len(our_calls) == len(ref_calls)
    for a, b in zip(our_calls, ref_calls):
        assert set(a) == set(b)
        assert a['i'] == b['i'] and isinstance(a['i'], int)
        for key in set(b) - {'i'}:
            ref_value = b[key].numpy() if isinstance(b[key], torch.Tensor) else np.asarray(b[key])
            if ref_value.ndim == 4:  # x, denoised: float32 rounding, amplified by large steps, as in k-diffusion
                assert rel_err(a[key], ref_value.transpose(0, 2, 3, 1)) <= 1e-3, key
            else:
                np.testing.assert_allclose(np.asarray(a[key]), ref_value, rtol=1e-5, err_msg=key)


@pytest.mark.parametrize('order', [2, 3])
def test_dpm_adaptive_counts_and_callback(order):
    """info['nfe'] is the number of model calls, and both counts and the callback's fields follow k-diffusion."""
    x = _x0(size=4)
    ref_model, ref_calls = TorchGaussian(), []
    with torch.no_grad():
        ref, ref_info = K.sampling.sample_dpm_adaptive(ref_model, nchw(x), SIGMA_MIN, SIGMA_MAX, order=order,
                                                       disable=True, callback=ref_calls.append, return_info=True)
    model, our_calls = CountedGaussian(), []
    ours, info = S.sample(model, x, _sigmas(10), 'dpm_adaptive', callback=our_calls.append, return_info=True,
                          order=order)
    jax.effects_barrier()
    assert model.calls == int(info['nfe'])
    assert abs(int(info['steps']) - ref_info['steps']) <= 1 and abs(model.calls - ref_model.calls) <= 3
    assert len(our_calls) == int(info['steps']) and set(our_calls[0]) == set(ref_calls[0])
    assert [c['i'] for c in our_calls] == list(range(len(our_calls)))
    assert rel_err(ours, nhwc(ref)) <= 1e-3


# ------------------------------------------------------------------------------------- compiled form of the loops

def _lowered_text(sampler, steps, callback=None, **kwargs):
    x = jnp.zeros((2, 4, 4, 3))
    fn = S.get_sampler(sampler)
    if sampler in S.RANGE_SAMPLERS:
        args = (SIGMA_MIN, SIGMA_MAX, steps) if sampler == 'dpm_fast' else (SIGMA_MIN, SIGMA_MAX)
        run = lambda x: fn(_gaussian_denoiser, x, *args, callback=callback, key=0, **kwargs)
        return jax.jit(run).lower(x).as_text()
    run = lambda x, sigmas: fn(_gaussian_denoiser, x, sigmas, callback=callback, key=0, **kwargs)
    return jax.jit(run).lower(x, _sigmas(steps)).as_text()


STOCHASTIC_KWARGS = {'euler': dict(s_churn=1.), 'heun': dict(s_churn=1.), 'dpm_2': dict(s_churn=1.),
                     'dpm_fast': dict(eta=1.), 'dpm_adaptive': dict(eta=1.)}


@pytest.mark.parametrize('sampler', [s for s in S.SAMPLERS if s != 'dpm_adaptive'])  # it takes no step count
def test_program_size_does_not_grow_with_steps(sampler):
    kwargs = STOCHASTIC_KWARGS.get(sampler, {})
    small, large = _lowered_text(sampler, 10, **kwargs), _lowered_text(sampler, 250, **kwargs)
    assert abs(len(large) - len(small)) <= 0.01 * len(small), (len(small), len(large))


@pytest.mark.parametrize('sampler', list(S.SAMPLERS))
def test_no_host_callback_unless_asked(sampler):
    kwargs = STOCHASTIC_KWARGS.get(sampler, {})
    assert 'callback' not in _lowered_text(sampler, 10, **kwargs).lower()
    assert 'callback' in _lowered_text(sampler, 10, callback=lambda info: None, **kwargs).lower()


# ------------------------------------------------------------------------------ DPM-Solver++(3M) SDE (not in 0.0.15)

def _gaussian_flow(x_T, sigma_T, sigma):
    """The probability-flow ODE for N(0, σd²) data maps x(σ_T) to x(σ) = x(σ_T)·√(σ² + σd²)/√(σ_T² + σd²)."""
    return x_T * np.sqrt(sigma ** 2 + SIGMA_DATA ** 2) / np.sqrt(sigma_T ** 2 + SIGMA_DATA ** 2)


def test_dpmpp_3m_sde_converges_at_third_order_on_the_gaussian_ode():
    """η = 0 makes it a deterministic multistep solver of order 3: the error at σ_min falls ≈ 8-fold per doubling of
    the steps (≥ 5 asserted) and beats DPM-Solver++(2M)'s. (The schedule stops at σ_min: the final denoising step
    to 0 is not an ODE step.)"""
    x = _x0(size=4)
    exact = _gaussian_flow(x.astype(np.float64), SIGMA_MAX, SIGMA_MIN)

    def error(sampler, steps, **kwargs):
        sigmas = S.get_sigmas_exponential(steps, SIGMA_MIN, SIGMA_MAX)[:-1]
        return rel_err(S.sample(_gaussian_denoiser, x, sigmas, sampler, **kwargs), exact)

    errs = [error('dpmpp_3m_sde', n, eta=0.) for n in (8, 16, 32)]
    assert errs[0] / errs[1] >= 5 and errs[1] / errs[2] >= 5, errs
    assert errs[2] < error('dpmpp_2m', 32)


def test_dpmpp_3m_sde_samples_the_gaussian():
    """η = 1 with Brownian noise: from x ~ N(0, σ_max²) the samples have the data's std σd, and, unlike the η = 0
    (ODE) samples, which have the same std, they are all but uncorrelated with their starting noise: the exact
    reverse process gives σd²/√((σd² + σ_min²)(σd² + σ_max²)) < 0.01 (test_closed_form.py has the law per pixel)."""
    x = np.asarray(S.initial_noise(S.sample_keys(3, np.arange(64)), (64, 8, 8, 3))) * SIGMA_MAX
    out = np.asarray(S.sample(_gaussian_denoiser, x, _sigmas(40), 'dpmpp_3m_sde', seed=5))
    assert abs(out.std() / SIGMA_DATA - 1) < 0.03
    assert abs(np.corrcoef(out.ravel(), x.ravel())[0, 1]) < 5 / np.sqrt(out.size)  # the ODE's: 1


# ------------------------------------------------------------------------------------------------------ the API

def test_get_sampler_names():
    assert S.get_sampler('dpmpp_2m') is S.sample_dpmpp_2m is S.get_sampler('sample_dpmpp_2m')
    with pytest.raises(ValueError, match='dpmpp_2m_sde') as info:
        S.get_sampler('ddim')
    assert 'ddim' in str(info.value)


def test_missing_noise_source_and_bad_options_raise():
    x, sigmas = jnp.zeros((1, 4, 4, 3)), _sigmas(4)
    with pytest.raises(ValueError, match='key='):
        S.sample_euler_ancestral(_gaussian_denoiser, x, sigmas)
    with pytest.raises(ValueError, match='solver_type'):
        S.sample_dpmpp_2m_sde(_gaussian_denoiser, x, sigmas, solver_type='rk4', key=0)
    with pytest.raises(ValueError, match='sigma_min'):
        S.sample_dpm_fast(_gaussian_denoiser, x, 0., 80., 5)
    # deterministic ones need no key
    S.sample_euler(_gaussian_denoiser, x, sigmas)
    S.sample_dpmpp_2m_sde(_gaussian_denoiser, x, sigmas, eta=0.)


def test_lms_coefficients_are_exact_integrals():
    """Against the integral of the Lagrange polynomial by high-order Gauss–Legendre quadrature (exact for cubics)."""
    t = np.array([0.8, 1.7, 3.1, 6.0], np.float64)  # t_i, t_{i−1}, t_{i−2}, t_{i−3}
    t_next = 0.3
    nodes, weights = np.polynomial.legendre.leggauss(8)
    tau = t[0] + (t_next - t[0]) * (nodes + 1) / 2
    for cur_order in (1, 2, 3, 4):
        ours = np.asarray(S.lms_coefficients(t, t_next, cur_order, 4))
        for j in range(4):
            if j >= cur_order:
                assert ours[j] == 0
                continue
            basis = np.prod([(tau - t[k]) / (t[j] - t[k]) for k in range(cur_order) if k != j], axis=0)
            ref = np.sum(weights * basis) * (t_next - t[0]) / 2
            np.testing.assert_allclose(ours[j], ref, rtol=1e-5, atol=1e-6)
    # traceable in every argument
    jax.jit(S.lms_coefficients, static_argnums=3)(jnp.asarray(t), jnp.float32(t_next), jnp.int32(2), 4)
