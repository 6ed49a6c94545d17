"""One training step of k-diffusion's recipe, as a pure function compiled over a device mesh.

For a batch of augmented images x0 with their aug_cond, at micro-step s with key k_s = fold_in(key, s):
  n ~ N(0, I), σ ~ config density, L = mean_i loss_i(x0, n, σ)  (the denoiser's loss; dropout on, all its noise
  drawn at once: models/dropout.py)
  g = ∇L; if L or g is not finite the micro-batch is skipped and counted (nothing changes but the step counter; a
  `lax.cond`, so that XLA updates the donated state in place);
  otherwise `GradientAccumulation` (optax.MultiSteps) accumulates g and every `grad_accum_steps` micro-batches
  applies AdamW, after which EMA ← d·EMA + (1 − d)·params with d = ema_decay(#updates so far); micro-batches
  that only accumulate write neither the parameters nor the EMA (branches again, not selects).
Random draws have the global batch's shape, so (with JAX's partitionable threefry) they do not depend on how the
batch is sharded: 1 and N devices train the same model.
With `gns_groups = G ≥ 2` (train.py --gns) the gradient is the mean of G group gradients (each over B/G rows, as
data-parallel workers compute them; dropout keys fold_in(k, g)), and their squared norms update the gradient noise
scale (gns.py) with b = B/G, B: the same gradient as without --gns up to the dropout draws.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from ..densities import make_sample_density
from ..factory import denoiser_class
from ..models.dropout import with_dropout_noise
from .gns import grouped_value_and_grad, gns_update
from .optimizer import GradientAccumulation
from .schedules import ema_decay, make_lr_schedule
from .state import TrainModel, TrainState

Batch = Mapping[str, jax.Array]


def make_loss_and_update(config: Mapping, train_model: TrainModel, tx: GradientAccumulation,
                         lr: float | None = None, gns_groups: int = 0) -> Callable:
    """`update(state, x0, aug_cond, noise, sigma, dropout_key) -> (state, metrics)`: the step with given draws
    (with `gns_groups` ≥ 2 also the gradient noise scale, metric 'gns')."""
    if gns_groups == 1 or gns_groups < 0:
        raise ValueError(f'the gradient noise scale needs at least 2 groups, got {gns_groups}')
    denoiser_cls = denoiser_class(config)
    sigma_data = config['model']['sigma_data']
    use_aug_cond = config['model']['augment_wrapper']
    ema_cfg = config['ema_sched']
    schedule = make_lr_schedule(config['lr_sched'], config['optimizer']['lr'] if lr is None else lr)

    def update(state: TrainState, x0, aug_cond, noise, sigma, dropout_key):
        def loss_fn(params, batch, key):
            model = train_model.merge(params, state.buffers, train=True)
            kwargs = {'aug_cond': batch['aug_cond']} if use_aug_cond else {}
            return with_dropout_noise(key, lambda: denoiser_cls(model, sigma_data).loss(
                batch['x0'], batch['noise'], batch['sigma'], **kwargs).mean())

        batch = {'x0': x0, 'aug_cond': aug_cond, 'noise': noise, 'sigma': sigma}
        if gns_groups:
            loss, grads, sq_small, sq_large = grouped_value_and_grad(loss_fn, state.params, gns_groups, batch,
                                                                     dropout_key)
        else:
            loss, grads = jax.value_and_grad(loss_fn)(state.params, batch, dropout_key)
        finite = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))

        def apply_gradient(params, opt_state, gns):
            params, opt_state = tx.apply(grads, opt_state, params)
            if gns_groups:
                gns = gns_update(gns, sq_small, sq_large, x0.shape[0] // gns_groups, x0.shape[0])
            return params, opt_state, gns

        # a branch rather than selects between old and new: XLA then updates the donated state in place
        params, opt_state, gns = jax.lax.cond(finite, apply_gradient, lambda *unchanged: unchanged,
                                              state.params, state.opt_state, state.gns)
        updated = finite & tx.has_updated(opt_state)
        decay = ema_decay(state.ema_updates, ema_cfg['power'], ema_cfg['max_value'])
        ema_params = jax.lax.cond(
            updated, lambda ema: jax.tree.map(lambda e, p: e * decay + p * (1 - decay), ema, params),
            lambda ema: ema, state.ema_params)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema_params,
                                  ema_updates=state.ema_updates + updated.astype(jnp.int32),
                                  skipped=state.skipped + (~finite).astype(jnp.int32), gns=gns)
        metrics = {'loss': loss, 'lr': schedule(state.opt_state.gradient_step), 'ema_decay': decay,
                   'skipped': new_state.skipped}
        if gns_groups:
            metrics['gns'] = gns.noise_scale
        return new_state, metrics

    return update


def make_train_step(config: Mapping, train_model: TrainModel, tx: GradientAccumulation, lr: float | None = None,
                    gns_groups: int = 0) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """`train_step(state, batch) -> (state, metrics)` drawing noise, σ and dropout from (key, step). Not jitted."""
    update = make_loss_and_update(config, train_model, tx, lr, gns_groups)
    sample_density = make_sample_density(config['model'])

    def train_step(state: TrainState, batch: Batch):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
        key_noise, key_sigma, key_dropout = jax.random.split(key, 3)
        x0 = batch['image']
        noise = jax.random.normal(key_noise, x0.shape, x0.dtype)
        sigma = sample_density(key_sigma, (x0.shape[0],))
        return update(state, x0, batch.get('aug_cond'), noise, sigma, key_dropout)

    return train_step
