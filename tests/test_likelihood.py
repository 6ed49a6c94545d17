"""`log_likelihood` (kdiff_jax.sampling.likelihood): the closed form, k-diffusion's, and a sharded run under jit.

Closed form. For N(μ, s²) data, log p(x; σ_min) = log N(x; μ, (s² + σ_min²)·I) exactly; the likelihood's only
approximations are the ODE tolerance and the prior N(0, σ_max²) in place of N(μ, s² + σ_max²) (≈ s²/σ_max² per
dimension). The Jacobian of f = (x − D)/σ is diagonal, diag(σ/(s² + σ²)), so a Rademacher probe v (v_i² = 1) gives
vᵀJv = Σ_i J_ii = tr J exactly: one probe is as good as the exact trace. A Gaussian probe gives Σ_i z_i²·J_ii instead,
unbiased with variance 2·Σ_i J_ii²; fixed along the trajectory, the integrated estimate has standard deviation
√(2/k·Σ_i I_i²), I_i = ∫ J_ii dσ = ½·log((s_i² + σ_max²)/(s_i² + σ_min²)) ≈ 4.9 nats per dimension here — far
larger than 1% of log p, so Gaussian probes are tested for unbiasedness against that standard deviation.

k-diffusion. Its `log_likelihood` draws one Rademacher probe with `torch.randint_like(x, 2) * 2 - 1`; the test
makes that call return our probe, so both integrate the same estimator and differ only by the ODE solvers'
tolerance-level errors.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from kdiff_jax.gaussian import GaussianDenoiser
from kdiff_jax.sampling.likelihood import draw_probes, log_likelihood
from tests.host_devices import host_devices_flags
from tests.parity import K, make_pair, nchw, small_config

SIGMA_MIN, SIGMA_MAX = 0.01, 80.
SHAPE = (4, 4, 4, 1)
ROOT = Path(__file__).resolve().parents[1]


def gaussian():
    mean = 0.3 * jax.random.normal(jax.random.PRNGKey(1), SHAPE[1:])
    scale = 0.3 + 0.4 * jax.random.uniform(jax.random.PRNGKey(2), SHAPE[1:])
    return GaussianDenoiser(mean, scale)


@pytest.fixture(scope='module')
def data():
    g = gaussian()
    x = g.sample(jax.random.PRNGKey(3), SHAPE, SIGMA_MIN)
    return g, x, np.asarray(g.log_prob(x, SIGMA_MIN))


@pytest.mark.parametrize('kwargs', [dict(probe='exact'), dict(key=0), dict(key=1, n_probes=3)],
                         ids=['exact', 'rademacher1', 'rademacher3'])
def test_closed_form_within_one_percent(data, kwargs):
    g, x, ref = data
    ll, info = log_likelihood(g, x, SIGMA_MIN, SIGMA_MAX, **kwargs)
    assert bool(info['success'])
    np.testing.assert_array_less(np.abs(np.asarray(ll) - ref), 0.01 * np.abs(ref))


def test_rademacher_equals_exact_trace_on_gaussian(data):
    """The diagonal Jacobian makes any Rademacher probe exact: same value as the trace, up to float rounding."""
    g, x, _ = data
    exact, _ = log_likelihood(g, x, SIGMA_MIN, SIGMA_MAX, probe='exact')
    for key in (0, 5):
        ll, _ = log_likelihood(g, x, SIGMA_MIN, SIGMA_MAX, key=key)
        np.testing.assert_allclose(ll, exact, rtol=1e-5, atol=1e-4)


def test_gaussian_probes_unbiased(data):
    g, x, ref = data
    k = 256
    ll, _ = log_likelihood(g, x, SIGMA_MIN, SIGMA_MAX, key=2, n_probes=k, probe='gaussian')
    s2 = np.asarray(g.scale, np.float64) ** 2
    integral = 0.5 * np.log((s2 + SIGMA_MAX ** 2) / (s2 + SIGMA_MIN ** 2))
    std = math.sqrt(2 / k * np.sum(integral ** 2))
    err = np.asarray(ll, np.float64) - ref
    assert np.all(np.abs(err) < 5 * std), (err, std)
    assert abs(err.mean()) < 4 * std / math.sqrt(len(err)), (err, std)
    assert np.any(np.abs(err) > 1e-3)  # not exact, unlike Rademacher probes


def test_probes_are_per_sample_and_validated(data):
    g, x, _ = data
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(0), i))(jnp.arange(4))
    full = draw_probes(keys, x, 2)
    assert full.shape == (2, *x.shape) and set(np.unique(np.asarray(full))) == {-1., 1.}
    np.testing.assert_array_equal(draw_probes(keys[1:3], x[1:3], 2), full[:, 1:3])
    with pytest.raises(ValueError, match='key'):
        log_likelihood(g, x, SIGMA_MIN, SIGMA_MAX)
    with pytest.raises(ValueError, match='probe'):
        log_likelihood(g, x, SIGMA_MIN, SIGMA_MAX, key=0, probe='sobol')
    with pytest.raises(ValueError, match='probes must have shape'):
        log_likelihood(g, x, SIGMA_MIN, SIGMA_MAX, probes=jnp.ones((1, 2, 4, 4, 1)))
    # a reversed, empty or non-positive range is refused (k-diffusion's solver refuses them too); it used to
    # integrate to a finite, wrong ll with info['success'] True
    for low, high in ((SIGMA_MAX, SIGMA_MIN), (1., 1.), (0., SIGMA_MAX), (-1., SIGMA_MAX)):
        with pytest.raises(ValueError, match='need 0 < sigma_min < sigma_max'):
            log_likelihood(g, x, low, high, key=0)


def test_matches_k_diffusion_with_the_same_probe(monkeypatch):
    """A converted random-weight U-Net (8×8, 2 stages) in both frameworks, the same Rademacher probe: the two
    dopri5 solves agree to the ODE tolerance (rtol = atol = 1e-4)."""
    config = small_config(input_size=[8, 8], depths=[1, 1], channels=[16, 16], self_attn_depths=[False, True])
    torch_model, model = make_pair(config)
    x = (np.random.default_rng(0).standard_normal((2, 8, 8, 3)) * 0.5).astype(np.float32)
    probes = draw_probes(0, jnp.asarray(x), 1)
    probe_nchw = nchw(np.asarray(probes[0]))
    monkeypatch.setattr(torch, 'randint_like', lambda t, high: ((probe_nchw + 1) / 2).to(t.dtype))
    theirs, _ = K.sampling.log_likelihood(torch_model, nchw(x), SIGMA_MIN, SIGMA_MAX)
    ours, info = log_likelihood(model, x, SIGMA_MIN, SIGMA_MAX, probes=probes)
    theirs = theirs.numpy()
    assert bool(info['success'])
    np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-3)


SHARDED = textwrap.dedent('''
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from kdiff_jax.gaussian import GaussianDenoiser
    from kdiff_jax.sampling.likelihood import log_likelihood

    assert len(jax.devices()) == 2, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ('batch',))
    g = GaussianDenoiser(jnp.linspace(-0.5, 0.5, 16).reshape(4, 4, 1), 0.5)
    x = g.sample(jax.random.PRNGKey(0), (4, 4, 4, 1), 0.01)
    xs = jax.device_put(x, NamedSharding(mesh, P('batch')))
    run = jax.jit(lambda g, x, key: log_likelihood(g, x, 0.01, 80., key=key)[0])
    ll = run(g, xs, jax.random.PRNGKey(1)).block_until_ready()
    assert ll.sharding.spec == P('batch'), ll.sharding
    single = run(g, x, jax.random.PRNGKey(1))
    np.testing.assert_allclose(ll, single, rtol=1e-5)
    ref = g.log_prob(x, 0.01)
    np.testing.assert_array_less(np.abs(ll - ref), 0.01 * np.abs(ref))
    print('SHARDED_OK', ll)
''')


def test_sharded_two_devices_under_jit():
    env = dict(os.environ, XLA_FLAGS=host_devices_flags(2), JAX_PLATFORMS='cpu',
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get('PYTHONPATH')])))
    proc = subprocess.run([sys.executable, '-c', SHARDED], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0 and 'SHARDED_OK' in proc.stdout, proc.stdout + proc.stderr
