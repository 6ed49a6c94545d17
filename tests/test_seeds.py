"""Per-sample seeding: a sample depends on (seed, its index) only — not on the batch it is drawn in, nor on the number
of devices; Brownian-tree noise makes a sample nearly independent of the step count."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdiff_jax import sampling as S
from tests.host_devices import host_devices_flags

SIGMA_DATA = 0.5
SHAPE = (8, 8, 3)
SEED = 7
SAMPLERS = ['euler_ancestral', 'dpmpp_sde']  # ancestral (independent draws) and SDE (Brownian-tree noise)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def gaussian_denoiser(x, sigma):
    """The exact denoiser for data ~ N(0, σd²): D(x, σ) = x·σd²/(σ² + σd²)."""
    return x * SIGMA_DATA ** 2 / (sigma[:, None, None, None] ** 2 + SIGMA_DATA ** 2)


def _draw(sampler, indices, steps=12, seed=SEED, **kwargs):
    indices = np.asarray(indices)
    sigmas = S.get_sigmas_karras(steps, 0.01, 80.)
    x = S.initial_noise(S.sample_keys(seed, indices), (len(indices), *SHAPE)) * sigmas[0]
    return np.asarray(S.sample(gaussian_denoiser, x, sigmas, sampler, seed=seed, indices=indices, **kwargs))


@pytest.mark.parametrize('sampler', SAMPLERS)
def test_sample_does_not_depend_on_batch(sampler):
    batch_64 = _draw(sampler, np.arange(64))
    batch_7 = _draw(sampler, np.arange(20, 27))
    batch_1 = _draw(sampler, [42])
    np.testing.assert_allclose(batch_7, batch_64[20:27], rtol=0, atol=1e-6)
    np.testing.assert_allclose(batch_1, batch_64[42:43], rtol=0, atol=1e-6)
    assert np.abs(batch_64[0] - batch_64[1]).max() > 0.1  # samples do differ from each other
    assert np.abs(_draw(sampler, [42], seed=SEED + 1) - batch_1).max() > 0.1  # and between seeds


def test_keys_and_initial_noise_per_sample():
    keys = S.sample_keys(3, jnp.arange(5))
    np.testing.assert_array_equal(S.sample_keys(3, jnp.array([4, 1])), keys[jnp.array([4, 1])])
    np.testing.assert_array_equal(S.as_sample_keys(3, 5), keys)  # an int seed
    np.testing.assert_array_equal(S.as_sample_keys(keys, 5), keys)  # per-sample keys as they are
    single = jax.random.PRNGKey(3)
    np.testing.assert_array_equal(S.as_sample_keys(single, 5), keys)  # one key: fold in 0 … N−1
    typed = jax.random.key(3)
    assert S.as_sample_keys(typed, 5).shape == (5,)
    noise = S.initial_noise(keys, (5, *SHAPE))
    np.testing.assert_array_equal(S.initial_noise(keys[2:3], (1, *SHAPE)), noise[2:3])
    assert abs(float(noise.std()) - 1) < 0.05
    with pytest.raises(ValueError, match='per-sample keys'):
        S.as_sample_keys(keys, 4)


def test_a_seed_must_be_an_integer():
    """`seed=1.5` used to be truncated to 1 (the same samples as seed 1); numpy integers are fine."""
    from kdiff_jax.generate import SamplingPlan, generate
    x, sigmas = jnp.zeros((2, *SHAPE)), S.get_sigmas_karras(3, 0.1, 10.)
    for seed in (1.5, '3'):
        with pytest.raises(TypeError, match='seed must be an integer'):
            S.sample(gaussian_denoiser, x, sigmas, 'euler_ancestral', seed=seed)
    with pytest.raises(ValueError, match=r'seed must be in \[0, 2\*\*32\)'):
        S.sample(gaussian_denoiser, x, sigmas, 'euler_ancestral', seed=-1)
    np.testing.assert_array_equal(S.sample(gaussian_denoiser, x, sigmas, 'euler_ancestral', seed=np.int64(3)),
                                  S.sample(gaussian_denoiser, x, sigmas, 'euler_ancestral', seed=3))
    config = {'model': {'input_size': list(SHAPE[:2]), 'input_channels': SHAPE[2]}}
    with pytest.raises(TypeError, match='seed must be an integer'):
        generate(gaussian_denoiser, config, SamplingPlan('euler', 3), 2, seed=1.5, progress=False)
    with pytest.raises(ValueError, match='n must be >= 1'):
        generate(gaussian_denoiser, config, SamplingPlan('euler', 3), 0, progress=False)


def test_default_noise_draws_are_independent_per_index():
    keys = S.sample_keys(0, jnp.arange(512))
    draw = S.default_noise_sampler(keys, jnp.zeros((512, 4)))
    a, b = np.asarray(draw(1., .5, 0)).ravel(), np.asarray(draw(1., .5, 1)).ravel()
    assert abs(a.std() - 1) < 0.06 and abs(a.mean()) < 0.06
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.06
    np.testing.assert_array_equal(draw(3., 2., 0), a.reshape(512, 4))  # depends on i only, not on σ


def test_brownian_increments_are_a_brownian_path():
    """Normalised increments are N(0, 1), independent over disjoint intervals, and add up along the path."""
    keys = S.sample_keys(0, jnp.arange(4096))
    ns = S.BrownianTreeNoiseSampler(keys, jnp.zeros((4096, 2)), 0.01, 80.)
    a, b, c = 20., 3., 0.05
    ab, bc, ac = (np.asarray(ns(jnp.float32(s), jnp.float32(t))) for s, t in ((a, b), (b, c), (a, c)))
    for z in (ab, bc, ac):
        assert abs(z.std() - 1) < 0.03 and abs(z.mean()) < 0.03
    assert abs(np.corrcoef(ab.ravel(), bc.ravel())[0, 1]) < 0.04
    np.testing.assert_allclose(ac * np.sqrt(a - c), ab * np.sqrt(a - b) + bc * np.sqrt(b - c), rtol=0, atol=1e-4)
    # σ outside [σ_min, σ_max] is clamped, not an error; the sign follows the direction
    np.testing.assert_allclose(np.asarray(ns(jnp.float32(b), jnp.float32(a))), -ab, atol=1e-5)
    assert np.isfinite(np.asarray(ns(jnp.float32(80.0001), jnp.float32(b)))).all()


@pytest.mark.parametrize('sampler', ['dpmpp_2m_sde'])
def test_brownian_noise_makes_samples_stable_across_step_counts(sampler):
    """Same seed at 50 and 100 steps: with Brownian-tree noise the samples stay close; with independent draws
    (the default normal noise sampler on the same keys) they are unrelated."""
    def run(steps, brownian):
        indices = np.arange(16)
        sigmas = S.get_sigmas_karras(steps, 0.01, 80.)
        keys = S.sample_keys(SEED, indices)
        x = S.initial_noise(keys, (16, *SHAPE)) * sigmas[0]
        kwargs = {} if brownian else {'noise_sampler': S.default_noise_sampler(keys, x)}
        return np.asarray(S.get_sampler(sampler)(gaussian_denoiser, x, sigmas, key=keys, **kwargs))

    def dist(a, b):
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    brownian, independent = dist(run(50, True), run(100, True)), dist(run(50, False), run(100, False))
    assert brownian < 0.2 and brownian < 0.25 * independent, (brownian, independent)


TWO_DEVICES = textwrap.dedent('''
    import os, sys
    import numpy as np
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    sys.path.insert(0, {root!r})
    from tests.test_seeds import gaussian_denoiser, SHAPE, SEED
    from kdiff_jax import sampling as S
    assert jax.device_count() == 2, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ('data',))
    batch = NamedSharding(mesh, P('data'))
    out = {{}}
    indices = np.arange(8)
    sigmas = S.get_sigmas_karras(12, 0.01, 80.)
    for sampler in {samplers!r}:
        x = S.initial_noise(S.sample_keys(SEED, indices), (8, *SHAPE)) * sigmas[0]
        x = jax.device_put(x, batch)
        calls = []
        y = S.sample(gaussian_denoiser, x, sigmas, sampler, seed=SEED, indices=indices, callback=calls.append)
        jax.effects_barrier()
        assert len(y.sharding.device_set) == 2, y.sharding
        assert len(calls) == 12, len(calls)
        out[sampler] = np.asarray(y)
    np.savez(sys.argv[1], **out)
''')


def test_sample_does_not_depend_on_device_count(tmp_path):
    """8 samples sharded over a 2-device mesh (in a subprocess with 2 host devices) equal the same samples drawn
    on this process's single device."""
    result = tmp_path / 'two_devices.npz'
    env = dict(os.environ, XLA_FLAGS=host_devices_flags(2), JAX_PLATFORMS='cpu')
    script = TWO_DEVICES.format(root=ROOT, samplers=SAMPLERS)
    proc = subprocess.run([sys.executable, '-c', script, str(result)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    two = np.load(result)
    for sampler in SAMPLERS:
        np.testing.assert_allclose(two[sampler], _draw(sampler, np.arange(8)), rtol=0, atol=1e-6, err_msg=sampler)
