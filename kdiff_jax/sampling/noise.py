"""Per-sample randomness for the samplers: every draw derives from (seed, sample index, draw index).

Keys. `sample_keys(seed, indices)` gives sample n the key k_n = fold_in(PRNGKey(seed), indices[n]). Everything random
about sample n comes from k_n alone, through three independent streams:

  stream 0  initial noise          normal(fold_in(k_n, 0), shape)                      (`initial_noise`)
  stream 1  per-step draws         draw i: normal(fold_in(fold_in(k_n, 1), i), shape)  (`default_noise_sampler`)
  stream 2  Brownian motion        a virtual Brownian tree keyed by fold_in(k_n, 2)    (`BrownianTreeNoiseSampler`)

so a sample is the same whether it is drawn alone, in a batch of 64 or on several devices: nothing depends on its
position in the batch.

Noise samplers. A sampler's `noise_sampler` is a pure function `noise_sampler(sigma, sigma_next, i) -> array like x`
(k-diffusion's `noise_sampler(sigma, sigma_next)` plus the integer index `i` of the draw, counted in the order
k-diffusion makes its draws). It must be traceable: it is called inside `lax.scan` / `lax.while_loop`.
"""

from __future__ import annotations

import diffrax
import jax
import jax.numpy as jnp

INITIAL_STREAM, STEP_STREAM, BROWNIAN_STREAM = 0, 1, 2

# The Brownian tree lives on [0, 1] (σ mapped linearly onto it) and is resolved to this fraction of its interval;
# below it diffrax interpolates with the exact Brownian-bridge law, so this only bounds the tree's depth (≈ 27).
BROWNIAN_TOL = 2. ** -27


def _is_typed_key(key) -> bool:
    return jnp.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key)


def sample_keys(seed, indices):
    """Per-sample keys: k_n = fold_in(PRNGKey(seed), indices[n]), shape [N, 2] uint32.

    `seed` may be a Python int or a traced integer scalar; `indices` an int array of sample indices (e.g. arange(N)
    for the first N samples of a seed, or a slice of it when a large run is drawn in batches).
    """
    base = jax.random.PRNGKey(seed)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(indices, jnp.uint32))


def as_sample_keys(key, n: int):
    """The per-sample keys for a batch of n from what a user passed as `key=`.

    Accepted: an int seed (→ `sample_keys(seed, arange(n))`); one PRNG key, raw ([2] uint32) or typed (scalar)
    (→ fold_in(key, arange(n))); or the per-sample keys themselves, raw [n, 2] or typed [n] — used as they are.
    """
    if isinstance(key, int):
        return sample_keys(key, jnp.arange(n))
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    per_sample_ndim = 1 if _is_typed_key(key) else 2
    if key.ndim == per_sample_ndim:
        if key.shape[0] != n:
            raise ValueError(f'key holds {key.shape[0]} per-sample keys but the batch has {n} samples')
        return key
    if key.ndim == per_sample_ndim - 1:
        return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n, dtype=jnp.uint32))
    raise ValueError(f'key must be an int seed, one PRNG key or [N] per-sample keys; got an array of shape '
                     f'{key.shape} and dtype {key.dtype}')


def _stream(keys, stream: int):
    return jax.vmap(lambda k: jax.random.fold_in(k, stream))(keys)


def initial_noise(keys, shape, dtype=jnp.float32):
    """Unit normal noise of `shape` ([N, ...]); row n from fold_in(keys[n], 0). Multiply by σ_max to start sampling."""
    if len(keys) != shape[0]:
        raise ValueError(f'{len(keys)} keys for a batch of shape {tuple(shape)}')
    return jax.vmap(lambda k: jax.random.normal(k, tuple(shape[1:]), dtype))(_stream(keys, INITIAL_STREAM))


def default_noise_sampler(keys, x):
    """Independent N(0, 1) draws shaped like `x`: draw i of sample n is normal(fold_in(fold_in(keys[n], 1), i)).

    σ and σ_next are ignored (as in k-diffusion's default, which is `randn_like(x)` per call).
    """
    step_keys = _stream(keys, STEP_STREAM)
    shape, dtype = x.shape[1:], x.dtype

    def noise_sampler(sigma, sigma_next, i):
        del sigma, sigma_next
        return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), shape, dtype))(step_keys)

    return noise_sampler


class _UnitBrownianTree(diffrax.VirtualBrownianTree):
    """diffrax's VirtualBrownianTree on [0, 1] that clamps query times into [0, 1] instead of checking them.

    diffrax checks the range with `equinox.error_if`, which puts a host callback into the compiled program; σ values
    recomputed as exp(−(−log σ)) can also leave [σ_min, σ_max] by one ulp. Clamping is the right answer for both.
    Relies on diffrax 0.7's `_evaluate_leaf`; `test_seeds.py` checks the law (mean 0, variance = time step).
    """

    def _evaluate(self, r):
        r = jnp.clip(r, 0., 1.)
        return jax.tree.map(lambda key, struct: self._evaluate_leaf(key, r, struct), self.key, self.shape)


class BrownianTreeNoiseSampler:
    """Noise from one Brownian motion W per sample, queried at t = σ (k-diffusion's BrownianTreeNoiseSampler).

    noise_sampler(σ, σ_next, i) = (W(σ_next) − W(σ)) / √|σ_next − σ|, a N(0, 1) draw for each call, but all calls
    are increments of the same path: refining the σ schedule refines the path instead of redrawing it, so a sample
    barely changes when the step count changes. `i` is ignored.

    W of sample n is a `diffrax.VirtualBrownianTree` keyed by fold_in(keys[n], 2), on [σ_min, σ_max] (mapped onto
    [0, 1]: W(σ) = √(σ_max − σ_min)·B((σ − σ_min)/(σ_max − σ_min)) for a standard Brownian motion B); queries outside
    the interval are clamped into it. σ_min and σ_max may be traced values (e.g. from a σ array).
    """

    def __init__(self, keys, x, sigma_min, sigma_max, tol: float = BROWNIAN_TOL):
        self.sigma_min = jnp.asarray(sigma_min, jnp.float32)
        self.sigma_max = jnp.asarray(sigma_max, jnp.float32)
        self._struct = jax.ShapeDtypeStruct(x.shape[1:], x.dtype)
        self._tol = tol
        self._keys = _stream(keys, BROWNIAN_STREAM)

    def __call__(self, sigma, sigma_next, i=None):
        del i
        span = self.sigma_max - self.sigma_min
        r0 = (sigma - self.sigma_min) / span
        r1 = (sigma_next - self.sigma_min) / span
        lo, hi = jnp.minimum(r0, r1), jnp.maximum(r0, r1)
        sign = jnp.where(r1 >= r0, 1., -1.)
        dw = jax.vmap(lambda k: _UnitBrownianTree(0., 1., self._tol, self._struct, k).evaluate(lo, hi))(self._keys)
        # dW over [lo, hi] of B scales by √span in σ units; the √|Δσ| normalisation cancels it to √|Δr|.
        return (dw * (sign / jnp.sqrt(jnp.abs(hi - lo)))).astype(dw.dtype)
