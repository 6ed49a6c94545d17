"""One training step of k-diffusion's recipe, as a pure function compiled over a device mesh.

For a batch of augmented images x0 with their aug_cond, at micro-step s with key k_s = fold_in(key, s):
  n ~ N(0, I), σ ~ config density, L = mean_i loss_i(x0, n, σ)  (the denoiser's loss; dropout on)
  g = ∇L; if L or g is not finite the micro-batch is skipped and counted (nothing changes but the step counter);
  otherwise optax.MultiSteps accumulates g and every `grad_accum_steps` micro-batches applies AdamW, after which
  EMA ← d·EMA + (1 − d)·params with d = ema_decay(#updates so far).
Random draws have the global batch's shape, so (with JAX's partitionable threefry) they do not depend on how the
batch is sharded: 1 and N devices train the same model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ..densities import make_sample_density
from ..factory import denoiser_class
from .schedules import ema_decay, make_lr_schedule
from .state import TrainModel, TrainState

Batch = Mapping[str, jax.Array]


def make_loss_and_update(config: Mapping, train_model: TrainModel, tx: optax.MultiSteps,
                         lr: float | None = None) -> Callable:
    """`update(state, x0, aug_cond, noise, sigma, dropout_key) -> (state, metrics)`: the step with given draws."""
    denoiser_cls = denoiser_class(config)
    sigma_data = config['model']['sigma_data']
    use_aug_cond = config['model']['augment_wrapper']
    ema_cfg = config['ema_sched']
    schedule = make_lr_schedule(config['lr_sched'], config['optimizer']['lr'] if lr is None else lr)

    def update(state: TrainState, x0, aug_cond, noise, sigma, dropout_key):
        def loss_fn(params):
            model = train_model.merge(params, state.buffers, train=True)
            nnx.reseed(model, dropout=dropout_key)
            kwargs = {'aug_cond': aug_cond} if use_aug_cond else {}
            losses = denoiser_cls(model, sigma_data).loss(x0, noise, sigma, **kwargs)
            return losses.mean(), losses

        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        finite = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))
        updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        keep_if_finite = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        params = keep_if_finite(new_params, state.params)
        opt_state = keep_if_finite(new_opt_state, state.opt_state)
        updated = finite & tx.has_updated(opt_state)
        decay = ema_decay(state.ema_updates, ema_cfg['power'], ema_cfg['max_value'])
        ema_params = jax.tree.map(lambda e, p: jnp.where(updated, e * decay + p * (1 - decay), e),
                                  state.ema_params, params)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema_params,
                                  ema_updates=state.ema_updates + updated.astype(jnp.int32),
                                  skipped=state.skipped + (~finite).astype(jnp.int32))
        metrics = {'loss': loss, 'lr': schedule(state.opt_state.gradient_step), 'ema_decay': decay,
                   'skipped': new_state.skipped}
        return new_state, metrics

    return update


def make_train_step(config: Mapping, train_model: TrainModel, tx: optax.MultiSteps,
                    lr: float | None = None) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """`train_step(state, batch) -> (state, metrics)` drawing noise, σ and dropout from (key, step). Not jitted."""
    update = make_loss_and_update(config, train_model, tx, lr)
    sample_density = make_sample_density(config['model'])

    def train_step(state: TrainState, batch: Batch):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
        key_noise, key_sigma, key_dropout = jax.random.split(key, 3)
        x0 = batch['image']
        noise = jax.random.normal(key_noise, x0.shape, x0.dtype)
        sigma = sample_density(key_sigma, (x0.shape[0],))
        return update(state, x0, batch.get('aug_cond'), noise, sigma, key_dropout)

    return train_step
