"""kdiff_jax's XLA options: on the CPU the convolutions of the training step (the kernel gradients among them), the
sampling loop and the Inception features leave YNNPACK for XLA's Eigen kernels, with the same result; an XLA_FLAGS
choice or a jaxlib without the option keeps XLA's defaults."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdiff_jax import compiler_options
from kdiff_jax.sampling import api, get_sigmas, sample
from kdiff_jax.training.sharding import data_mesh, jit_train_step, replicate, shard_batch


def conv_train_step(state, batch):
    """Plain SGD on the squared output of one 3×3 convolution: its gradient has a kernel-gradient convolution."""
    def loss_fn(w):
        y = jax.lax.conv_general_dilated(batch['x'], w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
        return jnp.mean(jnp.square(y))
    loss, grad = jax.value_and_grad(loss_fn)(state['w'])
    return {'w': state['w'] - 0.1 * grad}, {'loss': loss}


def convolutions_in_ynn_fusions(hlo: str) -> tuple[int, int]:
    """(convolutions inside YNNPACK fusions, all convolutions) of an optimized HLO module's text."""
    bodies = dict(re.findall(r'^%?(\S+) [^\n]*\{\n(.*?)\n\}', hlo, flags=re.M | re.S))
    ynn_calls = re.findall(r'calls=%?([\w.\-]+)[^\n]*"kind":"__ynn_fusion"', hlo)
    in_ynn = sum(bodies[name].count(' convolution(') for name in ynn_calls)
    return in_ynn, hlo.count(' convolution(')


@pytest.fixture(autouse=True)
def fresh_options():
    compiler_options.cpu_compiler_options.cache_clear()
    yield
    compiler_options.cpu_compiler_options.cache_clear()


def _state_and_batch(mesh):
    rng = np.random.default_rng(0)
    state = replicate({'w': rng.standard_normal((3, 3, 32, 32)).astype(np.float32) * 0.1}, mesh)
    batch = shard_batch({'x': rng.standard_normal((2, 16, 16, 32)).astype(np.float32)}, mesh)
    return state, batch


def test_cpu_train_step_convolutions_leave_ynnpack_with_the_same_result():
    assert jax.default_backend() == 'cpu'
    assert compiler_options.cpu_compiler_options() == compiler_options.YNN_WITHOUT_CONVOLUTIONS
    mesh = data_mesh(jax.devices()[:1])
    state, batch = _state_and_batch(mesh)
    ours = jit_train_step(conv_train_step, mesh, state)
    xla_default = jax.jit(conv_train_step)
    in_ynn, total = convolutions_in_ynn_fusions(ours.lower(state, batch).compile().as_text())
    assert total >= 2 and in_ynn == 0, (in_ynn, total)
    in_ynn, total = convolutions_in_ynn_fusions(xla_default.lower(state, batch).compile().as_text())
    assert in_ynn == total >= 2, (in_ynn, total)  # XLA's default (the case the option is for)
    expected, expected_metrics = xla_default(state, batch)
    new_state, metrics = ours(state, batch)  # donates `state`: after the reference
    np.testing.assert_allclose(metrics['loss'], expected_metrics['loss'], rtol=1e-6)
    np.testing.assert_allclose(new_state['w'], expected['w'], rtol=1e-5, atol=1e-6)


