"""Dropout with one noise draw per forward pass (kdiff_jax/models/dropout.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kdiff_jax.factory import make_model
from kdiff_jax.models.dropout import Dropout, with_dropout_noise
from kdiff_jax.models.layers import dropout2d
from tests.parity import small_config


def _layers():
    rngs = nnx.Rngs(dropout=0)
    return dropout2d(0.5, rngs), dropout2d(0.5, rngs), Dropout(0.25, rngs=rngs)


def test_one_draw_gives_each_layer_its_own_mask_with_dropout_statistics():
    """Two Dropout2d(0.5) and an elementwise Dropout(0.25) in one pass: whole channels dropped, survivors scaled by
    1/(1 − p), keep fractions 1 − p, the two channel masks independent, the same key the same masks."""
    channel_a, channel_b, elementwise = _layers()
    x = jnp.ones((8, 4, 4, 512))

    @jax.jit
    def run(key):
        return with_dropout_noise(key, lambda: (channel_a(x), channel_b(x), elementwise(x)))

    a, b, e = map(np.asarray, run(jax.random.key(1)))
    for y in (a, b):
        assert set(np.unique(y)) == {0.0, 2.0}
        assert (y.min((1, 2)) == y.max((1, 2))).all()  # each channel of each sample all dropped or all kept
    kept_a, kept_b = a[:, 0, 0] > 0, b[:, 0, 0] > 0  # 4096 channel draws each: σ of a fraction ≈ 0.008
    assert abs(kept_a.mean() - 0.5) < 0.04 and abs(kept_b.mean() - 0.5) < 0.04
    assert abs((kept_a == kept_b).mean() - 0.5) < 0.04  # independent masks agree half the time
    assert set(np.unique(e)) == {0.0, np.float32(1 / 0.75)} and abs((e > 0).mean() - 0.75) < 0.01
    again, other = run(jax.random.key(1)), run(jax.random.key(2))
    np.testing.assert_array_equal(np.asarray(again[0]), a)
    assert not np.array_equal(np.asarray(other[0]), a)


def test_a_model_pass_compiles_one_random_draw_for_all_its_dropouts():
    """XLA:CPU compiles every jax.random draw as a loop; nnx.Dropout's per-call draws put three per dropout in a
    program (two key derivations, one mask): 240 loops in cars64's training step, ~7 s of its compilation. Under
    with_dropout_noise the training-mode forward holds one, and eval mode draws nothing."""
    model = make_model(small_config(dropout_rate=0.2), seed=0)
    n_dropouts = sum(isinstance(m, Dropout) for _, m in nnx.iter_graph(model))
    x, sigma, aug = jnp.ones((2, 16, 16, 3)), jnp.ones((2,)), jnp.zeros((2, 9))
    graphdef, state = nnx.split(model)

    def loops(train: bool, shared_noise: bool):
        def forward(state, key):
            m = nnx.merge(graphdef, state)
            if train:
                m.train()
            if not shared_noise:
                nnx.reseed(m, dropout=key)
                return m(x, sigma, aug_cond=aug)
            return with_dropout_noise(key, lambda: m(x, sigma, aug_cond=aug))
        return jax.jit(forward).lower(state, jax.random.key(0)).compile().as_text().count(' while(')

    assert n_dropouts >= 10
    assert loops(train=True, shared_noise=True) == 1
    assert loops(train=True, shared_noise=False) >= n_dropouts  # the probe sees per-call draws
    assert loops(train=False, shared_noise=True) == 0


def test_a_function_that_calls_other_dropouts_in_its_second_pass_is_an_error():
    """with_dropout_noise traces the function twice (shapes, then values): both must call the same dropouts."""
    layer = _layers()[0]
    calls = []

    def changes_between_passes():
        calls.append(None)
        return [layer(jnp.ones((2, 4, 4, 8))) for _ in calls]

    with pytest.raises(RuntimeError, match='dropout call 1 asked for noise of shape'):
        with_dropout_noise(jax.random.key(0), changes_between_passes)


def test_masks_without_a_common_batch_axis_are_refused():
    layer = _layers()[2]
    with pytest.raises(ValueError, match='must share their leading'):
        with_dropout_noise(jax.random.key(0), lambda: (layer(jnp.ones((2, 3))), layer(jnp.ones((4, 3)))))
