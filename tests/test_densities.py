"""Training σ densities equal k-diffusion's on the same underlying draws, and configs map to the same parameters."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
import torch

from kdiff_jax import densities
from tests.oracle import import_k_diffusion
from tests.parity import rel_err

K = import_k_diffusion()
SHAPE = (4096,)


def _draws(seed, *kinds):
    """Re-create the draws that k-diffusion's sampler makes after torch.manual_seed(seed), in its order."""
    torch.manual_seed(seed)
    out = []
    for kind in kinds:
        if kind == 'normal':
            out.append(torch.randn(SHAPE).numpy())
        elif kind == 'uniform':
            out.append(torch.rand(SHAPE).numpy())
        else:  # float64 uniform, as rand_log_logistic draws it
            out.append(torch.rand(SHAPE, dtype=torch.float64).numpy().astype(np.float32))
    return out


def _oracle(seed, fn, **kwargs):
    torch.manual_seed(seed)
    return fn(SHAPE, **kwargs).numpy()


CASES = [
    ('lognormal', K.utils.rand_log_normal, dict(loc=-1.2, scale=1.2), densities.log_normal_from, ['normal']),
    ('loglogistic', K.utils.rand_log_logistic, dict(loc=math.log(0.5), scale=0.5, min_value=1e-2, max_value=80.),
     densities.log_logistic_from, ['uniform64']),
    ('loglogistic_untruncated', K.utils.rand_log_logistic, dict(loc=0.3, scale=0.7), densities.log_logistic_from,
     ['uniform64']),
    ('loguniform', K.utils.rand_log_uniform, dict(min_value=1e-2, max_value=80.), densities.log_uniform_from,
     ['uniform']),
    ('v-diffusion', K.utils.rand_v_diffusion, dict(sigma_data=0.5, min_value=1e-3, max_value=1e3),
     densities.v_diffusion_from, ['uniform']),
    ('split-lognormal', K.utils.rand_split_log_normal, dict(loc=-0.5, scale_1=1.0, scale_2=1.6),
     densities.split_log_normal_from, ['normal', 'uniform']),
]


@pytest.mark.parametrize('name,oracle_fn,kwargs,ours_fn,draws', CASES, ids=[c[0] for c in CASES])
def test_density_transform_matches_k_diffusion(name, oracle_fn, kwargs, ours_fn, draws):
    ref = _oracle(7, oracle_fn, **kwargs)
    ours = np.asarray(ours_fn(*_draws(7, *draws), **kwargs))
    assert rel_err(np.log(ours), np.log(ref)) < 1e-5


DENSITY_CONFIGS = [
    {'type': 'lognormal', 'mean': -1.2, 'std': 1.2},
    {'type': 'lognormal', 'loc': 0.1, 'scale': 0.9},
    {'type': 'loglogistic'},
    {'type': 'loglogistic', 'loc': 0.2, 'scale': 0.3, 'min_value': 0.01, 'max_value': 50.},
    {'type': 'loguniform'},
    {'type': 'loguniform', 'min_value': 0.1, 'max_value': 10.},
    {'type': 'v-diffusion'},
    {'type': 'cosine', 'min_value': 0.01},
    {'type': 'split-lognormal', 'mean': -0.5, 'std_1': 1.0, 'std_2': 1.6},
    {'type': 'split-lognormal', 'loc': -0.5, 'scale_1': 1.0, 'scale_2': 1.6},
]


@pytest.mark.parametrize('sd', DENSITY_CONFIGS, ids=lambda sd: '-'.join(f'{v}' for v in sd.values()))
def test_make_sample_density_takes_k_diffusion_parameters(sd):
    model = {'sigma_sample_density': sd, 'sigma_data': 0.5, 'sigma_min': 0.02, 'sigma_max': 60.}
    ref, ours = K.config.make_sample_density(model), densities.make_sample_density(model)
    assert ours.func.__name__ == ref.func.__name__
    assert ours.keywords == pytest.approx(ref.keywords)
    sigmas = np.asarray(ours(jax.random.key(0), (1000,)))
    assert sigmas.shape == (1000,) and np.isfinite(sigmas).all() and (sigmas > 0).all()


def test_unknown_density_is_an_error():
    with pytest.raises(ValueError, match='unknown sigma_sample_density type'):
        densities.make_sample_density({'sigma_sample_density': {'type': 'gamma'}, 'sigma_data': 1.})
