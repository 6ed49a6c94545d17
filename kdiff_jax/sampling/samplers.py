"""k-diffusion's samplers (0.0.15, plus the later DPM-Solver++(3M) SDE) as compiled JAX loops.

Notation: σ_i = sigmas[i]; D(x, σ) the denoiser; d = (x − D)/σ the probability-flow ODE derivative dx/dσ; for the
DPM-Solver family t = −log σ (the half log-SNR λ of a VE process), h = t_{i+1} − t_i.

Shared conventions:
- `model(x, sigma, **extra_args) -> denoised`, x [N, H, W, C], sigma [N]: samplers pass σ·ones([N]) (k-diffusion's
  `s_in`). A kdiff_jax `Denoiser` is such a callable.
- The whole loop runs on device: `lax.scan` over the σ array (`lax.while_loop` for `sample_dpm_adaptive`). The σ
  schedule is an array argument, so a new step count changes shapes only; the compiled program does not grow with
  the number of steps. Every sampler is traceable (jit-able) and evaluates the model exactly as often as
  k-diffusion: where k-diffusion branches on values (e.g. `sigmas[i + 1] == 0`), we branch with `lax.cond`, so the
  branch not taken costs nothing and the result is k-diffusion's.
- Scalar hyper-parameters (eta, s_noise, s_churn, …) are Python numbers; a 0 that k-diffusion tests with `if eta:`
  is tested the same way here (statically), so eta = 0 skips the noise draw altogether.
- Randomness: `noise_sampler(sigma, sigma_next, i) -> array like x` (see noise.py), `i` the index of the draw in
  the order k-diffusion draws. If it is None, the sampler builds the default from `key`: an int seed, one PRNG key,
  or the per-sample keys array [N, 2] (see `noise.as_sample_keys`). The defaults are k-diffusion's: independent
  normals (`noise.default_noise_sampler`) for most, Brownian-tree increments (`noise.BrownianTreeNoiseSampler`) for
  dpmpp_sde, dpmpp_2m_sde and dpmpp_3m_sde. A sampler that needs noise and gets neither raises ValueError.
- `callback`, if given, is a host function called (in step order, through `jax.debug.callback`; an ordered
  effect where the process has one device) once per step with
  k-diffusion's dict {x, i, sigma, sigma_hat, denoised} as numpy values (`i` an int); None (the default) means no
  host round trip at all. `disable` (k-diffusion's progress-bar switch) is accepted and ignored.

Draw order (the `i` given to noise_sampler), per sampler, for a schedule of n steps whose only 0 is the last σ:
- euler, heun, dpm_2: one draw per step, i = step (k-diffusion's `randn_like`, drawn even when γ = 0 and unused
  then; not drawn at all when s_churn is a static 0).
- euler_ancestral, dpm_2_ancestral, dpmpp_2s_ancestral: one draw per step except the last, i = step.
- dpmpp_sde: two per step except the last: i = 2·step (to the half step s), 2·step + 1 (to σ_{i+1}).
- dpmpp_2m_sde, dpmpp_3m_sde: one per step except the last, i = step (none at all if eta = 0).
- dpm_fast: one per DPM-Solver step, i = step; dpm_adaptive: one per accepted step, i = accepted steps so far.
In general `i` counts the draws k-diffusion makes, in its order (a draw skipped by a value test is not counted).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ..denoisers import to_d
from .noise import BrownianTreeNoiseSampler, as_sample_keys, default_noise_sampler

__all__ = ['get_ancestral_step', 'lms_coefficients', 'sample_dpm_2', 'sample_dpm_2_ancestral', 'sample_dpm_adaptive',
           'sample_dpm_fast', 'sample_dpmpp_2m', 'sample_dpmpp_2m_sde', 'sample_dpmpp_2s_ancestral',
           'sample_dpmpp_3m_sde', 'sample_dpmpp_sde', 'sample_euler', 'sample_euler_ancestral', 'sample_heun',
           'sample_lms', 'to_d']


# ----------------------------------------------------------------------------------------------------------- helpers

def _is_static_zero(v) -> bool:
    return isinstance(v, (int, float, np.number)) and v == 0


def _denoiser(model, x, extra_args):
    """D(x, σ) for a scalar σ: the model called with σ·ones([N]) and the extra args."""
    extra_args = {} if extra_args is None else extra_args
    n = x.shape[0]

    def denoise(x, sigma):
        sigma = jnp.asarray(sigma, jnp.float32)
        return model(x, sigma * jnp.ones([n], jnp.float32), **extra_args)

    return denoise


def _report(callback, **info):
    """Send `info` to the host callback, with `i` and counters as Python ints; nothing if no callback."""
    if callback is None:
        return
    int_keys = {'i', 'steps', 'nfe', 'n_accept', 'n_reject'}

    def host(info):
        callback({k: int(v) if k in int_keys else v for k, v in info.items()})

    # An ordered effect cannot span several devices (jax raises); unordered calls still arrive once per step in step
    # order, since each consumes its own step's values inside the sequential loop.
    jax.debug.callback(host, info, ordered=jax.device_count() == 1)


def _noise_sampler(noise_sampler, key, x, name):
    """The given noise_sampler, or independent normals from `key` (k-diffusion's `default_noise_sampler`)."""
    if noise_sampler is not None:
        return noise_sampler
    if key is None:
        raise ValueError(f'{name} draws noise: pass key= (an int seed, a PRNG key or per-sample keys) '
                         'or noise_sampler=')
    return default_noise_sampler(as_sample_keys(key, x.shape[0]), x)


def _brownian_noise_sampler(noise_sampler, key, x, sigmas, name):
    """The given noise_sampler, or Brownian-tree increments on [min σ > 0, max σ] from `key` (k-diffusion's default
    for its SDE samplers)."""
    if noise_sampler is not None:
        return noise_sampler
    if key is None:
        raise ValueError(f'{name} draws noise: pass key= (an int seed, a PRNG key or per-sample keys) '
                         'or noise_sampler=')
    sigma_min = jnp.min(jnp.where(sigmas > 0, sigmas, jnp.inf))
    sigma_max = jnp.max(sigmas)
    return BrownianTreeNoiseSampler(as_sample_keys(key, x.shape[0]), x, sigma_min, sigma_max)


def _steps(sigmas):
    """The per-step scan inputs: step index i, σ_i, σ_{i+1} and σ_{i−1} (σ_{−1} = the last σ, as Python indexing)."""
    sigmas = jnp.asarray(sigmas, jnp.float32)
    if sigmas.ndim != 1 or sigmas.shape[0] < 2:
        raise ValueError(f'sigmas must be a 1-D array of at least 2 noise levels, got shape {sigmas.shape}')
    n = sigmas.shape[0] - 1
    return sigmas, {'i': jnp.arange(n, dtype=jnp.int32), 'sigma': sigmas[:-1], 'sigma_next': sigmas[1:],
                    'sigma_prev': jnp.concatenate([sigmas[-1:], sigmas[:-2]])}


def _t(sigma):
    """t = −log σ."""
    return -jnp.log(sigma)


def _sigma(t):
    """σ = exp(−t)."""
    return jnp.exp(-t)


def _sqrt_of_squares_difference(a, b):
    """√(a² − b²) for |a| ≥ |b|, with the difference computed as (a − b)·(a + b), clamped at 0.

    Written as a² − b², XLA:CPU may contract it into an FMA whose result at b = a is a·a's rounding error instead of
    0: √ of it is NaN or ~2·10⁻⁴·a where k-diffusion (PyTorch, no contraction) gets exactly 0. That happens in
    ancestral steps with eta > 1 (σ_up = σ_to) and, under jaxlib 0.11, in dpm_fast's last step with eta > 0. The
    factored form is exactly 0 at b = a and accurate to an ulp or two elsewhere."""
    return jnp.sqrt(jnp.maximum((a - b) * (a + b), 0.))


def _log_midpoint(a, b):
    """The geometric mean √(a·b), as exp of the midpoint of log a and log b (interpolated from the b end)."""
    log_a, log_b = jnp.log(a), jnp.log(b)
    return jnp.exp(log_b - 0.5 * (log_b - log_a))


def get_ancestral_step(sigma_from, sigma_to, eta=1.):
    """Split an ancestral step σ_from → σ_to into a deterministic step down to σ_down and fresh noise of scale σ_up:

    σ_up = min(σ_to, η·√(σ_to²·(σ_from² − σ_to²)/σ_from²)),   σ_down = √(σ_to² − σ_up²),   so σ_down² + σ_up² = σ_to².
    η = 0 (a static 0) gives (σ_to, 0): a deterministic step.
    """
    if _is_static_zero(eta):
        return sigma_to, 0.
    sigma_up = jnp.minimum(sigma_to, eta * sigma_to * _sqrt_of_squares_difference(sigma_from, sigma_to) / sigma_from)
    sigma_down = _sqrt_of_squares_difference(sigma_to, sigma_up)
    return sigma_down, sigma_up


def _churn(n_steps, s_churn, s_tmin, s_tmax, s_noise, noise_sampler):
    """Karras et al. (2022) Algorithm 2 "churn": raise σ_i to σ̂ = σ_i·(1 + γ) by adding noise of std √(σ̂² − σ_i²),

    γ = min(s_churn / n_steps, √2 − 1) if s_tmin ≤ σ_i ≤ s_tmax else 0. Returns (x, σ̂) for (x, σ_i, σ_{i+1}, i).
    The noise (draw i, times s_noise) is drawn every step as in k-diffusion; with s_churn a static 0 it is skipped.
    """
    if _is_static_zero(s_churn):
        return lambda x, sigma, sigma_next, i: (x, sigma)
    if isinstance(s_churn, (int, float)):
        gamma = min(s_churn / n_steps, 2 ** 0.5 - 1)
    else:
        gamma = jnp.minimum(s_churn / n_steps, 2 ** 0.5 - 1)

    def churn(x, sigma, sigma_next, i):
        eps = noise_sampler(sigma, sigma_next, i) * s_noise
        inside = (s_tmin <= sigma) & (sigma <= s_tmax)
        g = jnp.where(inside, gamma, 0.)
        sigma_hat = sigma * jnp.where(inside, jnp.float32(gamma + 1), jnp.float32(1.))
        x = jnp.where(g > 0, x + eps * _sqrt_of_squares_difference(sigma_hat, sigma), x)
        return x, sigma_hat

    return churn


def _churn_noise(s_churn, noise_sampler, key, x, name):
    return None if _is_static_zero(s_churn) else _noise_sampler(noise_sampler, key, x, name)


# ------------------------------------------------------------------------------------- Karras et al. Algorithm 2 family

def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                 s_tmax=float('inf'), s_noise=1., noise_sampler=None, key=None):
    """Euler steps on the probability-flow ODE (Karras et al. 2022, Algorithm 2 with Euler steps), optional churn.

    x ← x + d(x, σ̂)·(σ_{i+1} − σ̂). One model evaluation per step.
    """
    sigmas, xs = _steps(sigmas)
    denoise = _denoiser(model, x, extra_args)
    churn = _churn(sigmas.shape[0] - 1, s_churn, s_tmin, s_tmax, s_noise,
                   _churn_noise(s_churn, noise_sampler, key, x, 'sample_euler'))

    def step(x, s):
        x, sigma_hat = churn(x, s['sigma'], s['sigma_next'], s['i'])
        denoised = denoise(x, sigma_hat)
        d = to_d(x, sigma_hat, denoised)
        _report(callback, x=x, i=s['i'], sigma=s['sigma'], sigma_hat=sigma_hat, denoised=denoised)
        return x + d * (s['sigma_next'] - sigma_hat), None

    return lax.scan(step, x, xs)[0]


