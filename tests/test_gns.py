"""The gradient noise scale: k-diffusion's estimator, the known noise scale of a synthetic problem, and --gns in the
train step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdiff_jax.factory import make_model
from kdiff_jax.training.gns import GNSState, gns_update, grouped_value_and_grad
from kdiff_jax.training.optimizer import make_optimizer
from kdiff_jax.training.state import create_train_state
from kdiff_jax.training.step import make_loss_and_update
from tests.parity import K
from tests.test_train_step import _batches, tiny_config


def test_update_equals_k_diffusion_gradient_noise_scale():
    ours, theirs = GNSState.zeros(), K.gns.GradientNoiseScale()
    rng = np.random.default_rng(0)
    update = jax.jit(gns_update, static_argnums=(3, 4))
    for _ in range(300):
        large = float(rng.uniform(0.5, 2.))
        small = large + float(rng.uniform(0., 3.))
        ours = update(ours, small, large, 16, 64)
        expected = theirs.update(small, large, 16, 64)
        assert float(ours.noise_scale) == pytest.approx(expected, rel=1e-4)
    assert float(ours.ema_sq_norm) == pytest.approx(theirs.ema_sq_norm, rel=1e-4)
    assert float(ours.ema_var) == pytest.approx(theirs.ema_var, rel=1e-4)
    assert float(ours.beta_cumprod) == pytest.approx(theirs.beta_cumprod, rel=1e-5)
    restored = GNSState.from_torch(theirs.state_dict())
    assert float(restored.noise_scale) == pytest.approx(theirs.gradient_noise_scale, rel=1e-6)


def test_recovers_the_known_noise_scale_of_a_synthetic_problem():
    """loss(θ) = mean_i ½‖θ − x_i‖², x_i ~ N(μ, s²I_d): per-example gradients θ − x_i, so G = θ − μ, tr Σ = d·s² and
    B_simple = d·s² / ‖θ − μ‖² = 16·1 / 4 = 4 here."""
    d, s, batch, groups, steps = 16, 1., 64, 4, 3000
    mu = jnp.zeros(d)
    theta = jnp.full(d, 0.5)  # ‖θ − μ‖² = 4
    true_scale = d * s ** 2 / float(jnp.sum((theta - mu) ** 2))

    def loss_fn(params, data, key):
        return jnp.mean(0.5 * jnp.sum((params - data['x']) ** 2, axis=-1))

    def body(state, key):
        x = mu + s * jax.random.normal(key, (batch, d))
        _, grad, sq_small, sq_large = grouped_value_and_grad(loss_fn, theta, groups, {'x': x}, key)
        return gns_update(state, sq_small, sq_large, batch // groups, batch), grad

    state, grads = jax.jit(lambda keys: jax.lax.scan(body, GNSState.zeros(), keys))(
        jax.random.split(jax.random.key(0), steps))
    np.testing.assert_allclose(np.asarray(grads).mean(0), np.asarray(theta - mu), atol=0.02)  # mean gradient = G
    assert float(state.noise_scale) == pytest.approx(true_scale, rel=0.05)
    # the debiased statistics are |G|² and tr Σ themselves
    debias = 1 - float(state.beta_cumprod)
    assert float(state.ema_sq_norm) / debias == pytest.approx(4., rel=0.05)
    assert float(state.ema_var) / debias == pytest.approx(d * s ** 2, rel=0.05)


def test_train_step_with_gns_takes_the_same_step_and_reports_the_scale():
    """With dropout off, the grouped gradient is the full-batch gradient: the same parameters as without --gns."""
    config = tiny_config()
    tx = make_optimizer(config)
    train_model, state = create_train_state(make_model(config), tx, seed=0)
    plain = jax.jit(make_loss_and_update(config, train_model, tx))
    grouped = jax.jit(make_loss_and_update(config, train_model, tx, gns_groups=2))
    with pytest.raises(ValueError, match='at least 2 groups'):
        make_loss_and_update(config, train_model, tx, gns_groups=1)
    state_a = state_b = state
    for x0, aug, noise, sigma in _batches(config, 3, batch=4):
        state_a, metrics_a = plain(state_a, x0, aug, noise, sigma, jax.random.key(0))
        state_b, metrics_b = grouped(state_b, x0, aug, noise, sigma, jax.random.key(0))
        assert float(metrics_b['loss']) == pytest.approx(float(metrics_a['loss']), rel=1e-5)
    assert 'gns' not in metrics_a and np.isfinite(float(metrics_b['gns'])) and float(metrics_b['gns']) > 0
    assert float(state_b.gns.beta_cumprod) == pytest.approx(0.9998 ** 3, rel=1e-6)
    assert float(state_a.gns.beta_cumprod) == 1.
    for a, b in zip(jax.tree.leaves(state_a.params), jax.tree.leaves(state_b.params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match='does not split'):
        jax.jit(make_loss_and_update(config, train_model, tx, gns_groups=3))(
            state, *next(_batches(config, 1, batch=4)), jax.random.key(0))


def test_a_checkpoint_saved_before_gns_joined_the_state_resumes_with_zero_statistics(tmp_path):
    import dataclasses

    import orbax.checkpoint as ocp

    from kdiff_jax.config import config_to_dict
    from kdiff_jax.training.checkpointing import TrainCheckpointer, abstract_like
    from kdiff_jax.training.sharding import data_mesh, replicated
    config = tiny_config()
    _, state = create_train_state(make_model(config, initialize=False), make_optimizer(config), seed=0)
    state = state.replace(step=jnp.asarray(7, jnp.int32))
    old = {f.name: getattr(state, f.name) for f in dataclasses.fields(state) if f.name != 'gns'}
    checkpointer = TrainCheckpointer(tmp_path, asynchronous=False)
    checkpointer.manager.save(7, args=ocp.args.Composite(state=ocp.args.StandardSave(old),
                                                         data=ocp.args.JsonSave({'epoch': 1}),
                                                         config=ocp.args.JsonSave(config_to_dict(config))))
    checkpointer.wait()
    restored, data = checkpointer.restore(abstract_like(state, replicated(data_mesh())))
    assert int(restored.step) == 7 and data == {'epoch': 1}
    assert float(restored.gns.beta_cumprod) == 1. and float(restored.gns.ema_var) == 0.