def test_cpu_sampling_loop_convolutions_leave_ynnpack_with_the_same_result():
    """`sample`'s compiled driver takes the same options: a denoiser with a 3×3 convolution, 5 Euler steps."""
    api.sampling_program.cache_clear()
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.standard_normal((3, 3, 32, 32)).astype(np.float32) * 0.1)

    def denoiser(x, sigma):
        y = jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
        return x / (1 + sigma[:, None, None, None] ** 2) + 0.1 * jnp.tanh(y)

    x = jnp.asarray(rng.standard_normal((2, 16, 16, 32)).astype(np.float32)) * 10.
    sigmas = get_sigmas('karras', 5, 0.1, 10.)
    args = (None, x, sigmas, jnp.uint32(0), jnp.arange(2, dtype=jnp.uint32), {}, {})
    static = dict(model_def=denoiser, sampler='euler', static_kwargs=(), callback=None)
    in_ynn, total = convolutions_in_ynn_fusions(api.sampling_program().lower(*args, **static).compile().as_text())
    assert total >= 1 and in_ynn == 0, (in_ynn, total)
    xla_default = jax.jit(api._run, static_argnames=tuple(static))
    in_ynn, total = convolutions_in_ynn_fusions(xla_default.lower(*args, **static).compile().as_text())
    assert in_ynn == total >= 1, (in_ynn, total)
    np.testing.assert_allclose(sample(denoiser, x, sigmas, 'euler'), xla_default(*args, **static), rtol=1e-5,
                               atol=1e-5)
    api.sampling_program.cache_clear()


def test_cpu_inception_features_convolutions_leave_ynnpack_with_the_same_result():
    """evaluate.py's Inception features (`jit_extract_features`) take the same options."""
    from flax import nnx
    from kdiff_jax.evaluation.inception import InceptionV3, extract_features, jit_extract_features
    rng = np.random.default_rng(2)
    init = lambda shape: jnp.asarray(rng.uniform(0.01, 0.05, shape), jnp.float32)  # noqa: E731 (BN variances > 0)
    graphdef, state = nnx.split(InceptionV3(init=init))
    images = jnp.asarray(rng.uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32))
    ours = jit_extract_features(graphdef)
    in_ynn, total = convolutions_in_ynn_fusions(ours.lower(state, images).compile().as_text())
    assert total >= 40 and in_ynn == 0, (in_ynn, total)
    xla_default = jax.jit(functools.partial(extract_features, graphdef))
    in_ynn, total = convolutions_in_ynn_fusions(xla_default.lower(state, images).compile().as_text())
    assert in_ynn == total >= 40, (in_ynn, total)
    expected = xla_default(state, images)
    assert float(jnp.abs(expected).max()) > 0
    np.testing.assert_allclose(ours(state, images), expected, rtol=1e-4, atol=1e-4 * float(jnp.abs(expected).max()))


def test_xla_flags_choice_wins(monkeypatch):
    monkeypatch.setenv('XLA_FLAGS', '--xla_cpu_experimental_ynn_fusion_type=individual_dot')
    assert compiler_options.cpu_compiler_options() == {}


def test_a_jaxlib_without_the_option_keeps_its_defaults(monkeypatch):
    monkeypatch.setattr(compiler_options, 'YNN_WITHOUT_CONVOLUTIONS',
                        {'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_NOT_IN_THIS_JAXLIB'})
    assert compiler_options.cpu_compiler_options() == {}
    monkeypatch.setattr(compiler_options, 'YNN_WITHOUT_CONVOLUTIONS', {'xla_cpu_option_not_in_this_jaxlib': 'x'})
    compiler_options.cpu_compiler_options.cache_clear()
    assert compiler_options.cpu_compiler_options() == {}


def test_extra_compiler_options_reach_the_compiler_beside_the_defaults():
    """jit_train_step's `extra_compiler_options` are passed with the step's own options: a valid one leaves the
    convolutions out of YNNPACK as before, an invalid value fails the compile naming the option."""
    mesh = data_mesh(jax.devices()[:1])
    state, batch = _state_and_batch(mesh)
    step = jit_train_step(conv_train_step, mesh, state, {'xla_cpu_prefer_vector_width': '256'})
    in_ynn, total = convolutions_in_ynn_fusions(step.lower(state, batch).compile().as_text())
    assert total >= 2 and in_ynn == 0, (in_ynn, total)
    bad = jit_train_step(conv_train_step, mesh, state, {'xla_cpu_prefer_vector_width': 'wide'})
    with pytest.raises(jax.errors.JaxRuntimeError, match='xla_cpu_prefer_vector_width'):
        bad.lower(state, batch).compile()