def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                s_tmax=float('inf'), s_noise=1., noise_sampler=None, key=None):
    """Heun's method (Karras et al. 2022, Algorithm 2), optional churn; the step to σ = 0 is an Euler step.

    x₂ = x + d·Δσ,  x ← x + (d + d(x₂, σ_{i+1}))/2·Δσ,  Δσ = σ_{i+1} − σ̂. Two evaluations per step (one on the last).
    """
    sigmas, xs = _steps(sigmas)
    denoise = _denoiser(model, x, extra_args)
    churn = _churn(sigmas.shape[0] - 1, s_churn, s_tmin, s_tmax, s_noise,
                   _churn_noise(s_churn, noise_sampler, key, x, 'sample_heun'))

    def step(x, s):
        x, sigma_hat = churn(x, s['sigma'], s['sigma_next'], s['i'])
        sigma_next = s['sigma_next']
        denoised = denoise(x, sigma_hat)
        d = to_d(x, sigma_hat, denoised)
        _report(callback, x=x, i=s['i'], sigma=s['sigma'], sigma_hat=sigma_hat, denoised=denoised)
        dt = sigma_next - sigma_hat

        def heun():
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigma_next, denoise(x_2, sigma_next))
            return x + (d + d_2) / 2 * dt

        return lax.cond(sigma_next == 0, lambda: x + d * dt, heun), None

    return lax.scan(step, x, xs)[0]


