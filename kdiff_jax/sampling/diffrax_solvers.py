"""k-diffusion's deterministic samplers as diffrax solvers, and diffrax samplers of the probability-flow ODE.

Each solver integrates an ODETerm whose vector field is the PF-ODE f(σ, x) = dx/dσ = (x − D(x, σ))/σ (see
`diffrax_terms.probability_flow_term`) in time t = σ, one step per interval of a σ schedule:

    diffrax.diffeqsolve(probability_flow_term(model), DPMSolverPP2M(), t0=sigmas[0], t1=sigmas[-1], dt0=None,
                        y0=x, args=extra_args, stepsize_controller=diffrax.StepTo(ts=sigmas))

(`sample_diffrax` does exactly this.) With a k-diffusion schedule (ending in 0) the result equals the scan sampler of
the same name. A step from σ_i to σ_{i+1} (h = log σ_i − log σ_{i+1} where logs appear):

  Euler          x' = x + f(σ_i, x)·(σ_{i+1} − σ_i)
  Heun           x_e = x + f(σ_i, x)·Δσ;  x' = x + ½·(f(σ_i, x) + f(σ_{i+1}, x_e))·Δσ        (Euler if σ_{i+1} = 0)
  DPM2           σ_m = √(σ_i·σ_{i+1});  x_m = x + f(σ_i, x)·(σ_m − σ_i);  x' = x + f(σ_m, x_m)·Δσ   (Euler if 0)
  DPMSolverPP2M  D_i = D(x, σ_i);  D̄ = (1 + 1/(2r))·D_i − 1/(2r)·D_{i−1} with r = h_{i−1}/h_i
                 (D̄ = D_i on the first step and on a step to σ = 0);  x' = (σ_{i+1}/σ_i)·x − expm1(−h)·D̄
  LMS(order k)   x' = x + Σ_j c_j·f(σ_{i−j}, x_{i−j}),  c_j = ∫_{σ_i}^{σ_{i+1}} ℓ_j(τ) dτ, ℓ_j the Lagrange basis
                 on the last min(i+1, k) nodes σ_i, σ_{i−1}, … (computed exactly: 3-point Gauss–Legendre is exact
                 for these polynomials of degree ≤ 3)

The last step to σ = 0. f is singular at σ = 0, but no solver evaluates it there: Euler's step to 0 is
x + (x − D)/σ·(0 − σ) = D(x, σ_last), Heun and DPM2 fall back to that Euler step (k-diffusion's rule), DPM-Solver++
gives σ_{i+1}/σ_i = 0 and −expm1(−∞) = 1, i.e. x' = D (written as an explicit select), and LMS only integrates its
interpolating polynomial up to 0. So diffeqsolve's t1 may be exactly 0.

Time direction. diffeqsolve runs a decreasing integration (t1 < t0) on −t with its terms wrapped so that
`terms.vf(t, ·)` still evaluates f at σ = −t and `terms.contr(t0, t1)` is still Δσ. The solvers recover σ from that
(σ = t·sign(Δσ/(t1 − t0))), so they only use diffrax's public term interface; D is recovered as D = x − σ·f(σ, x).
They also integrate forwards (σ increasing), e.g. to encode data into noise.

Multistep solvers (DPM++(2M), LMS) keep their history — previous D or f values and σ's — in the solver state, so
`diffeqsolve` threads it through its compiled loop. None of these solvers has an error estimate: use them with
`StepTo` (a σ schedule) or `ConstantStepSize`. For adaptive sampling use `sample_ode_adaptive` with any adaptive
diffrax solver (Tsit5, Dopri5, …).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from kdiff_jax.sampling.diffrax_terms import denoise_at, probability_flow_term

__all__ = ['Euler', 'Heun', 'DPM2', 'DPMSolverPP2M', 'LMS', 'sample_diffrax', 'sample_ode_adaptive']

_RESULT_OK = diffrax.RESULTS.successful


def _sigmas(terms, t0, t1):
    """(σ0, σ1, Δσ, direction) of a step, in the caller's σ, whether or not diffeqsolve flipped time (module doc):
    σ = direction·t."""
    dsigma = terms.contr(t0, t1)
    direction = jnp.where(dsigma * (t1 - t0) < 0, -1, 1).astype(jnp.result_type(t0))
    return t0 * direction, t1 * direction, dsigma, direction


def _dense(y0, y1):
    return dict(y0=y0, y1=y1)


class _PFSolver(diffrax.AbstractSolver):
    """Shared parts: ODE terms only, linear dense output, no error estimate."""

    term_structure: ClassVar = diffrax.AbstractTerm
    interpolation_cls: ClassVar = diffrax.LocalLinearInterpolation

    def func(self, terms, t0, y0, args):
        return terms.vf(t0, y0, args)


class Euler(_PFSolver):
    """k-diffusion's `sample_euler` (no churn): x' = x + f(σ_i, x)·(σ_{i+1} − σ_i). A step to σ = 0 gives D(x, σ_i).

    1st order, 1 evaluation per step.
    """

    def order(self, terms):
        return 1

    def init(self, terms, t0, t1, y0, args):
        return None

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        del solver_state, made_jump
        _, _, dsigma, _ = _sigmas(terms, t0, t1)
        y1 = y0 + terms.vf(t0, y0, args) * dsigma
        return y1, None, _dense(y0, y1), None, _RESULT_OK


def _euler_or(second_stage: Callable, sigma1, y0, y_euler):
    """`y_euler` on a step to σ = 0 (k-diffusion's rule), else `second_stage()` — skipped at run time by lax.cond."""
    return jax.lax.cond(sigma1 == 0, lambda: y_euler, second_stage)


class Heun(_PFSolver):
    """k-diffusion's `sample_heun` (no churn): Heun's 2nd-order method (trapezoidal average of f at both ends of the
    step, the end point predicted by Euler), falling back to the Euler step when σ_{i+1} = 0.

    2 evaluations per step (1 on the last step to σ = 0).
    """

    def order(self, terms):
        return 2

    def init(self, terms, t0, t1, y0, args):
        return None

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        del solver_state, made_jump
        _, sigma1, dsigma, _ = _sigmas(terms, t0, t1)
        d = terms.vf(t0, y0, args)
        y_euler = y0 + d * dsigma

        def heun():
            d_2 = terms.vf(t1, y_euler, args)
            return y0 + (d + d_2) / 2 * dsigma

        y1 = _euler_or(heun, sigma1, y0, y_euler)
        return y1, None, _dense(y0, y1), None, _RESULT_OK


class DPM2(_PFSolver):
    """k-diffusion's `sample_dpm_2` (no churn): a midpoint step with the midpoint σ_m = exp(½(log σ_i + log σ_{i+1})),
    x_m = x + f(σ_i, x)·(σ_m − σ_i), x' = x + f(σ_m, x_m)·(σ_{i+1} − σ_i); Euler when σ_{i+1} = 0.

    2nd order, 2 evaluations per step (1 on the last step to σ = 0).
    """

    def order(self, terms):
        return 2

    def init(self, terms, t0, t1, y0, args):
        return None

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        del solver_state, made_jump
        sigma0, sigma1, dsigma, direction = _sigmas(terms, t0, t1)
        d = terms.vf(t0, y0, args)
        y_euler = y0 + d * dsigma

        def midpoint():
            sigma_mid = jnp.exp((jnp.log(sigma0) + jnp.log(sigma1)) / 2)
            t_mid = sigma_mid * direction  # in diffeqsolve's (possibly negated) time
            y_mid = y0 + d * (sigma_mid - sigma0)
            return y0 + terms.vf(t_mid, y_mid, args) * dsigma

        y1 = _euler_or(midpoint, sigma1, y0, y_euler)
        return y1, None, _dense(y0, y1), None, _RESULT_OK


class _PP2MState(eqx.Module):
    old_denoised: jax.Array
    h_last: jax.Array
    has_old: jax.Array


class DPMSolverPP2M(_PFSolver):
    """k-diffusion's `sample_dpmpp_2m`: DPM-Solver++(2M), a 2nd-order multistep method in λ = −log σ on the data
    prediction D (Lu et al., 2022).

    With h = log σ_i − log σ_{i+1} and r = h_{i−1}/h_i:
      D̄ = (1 + 1/(2r))·D(x_i, σ_i) − 1/(2r)·D(x_{i−1}, σ_{i−1})     (D̄ = D(x_i, σ_i) on the first and the last step)
      x_{i+1} = (σ_{i+1}/σ_i)·x_i − expm1(−h)·D̄ ,                  a step to σ = 0 gives x_{i+1} = D(x_i, σ_i).
    The previous D and h live in the solver state. 1 evaluation per step.
    """

    def order(self, terms):
        return 2

    def init(self, terms, t0, t1, y0, args):
        dtype = jnp.result_type(t0)
        return _PP2MState(jnp.zeros_like(y0), jnp.zeros((), dtype), jnp.array(False))

    def step(self, terms, t0, t1, y0, args, solver_state: _PP2MState, made_jump):
        del made_jump
        sigma0, sigma1, _, _ = _sigmas(terms, t0, t1)
        to_zero = sigma1 == 0
        denoised = y0 - sigma0 * terms.vf(t0, y0, args)
        safe_sigma1 = jnp.where(to_zero, sigma0, sigma1)
        h = jnp.where(to_zero, 1., jnp.log(sigma0) - jnp.log(safe_sigma1))
        use_history = solver_state.has_old & ~to_zero
        r = jnp.where(use_history, solver_state.h_last / h, 1.)
        denoised_d = jnp.where(use_history, (1 + 1 / (2 * r)) * denoised - 1 / (2 * r) * solver_state.old_denoised,
                               denoised)
        y_step = (safe_sigma1 / sigma0) * y0 - jnp.expm1(-h) * denoised_d
        y1 = jnp.where(to_zero, denoised, y_step)
        state = _PP2MState(denoised, h, jnp.array(True))
        return y1, None, _dense(y0, y1), state, _RESULT_OK


class _LMSState(eqx.Module):
    ds: jax.Array        # [order − 1, *y.shape]: f at the previous nodes, newest first
    sigmas: jax.Array    # [order − 1]: those nodes' σ, newest first
    count: jax.Array     # steps taken so far


# 3-point Gauss–Legendre rule on [0, 1]: exact for polynomials of degree ≤ 5.
_GL_U = (0.5 - np.sqrt(15.) / 10, 0.5, 0.5 + np.sqrt(15.) / 10)
_GL_W = (5. / 18, 8. / 18, 5. / 18)


def _lms_coefficients(nodes, sigma_next, order: int):
    """c_j = ∫_{σ_0}^{σ_next} ℓ_j(τ) dτ for j < order, ℓ_j the Lagrange basis polynomial on nodes[:order]
    (nodes[0] = σ_i the current node, then older ones). Returns a length-len(nodes) vector, zero past `order`.

    Exact for order ≤ 4: ℓ_j has degree order − 1 ≤ 3 and the 3-point Gauss–Legendre rule on τ = σ_0 + u·(σ_next − σ_0)
    integrates degree ≤ 5 exactly. Shifting to σ_0 keeps the float32 products well conditioned.
    """
    width = nodes.shape[0]
    step = sigma_next - nodes[0]
    coeffs = []
    for j in range(width):
        if j >= order:
            coeffs.append(jnp.zeros((), nodes.dtype))
            continue
        total = jnp.zeros((), nodes.dtype)
        for u, w in zip(_GL_U, _GL_W):
            tau = nodes[0] + step * u
            basis = 1.
            for m in range(order):
                if m != j:
                    basis = basis * (tau - nodes[m]) / (nodes[j] - nodes[m])
            total = total + w * basis
        coeffs.append(step * total)
    return jnp.stack(coeffs)


class LMS(_PFSolver):
    """k-diffusion's `sample_lms`: the linear multistep (Adams–Bashforth) method on the σ grid, order `order` (4).

    x_{i+1} = x_i + Σ_{j<k} c_j·f(σ_{i−j}, x_{i−j}), k = min(i + 1, order), c_j = ∫_{σ_i}^{σ_{i+1}} ℓ_j(τ) dτ with ℓ_j
    the Lagrange basis on σ_i, …, σ_{i−k+1} (the polynomial through the last k derivatives, integrated over the
    step). The previous order − 1 derivatives and their σ live in the solver state. 1 evaluation per step; the step
    to σ = 0 integrates the polynomial and never evaluates f there. Order ≤ 4 (the exactness of `_lms_coefficients`).
    """

    lms_order: int = eqx.field(static=True)

    def __init__(self, order: int = 4):
        if int(order) != order or not 1 <= order <= 4:
            raise ValueError(f'LMS order must be 1, 2, 3 or 4, got {order!r}')
        self.lms_order = int(order)

    def order(self, terms):
        return self.lms_order

    def init(self, terms, t0, t1, y0, args):
        k = self.lms_order - 1
        dtype = jnp.result_type(t0)
        return _LMSState(jnp.zeros((k,) + y0.shape, y0.dtype), jnp.ones((k,), dtype), jnp.zeros((), jnp.int32))

    def step(self, terms, t0, t1, y0, args, solver_state: _LMSState, made_jump):
        del made_jump
        sigma0, sigma1, _, _ = _sigmas(terms, t0, t1)
        d = terms.vf(t0, y0, args)
        ds = jnp.concatenate([d[None], solver_state.ds]) if self.lms_order > 1 else d[None]
        nodes = jnp.concatenate([sigma0[None], solver_state.sigmas]) if self.lms_order > 1 else sigma0[None]
        cur_order = jnp.minimum(solver_state.count + 1, self.lms_order)
        table = jnp.stack([_lms_coefficients(nodes, sigma1, k) for k in range(1, self.lms_order + 1)])
        coeffs = table[cur_order - 1].astype(y0.dtype)
        y1 = y0 + jnp.tensordot(coeffs, ds, axes=1)
        state = _LMSState(ds[:-1] if self.lms_order > 1 else solver_state.ds,
                          nodes[:-1] if self.lms_order > 1 else solver_state.sigmas,
                          solver_state.count + 1)
        return y1, None, _dense(y0, y1), state, _RESULT_OK


def _progress_meter(disable):
    return diffrax.NoProgressMeter() if disable is None or disable else diffrax.TqdmProgressMeter()


def _callback_saveat(model, callback, args):
    """SaveAt whose second sub-save sends k-diffusion's callback fields to the host at the start and after every
    step: {x, i, sigma, sigma_hat, denoised} for each σ > 0 the solver reaches (so with a schedule ending in 0 the
    calls are k-diffusion's: x at σ_0 … σ_{n−1} and D there). `i` counts on the host; the repeated state of a
    rejected adaptive step is skipped. D costs one extra model evaluation per call."""
    seen = {'i': 0, 'last': None}

    def host(x, sigma, denoised):
        sigma_f = float(sigma)
        if seen['last'] == sigma_f:
            return
        seen['last'] = sigma_f
        callback({'x': x, 'i': seen['i'], 'sigma': sigma, 'sigma_hat': sigma, 'denoised': denoised})
        seen['i'] += 1

    def fn(t, y, fn_args):
        sigma = jnp.abs(t)

        def send():
            jax.debug.callback(host, y, sigma, denoise_at(model, y, sigma, args), ordered=True)

        jax.lax.cond(sigma > 0, send, lambda: None)
        return jnp.zeros((), y.dtype)

    return diffrax.SaveAt(subs=[diffrax.SubSaveAt(t1=True), diffrax.SubSaveAt(t0=True, steps=True, fn=fn)])


def sample_diffrax(model: Callable, x, sigmas, extra_args: dict[str, Any] | None = None, callback=None,
                   disable=None, solver: diffrax.AbstractSolver | None = None, max_steps: int | None = None):
    """A fixed-schedule sampler: diffeqsolve of the PF-ODE with `solver` (default `DPMSolverPP2M()`) stepping exactly
    on `sigmas` (StepTo), from sigmas[0] to sigmas[-1] (0 for k-diffusion schedules). Returns x at sigmas[-1].

    Same call convention as the scan samplers; `callback` (optional, host) receives {x, i, sigma, sigma_hat,
    denoised} before each step, as k-diffusion's (one extra model evaluation per step when given; see
    `_callback_saveat`). `disable=False` shows diffrax's tqdm progress bar.
    """
    solver = DPMSolverPP2M() if solver is None else solver
    sigmas = jnp.asarray(sigmas, jnp.float32)
    if sigmas.ndim != 1 or sigmas.shape[0] < 2:
        raise ValueError(f'sigmas must be a 1-D schedule of at least 2 values, got shape {sigmas.shape}')
    steps = sigmas.shape[0] - 1
    saveat = diffrax.SaveAt(t1=True) if callback is None else _callback_saveat(model, callback, extra_args)
    sol = diffrax.diffeqsolve(probability_flow_term(model), solver, t0=sigmas[0], t1=sigmas[-1], dt0=None, y0=x,
                              args=extra_args, saveat=saveat, stepsize_controller=diffrax.StepTo(ts=sigmas),
                              max_steps=steps if max_steps is None else max_steps, throw=False,
                              progress_meter=_progress_meter(disable))
    return sol.ys[-1] if callback is None else sol.ys[0][-1]


def sample_ode_adaptive(model: Callable, x, sigma_min, sigma_max, extra_args: dict[str, Any] | None = None,
                        callback=None, disable=None, solver: diffrax.AbstractSolver | None = None,
                        rtol: float = 1e-3, atol: float = 1e-3, pcoeff: float = 0., icoeff: float = 1.,
                        dcoeff: float = 0., h_init: float | None = None, max_steps: int = 4096,
                        denoise: bool = True, return_info: bool = False, throw: bool = False,
                        stepsize_controller: diffrax.AbstractStepSizeController | None = None):
    """Adaptive sampling of the PF-ODE from σ_max to σ_min with any adaptive diffrax solver and a PID controller.

    Solves dx/dσ = (x − D(x, σ))/σ with `solver` (default `diffrax.Tsit5()`) under
    `diffrax.PIDController(rtol, atol, pcoeff, icoeff, dcoeff)` (error ‖err / (atol + rtol·|x|)‖_RMS ≤ 1 per
    accepted step; pcoeff = dcoeff = 0, icoeff = 1 is the classical I-controller, k-diffusion's dpm_adaptive
    default), first step `h_init` (in σ; None: diffrax's automatic choice). A ready-made `stepsize_controller`
    (e.g. a PIDController with dtmin, or ClipStepSizeController) replaces the one built from rtol, atol and the
    coefficients. The whole loop is one compiled `lax.while_loop`.

    Final step: with `denoise=True` (default) the sample is D(x(σ_min), σ_min) — the last step of every
    k-diffusion sampler whose schedule ends in 0, so σ_min = 0.01 gives a clean image. `denoise=False` returns
    x(σ_min) itself, which is what k-diffusion's `sample_dpm_adaptive` returns (its loop ends at σ_min).

    Returns the sample, or (sample, info) with `return_info`: info = {'steps', 'n_accept', 'n_reject'} (device
    integers; accepted + rejected solver steps, not model evaluations) and 'success' (False if diffrax stopped early).
    `callback` (host, optional) gets {x, i, sigma, sigma_hat, denoised} at σ_max and after each accepted step (one
    extra model evaluation per attempted step when given). `throw=False` (default) never stops the program on a
    failed solve (e.g. max_steps reached; error checks would also put a host callback into sharded programs and
    replicate the output): check info['success'] instead.
    """
    solver = diffrax.Tsit5() if solver is None else solver
    sigma_min = jnp.asarray(sigma_min, jnp.float32)
    sigma_max = jnp.asarray(sigma_max, jnp.float32)
    controller = stepsize_controller if stepsize_controller is not None else diffrax.PIDController(
        rtol=rtol, atol=atol, pcoeff=pcoeff, icoeff=icoeff, dcoeff=dcoeff)
    saveat = diffrax.SaveAt(t1=True) if callback is None else _callback_saveat(model, callback, extra_args)
    sol = diffrax.diffeqsolve(probability_flow_term(model), solver, t0=sigma_max, t1=sigma_min,
                              dt0=None if h_init is None else -abs(h_init), y0=x, args=extra_args, saveat=saveat,
                              stepsize_controller=controller, max_steps=max_steps, throw=throw,
                              progress_meter=_progress_meter(disable))
    x_min = sol.ys[-1] if callback is None else sol.ys[0][-1]
    out = denoise_at(model, x_min, sigma_min, extra_args) if denoise else x_min
    if not return_info:
        return out
    stats = sol.stats
    info = {'steps': stats['num_steps'], 'n_accept': stats['num_accepted_steps'],
            'n_reject': stats['num_rejected_steps'], 'success': sol.result == diffrax.RESULTS.successful}
    return out, info
