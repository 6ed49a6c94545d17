"""σ schedules equal k-diffusion 0.0.15's within float32 rounding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdiff_jax import sampling
from tests.oracle import import_k_diffusion

K = import_k_diffusion()

NS = [1, 2, 10, 50, 257]
ULP = 2 ** -23  # float32 relative spacing

CASES = {
    'karras': (lambda n: sampling.get_sigmas_karras(n, 0.01, 80.),
               lambda n: K.sampling.get_sigmas_karras(n, 0.01, 80.)),
    'karras_rho3': (lambda n: sampling.get_sigmas_karras(n, 0.002, 160., rho=3.),
                    lambda n: K.sampling.get_sigmas_karras(n, 0.002, 160., rho=3.)),
    'karras_min0': (lambda n: sampling.get_sigmas_karras(n, 0., 10.),
                    lambda n: K.sampling.get_sigmas_karras(n, 0., 10.)),
    'exponential': (lambda n: sampling.get_sigmas_exponential(n, 0.01, 80.),
                    lambda n: K.sampling.get_sigmas_exponential(n, 0.01, 80.)),
    'polyexponential': (lambda n: sampling.get_sigmas_polyexponential(n, 0.01, 80.),
                        lambda n: K.sampling.get_sigmas_polyexponential(n, 0.01, 80.)),
    'polyexponential_rho2': (lambda n: sampling.get_sigmas_polyexponential(n, 0.03, 14.6, rho=2.),
                             lambda n: K.sampling.get_sigmas_polyexponential(n, 0.03, 14.6, rho=2.)),
    'vp': (lambda n: sampling.get_sigmas_vp(n), lambda n: K.sampling.get_sigmas_vp(n)),
    'vp_params': (lambda n: sampling.get_sigmas_vp(n, beta_d=10., beta_min=0.5, eps_s=1e-2),
                  lambda n: K.sampling.get_sigmas_vp(n, beta_d=10., beta_min=0.5, eps_s=1e-2)),
}


def _oracle(ref_fn, n, dtype):
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return ref_fn(n).numpy().astype(np.float64)
    finally:
        torch.set_default_dtype(default)


@pytest.mark.parametrize('n', NS)
@pytest.mark.parametrize('name', list(CASES))
def test_schedule_matches_k_diffusion(name, n):
    """Ours are k-diffusion's formula in float64 rounded once to float32: ≤ 1 ulp from the oracle run in float64.
    (Not compared with the oracle's float32 run, which rounds at every operation, errors that ρ = 7 powers and the
    VP schedule's exp(·) − 1 amplify: ours are the float64 values rounded once.)"""
    ours_fn, ref_fn = CASES[name]
    ours = ours_fn(n)
    assert ours.dtype == np.float32 and ours.shape == (n + 1,)
    assert float(ours[-1]) == 0.
    ours = np.asarray(ours, np.float64)
    np.testing.assert_allclose(ours, _oracle(ref_fn, n, torch.float64), rtol=ULP, atol=0)


def test_append_zero_and_get_sigmas():
    np.testing.assert_array_equal(np.asarray(sampling.append_zero(np.array([3., 2.], np.float32))), [3., 2., 0.])
    np.testing.assert_array_equal(np.asarray(sampling.get_sigmas('karras', 7, 0.1, 10.)),
                                  np.asarray(sampling.get_sigmas_karras(7, 0.1, 10., rho=7.)))
    np.testing.assert_array_equal(np.asarray(sampling.get_sigmas('polyexponential', 7, 0.1, 10.)),
                                  np.asarray(sampling.get_sigmas_polyexponential(7, 0.1, 10., rho=1.)))
    with pytest.raises(ValueError, match='unknown schedule'):
        sampling.get_sigmas('cosine', 7, 0.1, 10.)


@pytest.mark.parametrize('args,message', [((0, 0.1, 10.), 'integer >= 1, got 0'),
                                          ((5, 10., 0.1), 'sigma_min < sigma_max'),
                                          ((5, 0.1, 0.1), 'sigma_min < sigma_max'),
                                          ((2.5, 0.1, 10.), 'integer >= 1, got 2.5')])
def test_bad_arguments_raise(args, message):
    with pytest.raises(ValueError, match=message):
        sampling.get_sigmas_exponential(*args)