def sample_dpm_2(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                 s_tmax=float('inf'), s_noise=1., noise_sampler=None, key=None):
    """A DPM-Solver-2-like midpoint method in σ (k-diffusion's "DPM2"), optional churn; Euler on the last step.

    σ_mid = √(σ̂·σ_{i+1}),  x₂ = x + d·(σ_mid − σ̂),  x ← x + d(x₂, σ_mid)·(σ_{i+1} − σ̂).
    """
    sigmas, xs = _steps(sigmas)
    denoise = _denoiser(model, x, extra_args)
    churn = _churn(sigmas.shape[0] - 1, s_churn, s_tmin, s_tmax, s_noise,
                   _churn_noise(s_churn, noise_sampler, key, x, 'sample_dpm_2'))

    def step(x, s):
        x, sigma_hat = churn(x, s['sigma'], s['sigma_next'], s['i'])
        sigma_next = s['sigma_next']
        denoised = denoise(x, sigma_hat)
        d = to_d(x, sigma_hat, denoised)
        _report(callback, x=x, i=s['i'], sigma=s['sigma'], sigma_hat=sigma_hat, denoised=denoised)

        def midpoint():
            sigma_mid = _log_midpoint(sigma_hat, sigma_next)
            x_2 = x + d * (sigma_mid - sigma_hat)
            d_2 = to_d(x_2, sigma_mid, denoise(x_2, sigma_mid))
            return x + d_2 * (sigma_next - sigma_hat)

        return lax.cond(sigma_next == 0, lambda: x + d * (sigma_next - sigma_hat), midpoint), None

    return lax.scan(step, x, xs)[0]


# -------------------------------------------------------------------------------------------------- ancestral samplers

def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                           noise_sampler=None, key=None):
    """Ancestral sampling with Euler steps: an Euler step down to σ_down, then fresh noise of std σ_up
    (`get_ancestral_step`), so the marginal is at σ_{i+1}. No noise on the step to σ = 0."""
    sigmas, xs = _steps(sigmas)
    denoise = _denoiser(model, x, extra_args)
    noise = None if _is_static_zero(eta) else _noise_sampler(noise_sampler, key, x, 'sample_euler_ancestral')

    def step(carry, s):
        x, k = carry
        sigma, sigma_next = s['sigma'], s['sigma_next']
        denoised = denoise(x, sigma)
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
        _report(callback, x=x, i=s['i'], sigma=sigma, sigma_hat=sigma, denoised=denoised)
        x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)
        return _add_ancestral_noise(x, k, sigma_next > 0, noise, sigma, sigma_next, s_noise * sigma_up), None

    return lax.scan(step, (x, jnp.int32(0)), xs)[0][0]


def _add_ancestral_noise(x, k, draw, noise_sampler, sigma, sigma_next, scale):
    """If `draw`: x + noise_sampler(σ, σ_next, k)·scale and k + 1 (a skipped draw is not counted)."""
    if noise_sampler is None:  # a static eta = 0: k-diffusion multiplies its draw by 0
        return x, k + draw.astype(jnp.int32)
    return lax.cond(draw, lambda: (x + noise_sampler(sigma, sigma_next, k) * scale, k + 1), lambda: (x, k))


def sample_dpm_2_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                           noise_sampler=None, key=None):
    """Ancestral sampling with DPM2 (midpoint in σ) steps down to σ_down, then noise of std σ_up.

    If σ_down = 0: one Euler step, no noise. Otherwise σ_mid = √(σ_i·σ_down), x₂ = x + d·(σ_mid − σ_i),
    x ← x + d(x₂, σ_mid)·(σ_down − σ_i) + s_noise·σ_up·noise.
    """
    sigmas, xs = _steps(sigmas)
    denoise = _denoiser(model, x, extra_args)
    noise = _noise_sampler(noise_sampler, key, x, 'sample_dpm_2_ancestral') if not _is_static_zero(eta) else None

    def step(carry, s):
        x, k = carry
        sigma, sigma_next = s['sigma'], s['sigma_next']
        denoised = denoise(x, sigma)
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
        _report(callback, x=x, i=s['i'], sigma=sigma, sigma_hat=sigma, denoised=denoised)
        d = to_d(x, sigma, denoised)

        def euler():
            return x + d * (sigma_down - sigma), k

        def midpoint():
            sigma_mid = _log_midpoint(sigma, sigma_down)
            x_2 = x + d * (sigma_mid - sigma)
            d_2 = to_d(x_2, sigma_mid, denoise(x_2, sigma_mid))
            x_new = x + d_2 * (sigma_down - sigma)
            if noise is None:
                return x_new, k + 1
            return x_new + noise(sigma, sigma_next, k) * s_noise * sigma_up, k + 1

        return lax.cond(sigma_down == 0, euler, midpoint), None

    return lax.scan(step, (x, jnp.int32(0)), xs)[0][0]


