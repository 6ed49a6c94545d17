"""The optimizer of `config.optimizer` / `config.lr_sched` as one optax transformation.

AdamW (k-diffusion's default: decoupled weight decay on every parameter, as `torch.optim.AdamW`) or SGD
(`torch.optim.SGD`: L2 weight decay added to the gradient, then momentum), with the LR schedule of
`schedules.make_lr_schedule`, wrapped in `GradientAccumulation` (an `optax.MultiSteps`): gradients of
`grad_accum_steps` micro-batches are averaged and the inner optimizer (and so the LR schedule) steps once.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax

from .schedules import make_lr_schedule


class GradientAccumulation(optax.MultiSteps):
    """`optax.MultiSteps` (its state, running mean and counters) with an update that XLA can run in place.

    At k > 1 micro-batches per step, acc ← acc + (g − acc)/(n + 1) for n = 0 … k − 1 (MultiSteps' running mean);
    at n = k − 1 the inner optimizer steps on that mean and acc resets to 0. The inner step is a `lax.cond` branch
    taken only then; the other k − 1 micro-steps return zero updates and leave its state as it was. `apply` returns
    the new parameters instead of updates (the train step's form): there those k − 1 micro-steps do not touch them.
    At k = 1 the mean of one gradient is g and the accumulator stays 0, so the update calls the inner optimizer on g
    directly and advances `gradient_step`. Both give MultiSteps' updates and state (tests/test_train_step.py: equal
    to float rounding, as XLA fuses the programs differently), so checkpoints move between k = 1 and k > 1 runs.
    From a state left mid-accumulation by a k > 1 run, a k = 1 step applies its own gradient and sets `mini_step` to
    0, where MultiSteps would spend that step finishing the old mean and apply nothing.
    Why by hand: MultiSteps' update, written for any k, runs the inner optimizer on every micro-batch and selects
    between old and new state with `where(emit, …)`; that keeps XLA from updating the donated AdamW moments and
    accumulator in place, and it copies all three every micro-step (567 MiB for cars64). How the branches are
    written decides which arrays XLA copies (measured on the compiled cars64 step, bench/RESULTS.md): the running
    mean is computed inside each branch, not before the `cond` (else it is copied into the accumulator), and the
    reset after a step is a pass over acc (0·acc), not a fresh array of zeros (else that is built, then copied).
    """

    def __init__(self, inner: optax.GradientTransformation, every_k: int):
        super().__init__(inner, every_k_schedule=every_k)
        self.every_k = every_k

    def update(self, updates, state: optax.MultiStepsState, params=None, **extra_args):
        """MultiSteps' `update`: the inner optimizer's updates every k-th micro-batch, zeros between."""
        return self._every_k(updates, state, params, extra_args, on_step=lambda new_updates, params: new_updates,
                             on_hold=lambda params: optax.tree.zeros_like(updates))

    def apply(self, grads, state: optax.MultiStepsState, params):
        """`optax.apply_updates(params, update(grads, state, params)[0])` and the new state, with the parameters
        written only when the inner optimizer steps: a micro-batch that only accumulates leaves them as they are
        rather than adding zeros to every one (a pass over the parameters saved per such micro-batch)."""
        return self._every_k(grads, state, params, {},
                             on_step=lambda new_updates, params: optax.apply_updates(params, new_updates),
                             on_hold=lambda params: params)

    def _every_k(self, updates, state, params, extra_args, on_step, on_hold):
        """(on_step(inner updates, params) or on_hold(params), new state); the inner optimizer steps every k-th call."""
        if self.every_k == 1:
            updates, inner_state = self.inner_opt.update(updates, state.inner_opt_state, params, **extra_args)
            return on_step(updates, params), state._replace(
                mini_step=jnp.zeros_like(state.mini_step), gradient_step=optax.safe_increment(state.gradient_step),
                inner_opt_state=inner_state)
        n = state.mini_step
        emit = n == self.every_k - 1

        def running_mean(grads, acc):
            return jax.tree.map(lambda g, a: (a + (g - a) / (n + 1)).astype(a.dtype), grads, acc)

        def step_inner(grads, acc, inner_state, params):
            mean = running_mean(grads, acc)
            new_updates, inner_state = self.inner_opt.update(optax.tree.cast_like(mean, updates), inner_state,
                                                             params, **extra_args)
            reset = jax.tree.map(lambda a: jnp.where(jnp.isfinite(a), 0 * a, 0), acc)  # 0, also where acc is not finite
            return on_step(new_updates, params), inner_state, reset

        def accumulate(grads, acc, inner_state, params):
            return on_hold(params), inner_state, running_mean(grads, acc)

        result, inner_state, acc = jax.lax.cond(emit, step_inner, accumulate, updates, state.acc_grads,
                                                state.inner_opt_state, params)
        return result, state._replace(
            mini_step=optax.safe_increment(n) % self.every_k,
            gradient_step=jnp.where(emit, optax.safe_increment(state.gradient_step), state.gradient_step),
            inner_opt_state=inner_state, acc_grads=acc)


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
