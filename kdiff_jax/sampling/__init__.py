"""Sampling: σ schedules, k-diffusion's samplers as compiled JAX loops, per-sample noise, and a compiled driver.

See samplers.py for the shared conventions (model signature, noise_sampler(sigma, sigma_next, i), key, callback)
and the order of noise draws of each sampler; noise.py for how randomness derives from (seed, sample index).
"""

from .diffrax_solvers import (DPM2, LMS, DPMSolverPP2M, Euler, Heun, sample_diffrax, sample_ode_adaptive)
from .diffrax_terms import PerSampleBrownianPath, ProbabilityFlowField, probability_flow_term, reverse_sde_terms
from .likelihood import draw_probes, log_likelihood
from .api import RANGE_SAMPLERS, SCHEDULES, get_sampler, get_sigmas, sample, sampler_names
from .noise import (BrownianTreeNoiseSampler, as_sample_keys, default_noise_sampler, initial_noise,
                    sample_keys)
from .samplers import (SAMPLERS, get_ancestral_step, lms_coefficients, sample_dpm_2, sample_dpm_2_ancestral,
                       sample_dpm_adaptive, sample_dpm_fast, sample_dpmpp_2m, sample_dpmpp_2m_sde,
                       sample_dpmpp_2s_ancestral, sample_dpmpp_3m_sde, sample_dpmpp_sde, sample_euler,
                       sample_euler_ancestral, sample_heun, sample_lms, to_d)
from .schedules import (append_zero, get_sigmas_exponential, get_sigmas_karras, get_sigmas_polyexponential,
                        get_sigmas_vp)

__all__ = [
    'DPM2', 'LMS', 'DPMSolverPP2M', 'Euler', 'Heun', 'PerSampleBrownianPath', 'ProbabilityFlowField',
    'draw_probes', 'log_likelihood', 'probability_flow_term', 'reverse_sde_terms', 'sample_diffrax',
    'sample_ode_adaptive',
    'BrownianTreeNoiseSampler', 'RANGE_SAMPLERS', 'SAMPLERS', 'SCHEDULES', 'append_zero', 'as_sample_keys',
    'default_noise_sampler', 'get_ancestral_step', 'get_sampler', 'get_sigmas', 'get_sigmas_exponential',
    'get_sigmas_karras', 'get_sigmas_polyexponential', 'get_sigmas_vp', 'initial_noise', 'lms_coefficients', 'sample',
    'sample_dpm_2', 'sample_dpm_2_ancestral', 'sample_dpm_adaptive', 'sample_dpm_fast', 'sample_dpmpp_2m',
    'sample_dpmpp_2m_sde', 'sample_dpmpp_2s_ancestral', 'sample_dpmpp_3m_sde', 'sample_dpmpp_sde', 'sample_euler',
    'sample_euler_ancestral', 'sample_heun', 'sample_keys', 'sample_lms', 'sampler_names', 'to_d',
]