def sample_dpmpp_2s_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                              noise_sampler=None, key=None):
    """Ancestral sampling with DPM-Solver++(2S) steps (Lu et al. 2022) down to σ_down, then noise of std σ_up.

    In t = −log σ, h = t_down − t_i, s = t_i + h/2:
      x₂ = (σ(s)/σ_i)·x − (e^(−h/2) − 1)·D_i,   x ← (σ_down/σ_i)·x − (e^(−h) − 1)·D(x₂, σ(s)).
    If σ_down = 0 an Euler step instead. Noise is added unless σ_{i+1} = 0.
    """
    sigmas, xs = _steps(sigmas)
    denoise = _denoiser(model, x, extra_args)
    noise = None if _is_static_zero(eta) else _noise_sampler(noise_sampler, key, x, 'sample_dpmpp_2s_ancestral')

    def step(carry, s):
        x, k = carry
        sigma, sigma_next = s['sigma'], s['sigma_next']
        denoised = denoise(x, sigma)
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
        _report(callback, x=x, i=s['i'], sigma=sigma, sigma_hat=sigma, denoised=denoised)

        def euler():
            return x + to_d(x, sigma, denoised) * (sigma_down - sigma)

        def dpm_solver_2s():
            t, t_next = _t(sigma), _t(sigma_down)
            h = t_next - t
            s_mid = t + 0.5 * h
            x_2 = (_sigma(s_mid) / _sigma(t)) * x - jnp.expm1(-h * 0.5) * denoised
            denoised_2 = denoise(x_2, _sigma(s_mid))
            return (_sigma(t_next) / _sigma(t)) * x - jnp.expm1(-h) * denoised_2

        x = lax.cond(sigma_down == 0, euler, dpm_solver_2s)
        return _add_ancestral_noise(x, k, sigma_next > 0, noise, sigma, sigma_next, s_noise * sigma_up), None

    return lax.scan(step, (x, jnp.int32(0)), xs)[0][0]


# ------------------------------------------------------------------------------------------------------------ LMS

def lms_coefficients(t_hist, t_next, cur_order, order: int):
    """Linear multistep weights c_j = ∫_{t_i}^{t_{i+1}} ℓ_j(τ) dτ, j = 0 … order−1, in closed form.

    t_hist[k] = t_{i−k} (k = 0 … order−1) are the nodes; ℓ_j(τ) = Π_{k≠j, k<cur_order} (τ − t_{i−k})/(t_{i−j} − t_{i−k})
    is the Lagrange basis over the first `cur_order` nodes; c_j = 0 for j ≥ cur_order. With τ = t_i + h·u,
    h = t_{i+1} − t_i and a_k = (t_i − t_{i−k})/h, each factor is (u + a_k)/(a_k − a_j): well scaled whatever the σ
    range. Multiplying the linear factors gives the polynomial's coefficients p_m, and c_j = h·Σ_m p_m/(m + 1).
    Exact up to float rounding; `t_hist`, `t_next` and `cur_order` may be traced (`order` is static).
    """
    t_hist = jnp.asarray(t_hist, jnp.float32)
    h = t_next - t_hist[0]
    a = (t_hist[0] - t_hist) / h
    coeffs = []
    for j in range(order):
        poly = [jnp.float32(1.)]
        for k in range(order):
            if k == j:
                continue
            active = k < cur_order
            denom = jnp.where(active, a[k] - a[j], 1.)
            c0 = jnp.where(active, a[k] / denom, 1.)
            c1 = jnp.where(active, 1. / denom, 0.)
            poly = [c0 * poly[0]] + [c0 * poly[m] + c1 * poly[m - 1] for m in range(1, len(poly))] + [c1 * poly[-1]]
        integral = h * sum(p / (m + 1) for m, p in enumerate(poly))
        coeffs.append(jnp.where(j < cur_order, integral, 0.))
    return jnp.stack(coeffs)


def sample_lms(model, x, sigmas, extra_args=None, callback=None, disable=None, order=4, noise_sampler=None, key=None):
    """Linear multistep (Adams–Bashforth in σ) of order min(i + 1, order) on the probability-flow ODE:

    x ← x + Σ_j c_j·d_{i−j}, c_j the integrals of the Lagrange basis over the last nodes (`lms_coefficients`).
    One model evaluation per step. Deterministic: noise_sampler and key are accepted for a uniform signature and
    ignored.
    """
    sigmas, xs = _steps(sigmas)
    denoise = _denoiser(model, x, extra_args)
    order = int(order)
    if order < 1:
        raise ValueError(f'order must be >= 1, got {order}')

    def step(carry, s):
        x, ds, t_hist = carry
        sigma, i = s['sigma'], s['i']
        denoised = denoise(x, sigma)
        d = to_d(x, sigma, denoised)
        ds = jnp.concatenate([d[None], ds[:-1]])
        t_hist = jnp.concatenate([sigma[None], t_hist[:-1]])
        _report(callback, x=x, i=i, sigma=sigma, sigma_hat=sigma, denoised=denoised)
        coeffs = lms_coefficients(t_hist, s['sigma_next'], jnp.minimum(i + 1, order), order)
        update = 0.
        for j in range(order):
            update = update + coeffs[j] * ds[j]
        return (x + update, ds, t_hist), None

    init = (x, jnp.zeros((order, *x.shape), x.dtype), jnp.zeros([order], jnp.float32))
    return lax.scan(step, init, xs)[0][0]


# ------------------------------------------------------------------------------------------------- DPM-Solver++ family

