"""The optimizer of `config.optimizer` / `config.lr_sched` as one optax transformation.

AdamW (k-diffusion's default: decoupled weight decay on every parameter, as `torch.optim.AdamW`) or SGD
(`torch.optim.SGD`: L2 weight decay added to the gradient, then momentum), with the LR schedule of
`schedules.make_lr_schedule`, wrapped in `optax.MultiSteps` for gradient accumulation: gradients of
`grad_accum_steps` micro-batches are averaged and the inner optimizer (and so the LR schedule) steps once.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import optax

from .schedules import make_lr_schedule


class GradientAccumulation(optax.MultiSteps):
    """`optax.MultiSteps`, whose update at one micro-batch per step (k = 1) calls the inner optimizer directly.

    At k = 1, MultiSteps' running mean of one gradient, acc + (g − acc)/1 from acc = 0, is g; its accumulator stays 0,
    `mini_step` stays 0 and `gradient_step` counts up. So calling the inner optimizer on g and advancing
    `gradient_step` gives the same updates and state (tests/test_train_step.py: equal to float rounding, as XLA
    fuses the two programs differently). The state keeps MultiSteps' structure, so checkpoints move between k = 1 and
    k > 1 runs. From a state left mid-accumulation by a k > 1 run, the first step applies its own gradient and sets
    `mini_step` to 0, where MultiSteps would spend that step finishing the old mean and apply nothing.
    Why by hand: MultiSteps' update, written for any k, selects between old and new state with `where(emit, …)`,
    and that keeps XLA from updating the donated AdamW moments and accumulator in place: it copies all three each
    step (567 MiB for cars64; bench/RESULTS.md, session 7). k > 1 still takes that path.
    """

    def __init__(self, inner: optax.GradientTransformation, every_k: int):
        super().__init__(inner, every_k_schedule=every_k)
        self.every_k = every_k

    def update(self, updates, state: optax.MultiStepsState, params=None, **extra_args):
        if self.every_k > 1:
            return super().update(updates, state, params, **extra_args)
        updates, inner_state = self.inner_opt.update(updates, state.inner_opt_state, params, **extra_args)
        return updates, state._replace(mini_step=jnp.zeros_like(state.mini_step),
                                       gradient_step=optax.safe_increment(state.gradient_step),
                                       inner_opt_state=inner_state)


def make_optimizer(config: Mapping, *, lr: float | None = None, grad_accum_steps: int = 1) -> GradientAccumulation:
    opt = config['optimizer']
    schedule = make_lr_schedule(config['lr_sched'], opt['lr'] if lr is None else lr)
    if opt['type'] == 'adamw':
        b1, b2 = opt['betas']
        inner = optax.adamw(schedule, b1=b1, b2=b2, eps=opt['eps'], weight_decay=opt['weight_decay'])
    elif opt['type'] == 'sgd':
        momentum = opt.get('momentum') or 0.
        inner = optax.chain(optax.add_decayed_weights(opt.get('weight_decay') or 0.),
                            optax.sgd(schedule, momentum=momentum or None, nesterov=bool(opt.get('nesterov'))))
    else:
        raise ValueError(f"unknown optimizer.type {opt['type']!r}; expected adamw or sgd")
    if grad_accum_steps < 1:
        raise ValueError(f'--grad-accum-steps must be >= 1, got {grad_accum_steps}')
    return GradientAccumulation(inner, grad_accum_steps)
