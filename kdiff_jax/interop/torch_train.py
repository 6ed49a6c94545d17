"""Continue a PyTorch k-diffusion run: its train.py checkpoint as a kdiff_jax TrainState.

Taken over: `model` (parameters and buffers), `model_ema`, AdamW's moments and step count (`opt`), the step counter
(k-diffusion resumes at `step + 1`), the EMA warmup counter (`ema_sched.last_epoch`) and the gradient noise scale
statistics (`gns_stats`, when the run measured them). The LR schedule position is
the number of optimizer updates. Parameter i of the optimizer state is the i-th parameter of the model in
state_dict order (buffers excluded), as `torch.nn.Module.parameters()` enumerates them.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ..factory import make_model
from ..training.gns import GNSState
from ..training.state import TrainModel, TrainState, create_train_state
from ..variables import saved_variables
from .torch_io import CheckpointError
from .torch_state import from_torch_layout, load_state_dict, torch_key


def is_torch_train_checkpoint(obj) -> bool:
    return isinstance(obj, Mapping) and {'model', 'model_ema', 'opt', 'step'} <= set(obj)


def _adam_moments(ckpt: Mapping, param_keys: list[str], source: str) -> tuple[dict, dict, int]:
    opt = ckpt['opt']
    group_params = [i for group in opt['param_groups'] for i in group['params']]
    if len(group_params) != len(param_keys):
        raise CheckpointError(f'{source}: optimizer state has {len(group_params)} parameters, the model '
                              f'{len(param_keys)}')
    mu, nu, steps = {}, {}, set()
    for index, key in zip(group_params, param_keys):
        entry = opt['state'].get(index)
        if entry is None:  # never updated: zero moments
            continue
        if 'exp_avg' not in entry:
            raise CheckpointError(f'{source}: optimizer state is not AdamW (no exp_avg for {key}); only AdamW '
                                  'runs can be continued')
        mu[key], nu[key] = entry['exp_avg'], entry['exp_avg_sq']
        steps.add(int(np.asarray(entry['step'])))
    if len(steps) > 1:
        raise CheckpointError(f'{source}: parameters have different AdamW step counts {sorted(steps)}')
    return mu, nu, steps.pop() if steps else 0


def train_state_from_torch(ckpt: Mapping, config, tx: optax.MultiSteps, seed: int,
                           source: str = 'checkpoint') -> tuple[TrainModel, TrainState]:
    """The TrainState that continues the k-diffusion run saved in `ckpt` (a train.py checkpoint dict)."""
    if config['optimizer']['type'] != 'adamw':
        raise CheckpointError('continuing a PyTorch run is supported for optimizer.type adamw only')
    model, ema = make_model(config, initialize=False), make_model(config, initialize=False)
    load_state_dict(model, ckpt['model'], source=f'{source} [model]')
    load_state_dict(ema, ckpt['model_ema'], source=f'{source} [model_ema]')
    train_model, state = create_train_state(model, tx, seed, ema_model=ema)

    param_vars = {p: v for p, v in saved_variables(model).items() if isinstance(v, nnx.Param)}
    by_key = {torch_key(p, v): p for p, v in param_vars.items()}
    param_keys = [k for k in ckpt['model'] if k in by_key]  # parameters() order
    mu_t, nu_t, adam_step = _adam_moments(ckpt, param_keys, source)

    def moments(torch_moments):
        flat = {}
        for key, path in by_key.items():
            value = torch_moments.get(key)
            flat[path] = (jnp.zeros(param_vars[path].shape, jnp.float32) if value is None else
                          jnp.asarray(from_torch_layout(path, param_vars[path], np.asarray(value, np.float32))))
        return nnx.from_flat_state({p: param_vars[p].replace(v) for p, v in flat.items()})

    count = jnp.asarray(adam_step, jnp.int32)

    def restore_inner(s):
        if isinstance(s, optax.ScaleByAdamState):
            return s._replace(count=count, mu=moments(mu_t), nu=moments(nu_t))
        if isinstance(s, optax.ScaleByScheduleState):
            return s._replace(count=count)
        return s

    inner = tuple(restore_inner(s) for s in state.opt_state.inner_opt_state)
    opt_state = state.opt_state._replace(inner_opt_state=inner, gradient_step=count)
    ema_updates = int(ckpt.get('ema_sched', {}).get('last_epoch', adam_step))
    gns_stats = ckpt.get('gns_stats')
    gns = GNSState.from_torch(gns_stats) if isinstance(gns_stats, Mapping) else state.gns
    state = state.replace(step=jnp.asarray(int(ckpt['step']) + 1, jnp.int32), opt_state=opt_state,
                          ema_updates=jnp.asarray(ema_updates, jnp.int32), gns=gns)
    return train_model, state