def sample_dpmpp_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                     noise_sampler=None, r=1 / 2, key=None):
    """DPM-Solver++ (stochastic, two stages per step; the default noise is Brownian-tree increments).

    t = −log σ, h = t_{i+1} − t_i, s = t_i + r·h. Stage 1, an ancestral step t_i → s: (σ_d, σ_u) from
    get_ancestral_step(σ(t_i), σ(s), η), x₂ = (σ_d/σ_i)·x − (σ_d/σ_i − 1)·D_i + s_noise·σ_u·noise.
    Stage 2, t_i → t_{i+1} with D' = (1 − 1/(2r))·D_i + 1/(2r)·D(x₂, σ(s)): same form, noise again.
    The step to σ = 0 is an Euler step. Two evaluations per step (one on the last).
    """
    sigmas, xs = _steps(sigmas)
    denoise = _denoiser(model, x, extra_args)
    noise = _brownian_noise_sampler(noise_sampler, key, x, sigmas, 'sample_dpmpp_sde')
    fac = 1 / (2 * r)

    def step(carry, s):
        x, k = carry
        sigma, sigma_next = s['sigma'], s['sigma_next']
        denoised = denoise(x, sigma)
        _report(callback, x=x, i=s['i'], sigma=sigma, sigma_hat=sigma, denoised=denoised)

        def euler():
            return x + to_d(x, sigma, denoised) * (sigma_next - sigma), k

        def two_stages():
            t, t_next = _t(sigma), _t(sigma_next)
            h = t_next - t
            t_mid = t + h * r
            sd, su = get_ancestral_step(_sigma(t), _sigma(t_mid), eta)
            s_ = _t(sd)
            x_2 = (_sigma(s_) / _sigma(t)) * x - jnp.expm1(t - s_) * denoised
            x_2 = x_2 + noise(_sigma(t), _sigma(t_mid), k) * s_noise * su
            denoised_2 = denoise(x_2, _sigma(t_mid))
            sd, su = get_ancestral_step(_sigma(t), _sigma(t_next), eta)
            t_next_ = _t(sd)
            denoised_d = (1 - fac) * denoised + fac * denoised_2
            x_new = (_sigma(t_next_) / _sigma(t)) * x - jnp.expm1(t - t_next_) * denoised_d
            return x_new + noise(_sigma(t), _sigma(t_next), k + 1) * s_noise * su, k + 2

        return lax.cond(sigma_next == 0, euler, two_stages), None

    return lax.scan(step, (x, jnp.int32(0)), xs)[0][0]


def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, key=None):
    """DPM-Solver++(2M) (Lu et al. 2022), multistep, one evaluation per step (deterministic: noise_sampler and key
    are accepted for a uniform signature and ignored).

    t = −log σ, h = t_{i+1} − t_i, r = h_{i−1}/h:  D' = (1 + 1/(2r))·D_i − 1/(2r)·D_{i−1} (D' = D_i on the first step
    and the step to σ = 0),  x ← (σ_{i+1}/σ_i)·x − (e^(−h) − 1)·D'.
    """
    sigmas, xs = _steps(sigmas)
    denoise = _denoiser(model, x, extra_args)

    def step(carry, s):
        x, old_denoised = carry
        sigma, sigma_next = s['sigma'], s['sigma_next']
        denoised = denoise(x, sigma)
        _report(callback, x=x, i=s['i'], sigma=sigma, sigma_hat=sigma, denoised=denoised)
        t, t_next = _t(sigma), _t(sigma_next)
        h = t_next - t
        r = (t - _t(s['sigma_prev'])) / h
        denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        first_order = (s['i'] == 0) | (sigma_next == 0)
        denoised_d = jnp.where(first_order, denoised, denoised_d)
        x = (_sigma(t_next) / _sigma(t)) * x - jnp.expm1(-h) * denoised_d
        return (x, denoised), None

    return lax.scan(step, (x, jnp.zeros_like(x)), xs)[0][0]


def sample_dpmpp_2m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                        noise_sampler=None, solver_type='midpoint', key=None):
    """DPM-Solver++(2M) SDE: a multistep exponential integrator of the reverse SDE (default noise: Brownian tree).

    t = −log σ, h = t_{i+1} − t_i, ηh = η·h, r = h_{i−1}/h:
      x ← (σ_{i+1}/σ_i)·e^(−ηh)·x + (1 − e^(−h−ηh))·D_i
          + [from the second step] ΔD/r · (½·(1 − e^(−h−ηh))  (midpoint)  or  (1 − e^(−h−ηh))/(−h−ηh) + 1  (heun))
          + σ_{i+1}·√(1 − e^(−2ηh))·s_noise·noise,                  ΔD = D_i − D_{i−1}.
    The step to σ = 0 returns D_i.
    """
    if solver_type not in {'heun', 'midpoint'}:
        raise ValueError(f"solver_type must be 'heun' or 'midpoint', got {solver_type!r}")
    sigmas, xs = _steps(sigmas)
    denoise = _denoiser(model, x, extra_args)
    noise = None if _is_static_zero(eta) else _brownian_noise_sampler(noise_sampler, key, x, sigmas,
                                                                      'sample_dpmpp_2m_sde')

    def step(carry, s):
        x, old_denoised, h_last, k = carry
        sigma, sigma_next, i = s['sigma'], s['sigma_next'], s['i']
        denoised = denoise(x, sigma)
        _report(callback, x=x, i=i, sigma=sigma, sigma_hat=sigma, denoised=denoised)

        def sde_step():
            t, t_s = _t(sigma), _t(sigma_next)
            h = t_s - t
            eta_h = eta * h
            x_new = sigma_next / sigma * jnp.exp(-eta_h) * x + -jnp.expm1(-h - eta_h) * denoised
            r = h_last / h
            if solver_type == 'heun':
                correction = (-jnp.expm1(-h - eta_h) / (-h - eta_h) + 1) * (1 / r) * (denoised - old_denoised)
            else:
                correction = 0.5 * -jnp.expm1(-h - eta_h) * (1 / r) * (denoised - old_denoised)
            x_new = jnp.where(i > 0, x_new + correction, x_new)
            if noise is not None:
                x_new = x_new + noise(sigma, sigma_next, k) * sigma_next * jnp.sqrt(-jnp.expm1(-2 * eta_h)) * s_noise
                return x_new, h, k + 1
            return x_new, h, k

        x, h, k = lax.cond(sigma_next == 0, lambda: (denoised, h_last, k), sde_step)
        return (x, denoised, h, k), None

    init = (x, jnp.zeros_like(x), jnp.float32(0.), jnp.int32(0))
    return lax.scan(step, init, xs)[0][0]


