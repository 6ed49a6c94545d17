"""FID and KID between two feature sets, as k-diffusion 0.0.15's `evaluation.fid` / `evaluation.kid` define them.

For features X [m, d] and Y [n, d] (rows are images):

  FID(X, Y) = ‖μ_X − μ_Y‖² + tr(Σ_X + Σ_Y − 2 (Σ_X^½ Σ_Y Σ_X^½)^½),   Σ = unbiased covariance + ε·I  (ε = 1e-8),
  with A^½ = V |Λ|^½ Vᵀ from the eigendecomposition A = V Λ Vᵀ (as k-diffusion's `sqrtm_eig`);

  KID(X, Y) = mean over P partitions of MMD²_unbiased(X_p, Y_p) with the cubic polynomial kernel
  k(a, b) = (a·b / d + 1)³,  P = ⌈max(m, n) / max_size⌉ and partition p = rows [round(p·m/P), round((p+1)·m/P)).

Both are computed in float64 (JAX with x64 enabled for the call): FID takes square roots of the covariance's
eigenvalues, and with fewer samples than feature dimensions most of them are round-off around zero, which float32
would turn into an error of a few tenths.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def _sqrtm_eig(a):
    """V |Λ|^½ Vᵀ, reading the lower triangle of `a` only (LAPACK's convention, as torch.linalg.eigh)."""
    vals, vecs = jnp.linalg.eigh(a, UPLO='L', symmetrize_input=False)
    return (vecs * jnp.sqrt(jnp.abs(vals))) @ vecs.T


def _fid(x, y, eps):
    mean_term = jnp.sum((x.mean(0) - y.mean(0)) ** 2)
    eye = jnp.eye(x.shape[1], dtype=x.dtype) * eps
    x_cov = jnp.cov(x, rowvar=False) + eye
    y_cov = jnp.cov(y, rowvar=False) + eye
    x_cov_sqrt = _sqrtm_eig(x_cov)
    cov_term = jnp.trace(x_cov + y_cov - 2 * _sqrtm_eig(x_cov_sqrt @ y_cov @ x_cov_sqrt))
    return mean_term + cov_term


def _squared_mmd(x, y):
    d = x.shape[-1]
    kernel = lambda a, b: (a @ b.T / d + 1) ** 3
    m, n = x.shape[0], y.shape[0]
    kxx, kyy = kernel(x, x), kernel(y, y)
    kxx_sum = kxx.sum() - jnp.trace(kxx)
    kyy_sum = kyy.sum() - jnp.trace(kyy)
    return kxx_sum / m / (m - 1) + kyy_sum / n / (n - 1) - kernel(x, y).sum() * 2 / m / n


_fid_jit = jax.jit(_fid)
_squared_mmd_jit = jax.jit(_squared_mmd)


def _as_float64(features, name: str) -> jax.Array:
    a = np.asarray(features, np.float64)
    if a.ndim != 2 or a.shape[0] < 2:
        raise ValueError(f'{name}: expected features [n >= 2, d], got shape {a.shape}')
    if not np.isfinite(a).all():
        raise ValueError(f'{name}: features contain NaN or infinity')
    return jnp.asarray(a)


def fid(x, y, eps: float = 1e-8) -> float:
    """Fréchet Inception distance between feature sets x [m, d] and y [n, d] (float64)."""
    with jax.enable_x64(True):
        x, y = _as_float64(x, 'x'), _as_float64(y, 'y')
        if x.shape[1] != y.shape[1]:
            raise ValueError(f'feature sizes differ: {x.shape[1]} vs {y.shape[1]}')
        return float(_fid_jit(x, y, eps))


def kid(x, y, max_size: int = 5000) -> float:
    """Kernel Inception distance between feature sets x [m, d] and y [n, d] (float64), partitions of ≤ max_size."""
    with jax.enable_x64(True):
        x, y = _as_float64(x, 'x'), _as_float64(y, 'y')
        if x.shape[1] != y.shape[1]:
            raise ValueError(f'feature sizes differ: {x.shape[1]} vs {y.shape[1]}')
        m, n = x.shape[0], y.shape[0]
        parts = math.ceil(max(m / max_size, n / max_size))
        total = 0.
        for i in range(parts):  # Python's round(), as k-diffusion's (ties to even)
            total += float(_squared_mmd_jit(x[round(i * m / parts):round((i + 1) * m / parts)],
                                            y[round(i * n / parts):round((i + 1) * n / parts)]))
        return total / parts
