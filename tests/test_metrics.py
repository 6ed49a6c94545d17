"""FID and KID equal k-diffusion 0.0.15's `evaluation.fid` / `evaluation.kid` on the same features, and FID agrees
with the closed form between Gaussians."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdiff_jax.evaluation.metrics import fid, kid
from tests.parity import K


def _feature_sets(m, n, d, seed=0):
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((d, d)) / np.sqrt(d)
    x = rng.standard_normal((m, d)) @ mix
    y = (rng.standard_normal((n, d)) * 1.3 + 0.2) @ mix + rng.standard_normal((n, d)) * 0.1
    return x, y


@pytest.mark.parametrize('m,n,d', [(500, 400, 64), (300, 260, 2048)], ids=['full-rank', 'rank-deficient-2048'])
def test_fid_and_kid_equal_k_diffusion(m, n, d):
    x, y = _feature_sets(m, n, d)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)  # float64, as ours
    assert fid(x, y) == pytest.approx(K.evaluation.fid(tx, ty).item(), rel=1e-5)
    assert kid(x, y) == pytest.approx(K.evaluation.kid(tx, ty).item(), rel=1e-5)


def test_kid_partitions_equal_k_diffusion():
    """Unequal sizes over 3 partitions (rounded boundaries, Python's round as k-diffusion's)."""
    x, y = _feature_sets(131, 107, 32, seed=1)
    ours = kid(x, y, max_size=50)
    theirs = K.evaluation.kid(torch.from_numpy(x), torch.from_numpy(y), max_size=50).item()
    assert ours == pytest.approx(theirs, rel=1e-5)
    assert ours != pytest.approx(kid(x, y), rel=1e-3)  # partitioning changes the estimate


def test_fid_matches_the_closed_form_between_gaussians():
    """FID(N(μ1, Σ1), N(μ2, Σ2)) = ‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2(Σ1^½ Σ2 Σ1^½)^½); for diagonal covariances
    ‖μ1 − μ2‖² + Σ_k (σ1_k − σ2_k)²."""
    rng = np.random.default_rng(2)
    d, n = 6, 200_000
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = rng.uniform(0.5, 2., d), rng.uniform(0.5, 2., d)
    exact = np.sum((mu1 - mu2) ** 2) + np.sum((s1 - s2) ** 2)
    x = mu1 + s1 * rng.standard_normal((n, d))
    y = mu2 + s2 * rng.standard_normal((n, d))
    assert fid(x, y) == pytest.approx(exact, rel=0.02)
    assert fid(x, x) == pytest.approx(0., abs=1e-6)
    # KID is an unbiased estimate: near 0 between two samples of one distribution, not between different ones
    assert abs(kid(x[:3000], x[3000:6000])) < 0.05 * kid(x[:3000], y[:3000])


def test_bad_features_are_refused():
    x, y = _feature_sets(20, 20, 8)
    bad = x.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match='NaN'):
        fid(bad, y)
    with pytest.raises(ValueError, match='feature sizes differ'):
        kid(x, y[:, :4])
    with pytest.raises(ValueError, match=r'\[n >= 2, d\]'):
        fid(x[:1], y)