def sample_dpmpp_3m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                        noise_sampler=None, key=None):
    """DPM-Solver++(3M) SDE (upstream k-diffusion after 0.0.15): third-order multistep in t = −log σ.

    h = t_{i+1} − t_i, h_η = (η + 1)·h, φ₂ = 1 − (1 − e^(−h_η))/h_η, φ₃ = φ₂/h_η − ½:
      x ← e^(−h_η)·x + (1 − e^(−h_η))·D_i
      + φ₂·D₁ − φ₃·D₂  with divided differences of the last three D (r₀ = h_{i−1}/h, r₁ = h_{i−2}/h):
          δ₀ = (D_i − D_{i−1})/r₀,  δ₁ = (D_{i−1} − D_{i−2})/r₁,
          D₁ = δ₀ + (δ₀ − δ₁)·r₀/(r₀ + r₁),  D₂ = (δ₀ − δ₁)/(r₀ + r₁)
        (second step: + φ₂·δ₀ only; first step: neither)
      + σ_{i+1}·√(1 − e^(−2ηh))·s_noise·noise  (if η ≠ 0).
    The step to σ = 0 returns D_i. Default noise: Brownian tree.
    """
    sigmas, xs = _steps(sigmas)
    denoise = _denoiser(model, x, extra_args)
    noise = None if _is_static_zero(eta) else _brownian_noise_sampler(noise_sampler, key, x, sigmas,
                                                                      'sample_dpmpp_3m_sde')

    def step(carry, s):
        x, den_1, den_2, h_1, h_2, k = carry  # h_1, h_2: (value, is_defined) of the last two steps' h
        sigma, sigma_next = s['sigma'], s['sigma_next']
        denoised = denoise(x, sigma)
        _report(callback, x=x, i=s['i'], sigma=sigma, sigma_hat=sigma, denoised=denoised)

        def sde_step():
            h = _t(sigma_next) - _t(sigma)
            h_eta = h * (eta + 1)
            x_new = jnp.exp(-h_eta) * x + -jnp.expm1(-h_eta) * denoised
            phi_2 = jnp.expm1(-h_eta) / h_eta + 1
            phi_3 = phi_2 / h_eta - 0.5
            r0, r1 = h_1[0] / h, h_2[0] / h
            d1_0 = (denoised - den_1) / r0
            d1_1 = (den_1 - den_2) / r1
            d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            third = x_new + phi_2 * d1 - phi_3 * d2
            second = x_new + phi_2 * d1_0
            x_new = jnp.where(h_2[1], third, jnp.where(h_1[1], second, x_new))
            if noise is None:
                return x_new, (h, jnp.bool_(True)), k
            x_new = x_new + noise(sigma, sigma_next, k) * sigma_next * jnp.sqrt(-jnp.expm1(-2 * h * eta)) * s_noise
            return x_new, (h, jnp.bool_(True)), k + 1

        # On the step to σ = 0, h keeps its last value (k-diffusion leaves its variable untouched), which is h_1.
        x, h, k = lax.cond(sigma_next == 0, lambda: (denoised, h_1, k), sde_step)
        return (x, denoised, den_1, h, h_1, k), None

    undefined = (jnp.float32(0.), jnp.bool_(False))
    init = (x, jnp.zeros_like(x), jnp.zeros_like(x), undefined, undefined, jnp.int32(0))
    return lax.scan(step, init, xs)[0][0]


# ------------------------------------------------------------------------------------- DPM-Solver (Lu et al. 2022)

class _DPMSolver:
    """DPM-Solver-1/2/3 (Lu et al. 2022) in t = −log σ on ε(x, t) = (x − D(x, σ(t)))/σ(t), h = t_next − t.

    Stages: u₁ = x − σ(s₁)(e^(r₁h) − 1)·ε at s₁ = t + r₁h; u₂ = x − σ(s₂)(e^(r₂h) − 1)·ε
    − σ(s₂)·(r₂/r₁)·((e^(r₂h) − 1)/(r₂h) − 1)·(ε₁ − ε) at s₂ = t + r₂h, with ε₁ = ε(u₁, s₁), ε₂ = ε(u₂, s₂).
    Updates: order 1: x − σ(t_next)(e^h − 1)·ε;  order 2: that − σ(t_next)/(2r₁)·(e^h − 1)·(ε₁ − ε);
    order 3: the order-1 update − σ(t_next)/r₂·((e^h − 1)/h − 1)·(ε₂ − ε).
    Each step takes the ε at its start (k-diffusion's eps cache) and evaluates the model only for its stages.
    """

    def __init__(self, denoise):
        self.denoise = denoise

    def eps(self, x, t):
        sigma = _sigma(t)
        return (x - self.denoise(x, sigma)) / sigma

    @staticmethod
    def stage_1(x, t, h, eps, r1):
        s1 = t + r1 * h
        return x - _sigma(s1) * jnp.expm1(r1 * h) * eps, s1

    @staticmethod
    def stage_2(x, t, h, eps, eps_r1, r1, r2):
        s2 = t + r2 * h
        return (x - _sigma(s2) * jnp.expm1(r2 * h) * eps
                - _sigma(s2) * (r2 / r1) * (jnp.expm1(r2 * h) / (r2 * h) - 1) * (eps_r1 - eps)), s2

    @staticmethod
    def update_1(x, t_next, h, eps):
        return x - _sigma(t_next) * jnp.expm1(h) * eps

    @classmethod
    def update_2(cls, x, t_next, h, eps, eps_r1, r1):
        return cls.update_1(x, t_next, h, eps) - _sigma(t_next) / (2 * r1) * jnp.expm1(h) * (eps_r1 - eps)

    @classmethod
    def update_3(cls, x, t_next, h, eps, eps_r2, r2):
        return cls.update_1(x, t_next, h, eps) - _sigma(t_next) / r2 * (jnp.expm1(h) / h - 1) * (eps_r2 - eps)

    def step_1(self, x, t, t_next, eps):
        """DPM-Solver-1 (no evaluation beyond ε)."""
        return self.update_1(x, t_next, t_next - t, eps)

    def step_2(self, x, t, t_next, eps, r1=1 / 2):
        """DPM-Solver-2 (one evaluation); returns (x_next, ε₁) so a following third-order step can reuse ε₁."""
        h = t_next - t
        eps_r1 = self.eps(*self.stage_1(x, t, h, eps, r1))
        return self.update_2(x, t_next, h, eps, eps_r1, r1), eps_r1

    def step_3(self, x, t, t_next, eps, eps_r1, r1=1 / 3, r2=2 / 3):
        """DPM-Solver-3 given ε₁ at s₁ = t + r₁h (one more evaluation)."""
        h = t_next - t
        eps_r2 = self.eps(*self.stage_2(x, t, h, eps, eps_r1, r1, r2))
        return self.update_3(x, t_next, h, eps, eps_r2, r2)


