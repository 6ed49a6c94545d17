"""The optimizer of `config.optimizer` / `config.lr_sched` as one optax transformation.

AdamW (k-diffusion's default: decoupled weight decay on every parameter, as `torch.optim.AdamW`) or SGD
(`torch.optim.SGD`: L2 weight decay added to the gradient, then momentum), with the LR schedule of
`schedules.make_lr_schedule`, wrapped in `optax.MultiSteps` for gradient accumulation: gradients of
`grad_accum_steps` micro-batches are averaged and the inner optimizer (and so the LR schedule) steps once.
"""

from __future__ import annotations

from collections.abc import Mapping

import optax

from .schedules import make_lr_schedule


def make_optimizer(config: Mapping, *, lr: float | None = None, grad_accum_steps: int = 1) -> optax.MultiSteps:
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
    return optax.MultiSteps(inner, every_k_schedule=grad_accum_steps)