def _check_sigma_range(sigma_min, sigma_max):
    for name, v in (('sigma_min', sigma_min), ('sigma_max', sigma_max)):
        try:
            value = float(v)
        except (TypeError, jax.errors.ConcretizationTypeError):
            continue  # traced: cannot check here
        if value <= 0:
            raise ValueError(f'{name} must be > 0 (DPM-Solver works in log σ), got {value}')


def _is_reverse(t_start, t_end):
    try:
        return not float(t_end) > float(t_start)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return False


def _linspace(start, end, num: int):
    """num points from start to end, each computed from the nearer end (start + k·Δ in the first half,
    end − (num − 1 − k)·Δ in the second), as torch.linspace does: both ends exact, the same rounding as k-diffusion."""
    k = jnp.arange(num, dtype=jnp.float32)
    delta = (end - start) / max(num - 1, 1)
    return jnp.where(k < num // 2, start + k * delta, end - (num - 1 - k) * delta)


def _dpm_fast_update(solver, x, t, t_next, eps, order):
    """One DPM-Solver step of a traced order 1, 2 or 3, evaluating the model once per stage it needs (order − 1
    times; each stage is a `lax.cond`, so the program holds two model calls, not one per order and stage).
    Order 2 uses r₁ = 1/2, order 3 r₁ = 1/3, r₂ = 2/3, as k-diffusion's dpm_solver_fast."""
    h = t_next - t
    r1 = jnp.where(order == 3, jnp.float32(1 / 3), jnp.float32(1 / 2))
    zero = jnp.zeros_like(eps)
    eps_r1 = lax.cond(order >= 2, lambda: solver.eps(*solver.stage_1(x, t, h, eps, r1)), lambda: zero)
    eps_r2 = lax.cond(order == 3, lambda: solver.eps(*solver.stage_2(x, t, h, eps, eps_r1, 1 / 3, 2 / 3)),
                      lambda: zero)
    return jnp.where(order == 1, solver.update_1(x, t_next, h, eps),
                     jnp.where(order == 2, solver.update_2(x, t_next, h, eps, eps_r1, 1 / 2),
                               solver.update_3(x, t_next, h, eps, eps_r2, 2 / 3)))


def _fast_orders(n: int) -> list[int]:
    """DPM-Solver-Fast's step orders for n evaluations: third-order steps, then a 2+1 or n mod 3 tail (sum = n)."""
    m = n // 3 + 1
    return [3] * (m - 2) + [2, 1] if n % 3 == 0 else [3] * (m - 1) + [n % 3]


def sample_dpm_fast(model, x, sigma_min, sigma_max, n, extra_args=None, callback=None, disable=None, eta=0.,
                    s_noise=1., noise_sampler=None, key=None):
    """DPM-Solver-Fast (Lu et al. 2022): ⌊n/3⌋ + 1 uniform steps in t = −log σ from σ_max to σ_min, third-order
    steps then a lower-order tail, n model evaluations in all. With eta > 0 each step ends at σ_down and adds noise
    of std √(σ(t_{k+1})² − σ(t_down)²) (one draw per step). Returns the sample at σ_min (not denoised to 0).

    The callback gets {x, i, t, t_up, sigma, sigma_hat, denoised} as k-diffusion's.
    """
    n = int(n)
    if n < 1:
        raise ValueError(f'n (model evaluations) must be >= 1, got {n}')
    _check_sigma_range(sigma_min, sigma_max)
    solver = _DPMSolver(_denoiser(model, x, extra_args))
    t_start, t_end = _t(jnp.float32(sigma_max)), _t(jnp.float32(sigma_min))
    if not _is_static_zero(eta) and _is_reverse(t_start, t_end):
        raise ValueError('eta must be 0 for reverse sampling')
    noise = None if _is_static_zero(eta) else _noise_sampler(noise_sampler, key, x, 'sample_dpm_fast')
    orders = _fast_orders(n)
    ts = _linspace(t_start, t_end, len(orders) + 1)
    xs = {'i': jnp.arange(len(orders), dtype=jnp.int32), 't': ts[:-1], 't_next': ts[1:],
          'order': jnp.asarray(orders, jnp.int32)}

    def step(x, s):
        t, t_next = s['t'], s['t_next']
        if noise is not None:
            sd, _ = get_ancestral_step(_sigma(t), _sigma(t_next), eta)
            t_next_ = jnp.minimum(t_end, _t(sd))
            su = _sqrt_of_squares_difference(_sigma(t_next), _sigma(t_next_))
        else:
            t_next_ = t_next
        eps = solver.eps(x, t)
        denoised = x - _sigma(t) * eps
        _report(callback, x=x, i=s['i'], t=t, t_up=t, sigma=_sigma(t), sigma_hat=_sigma(t), denoised=denoised)
        x = _dpm_fast_update(solver, x, t, t_next_, eps, s['order'])
        if noise is not None:
            x = x + su * s_noise * noise(_sigma(t), _sigma(t_next), s['i'])
        return x, None

    return lax.scan(step, x, xs)[0]


def sample_dpm_adaptive(model, x, sigma_min, sigma_max, extra_args=None, callback=None, disable=None, order=3,
                        rtol=0.05, atol=0.0078, h_init=0.05, pcoeff=0., icoeff=1., dcoeff=0., accept_safety=0.81,
                        eta=0., s_noise=1., noise_sampler=None, return_info=False, key=None):
    """DPM-Solver-12 / -23 with adaptive steps in t = −log σ (Lu et al. 2022), from σ_max to σ_min.

    Each attempt from s to t = s + h computes a low- (order − 1) and a high-order (order) solution sharing stages
    (order evaluations); error = ‖(x_low − x_high)/δ‖₂/√numel, δ = max(atol, rtol·max(|x_low|, |x_prev|)) over the
    whole batch. A PID controller (`_pid_propose`) scales h and accepts when its factor ≥ accept_safety. Runs in a
    `lax.while_loop`; with `return_info` also returns {steps, nfe, n_accept, n_reject} (int32 arrays).
    As in k-diffusion the error, hence the step sequence, is shared by the batch: unlike the fixed-step samplers, a
    dpm_adaptive sample depends on the batch it is drawn in. The callback also gets t, t_up, error, h and the counts.
    """
    if order not in {2, 3}:
        raise ValueError(f'order should be 2 or 3, got {order!r}')
    _check_sigma_range(sigma_min, sigma_max)
    solver = _DPMSolver(_denoiser(model, x, extra_args))
    t_start, t_end = _t(jnp.float32(sigma_max)), _t(jnp.float32(sigma_min))
    if not _is_static_zero(eta) and _is_reverse(t_start, t_end):
        raise ValueError('eta must be 0 for reverse sampling')
    noise = None if _is_static_zero(eta) else _noise_sampler(noise_sampler, key, x, 'sample_dpm_adaptive')
    forward = t_end > t_start
    h0 = jnp.where(forward, 1., -1.) * abs(h_init)
    pid_order = 1.5 if not _is_static_zero(eta) else order
    b1 = (pcoeff + icoeff + dcoeff) / pid_order
    b2 = -(pcoeff + 2 * dcoeff) / pid_order
    b3 = dcoeff / pid_order
    numel_sqrt = math.sqrt(x.size)
    zero = jnp.int32(0)
    state = {'x': x, 'x_prev': x, 's': t_start, 'h': h0.astype(jnp.float32), 'errs': jnp.zeros([3], jnp.float32),
             'pid_started': jnp.bool_(False), 'steps': zero, 'nfe': zero, 'n_accept': zero, 'n_reject': zero}

    def not_done(st):
        return jnp.where(forward, st['s'] < t_end - 1e-5, st['s'] > t_end + 1e-5)

    def attempt(st):
        x, s = st['x'], st['s']
        t = jnp.where(forward, jnp.minimum(t_end, s + st['h']), jnp.maximum(t_end, s + st['h']))
        if noise is not None:
            sd, _ = get_ancestral_step(_sigma(s), _sigma(t), eta)
            t_ = jnp.minimum(t_end, _t(sd))
            su = _sqrt_of_squares_difference(_sigma(t), _sigma(t_))
        else:
            t_ = t
        eps = solver.eps(x, s)
        denoised = x - _sigma(s) * eps
        if order == 2:
            x_low = solver.step_1(x, s, t_, eps)
            x_high, _ = solver.step_2(x, s, t_, eps)
        else:
            x_low, eps_r1 = solver.step_2(x, s, t_, eps, r1=1 / 3)
            x_high = solver.step_3(x, s, t_, eps, eps_r1)
        delta = jnp.maximum(atol, rtol * jnp.maximum(jnp.abs(x_low), jnp.abs(st['x_prev'])))
        error = jnp.sqrt(jnp.sum(jnp.square((x_low - x_high) / delta))) / numel_sqrt
        accept, h, errs = _pid_propose(st['h'], st['errs'], st['pid_started'], error, b1, b2, b3, accept_safety)
        x_new = x_high
        if noise is not None:
            x_new = x_new + su * s_noise * noise(_sigma(s), _sigma(t), st['n_accept'])
        new = dict(st, h=h, errs=errs, pid_started=jnp.bool_(True),
                   x=jnp.where(accept, x_new, x), x_prev=jnp.where(accept, x_low, st['x_prev']),
                   s=jnp.where(accept, t, s), n_accept=st['n_accept'] + accept, n_reject=st['n_reject'] + ~accept,
                   nfe=st['nfe'] + order, steps=st['steps'] + 1)
        _report(callback, x=new['x'], i=new['steps'] - 1, t=new['s'], t_up=new['s'], sigma=_sigma(new['s']),
                sigma_hat=_sigma(new['s']), denoised=denoised, error=error, h=h, steps=new['steps'], nfe=new['nfe'],
                n_accept=new['n_accept'], n_reject=new['n_reject'])
        return new

    final = lax.while_loop(not_done, attempt, state)
    if return_info:
        return final['x'], {k: final[k] for k in ('steps', 'nfe', 'n_accept', 'n_reject')}
    return final['x']


def _pid_propose(h, errs, started, error, b1, b2, b3, accept_safety, eps=1e-8):
    """One PID step-size proposal (k-diffusion's PIDStepSizeController.propose_step) on device.

    e = 1/(error + eps); the history (e₀, e₁, e₂) starts as (e, e, e), then e₀ = e; factor = e₀^b₁·e₁^b₂·e₂^b₃,
    limited to 1 + atan(factor − 1); accept iff factor ≥ accept_safety, and on accept the history shifts
    (e₂ ← e₁, e₁ ← e₀). h is scaled by the factor either way. Returns (accept, h, errs).
    """
    inv_error = 1 / (error + eps)
    errs = jnp.where(started, errs.at[0].set(inv_error), jnp.full([3], inv_error))
    factor = errs[0] ** b1 * errs[1] ** b2 * errs[2] ** b3
    factor = 1 + jnp.arctan(factor - 1)
    accept = factor >= accept_safety
    errs = jnp.where(accept, jnp.stack([errs[0], errs[0], errs[1]]), errs)
    return accept, h * factor, errs


SAMPLERS: dict[str, Callable] = {
    'euler': sample_euler,
    'euler_ancestral': sample_euler_ancestral,
    'heun': sample_heun,
    'dpm_2': sample_dpm_2,
    'dpm_2_ancestral': sample_dpm_2_ancestral,
    'lms': sample_lms,
    'dpm_fast': sample_dpm_fast,
    'dpm_adaptive': sample_dpm_adaptive,
    'dpmpp_2s_ancestral': sample_dpmpp_2s_ancestral,
    'dpmpp_sde': sample_dpmpp_sde,
    'dpmpp_2m': sample_dpmpp_2m,
    'dpmpp_2m_sde': sample_dpmpp_2m_sde,
    'dpmpp_3m_sde': sample_dpmpp_3m_sde,
}
