"""The training state: a pytree of arrays (parameters, EMA, optimizer state, counters, PRNG key).

The network's structure (the NNX graphdef) and its RNG streams are not part of the state: `TrainModel` keeps them,
so the state can be jitted, sharded, donated and checkpointed as plain arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from ..models.layers import Buffer
from .gns import GNSState


@struct.dataclass
class TrainState:
    step: jax.Array          # micro-batches trained on (k-diffusion's `step`); keys the step's randomness
    params: nnx.State        # trainable parameters (nnx.Param)
    buffers: nnx.State       # fixed buffers (Fourier features, resampling kernels); copied into the EMA model
    ema_params: nnx.State    # exponential moving average of params (used for sampling)
    opt_state: optax.OptState
    ema_updates: jax.Array   # optimizer updates applied so far = EMA updates (the EMA warmup counter)
    skipped: jax.Array       # micro-batches skipped because their loss or gradient was not finite
    key: jax.Array           # base PRNG key (raw uint32[2]); step keys are fold_in(key, step)
    gns: GNSState            # gradient noise scale statistics (updated only when training with --gns)


@dataclass(frozen=True)
class TrainModel:
    """The static halves of the network: graphdefs for training (dropout on) and eval, and its RNG streams."""
    graphdef_train: nnx.GraphDef
    graphdef_eval: nnx.GraphDef
    rest: nnx.State

    def merge(self, params, buffers, *, train: bool) -> nnx.Module:
        # Fresh RNG-stream variables (a tree copy), so that a Dropout drawing from its own stream (outside
        # with_dropout_noise, models/dropout.py) may advance it inside the caller's trace.
        rest = jax.tree.map(lambda x: x, self.rest)
        return nnx.merge(self.graphdef_train if train else self.graphdef_eval, params, buffers, rest)


def split_model(model: nnx.Module) -> tuple[TrainModel, nnx.State, nnx.State]:
    """(TrainModel, params, buffers) of an NNX network."""
    model.train()
    graphdef_train, params, buffers, rest = nnx.split(model, nnx.Param, Buffer, ...)
    model.eval()
    graphdef_eval = nnx.split(model, nnx.Param, Buffer, ...)[0]
    return TrainModel(graphdef_train, graphdef_eval, rest), params, buffers


def create_train_state(model: nnx.Module, tx: optax.GradientTransformation, seed: int,
                       ema_model: nnx.Module | None = None) -> tuple[TrainModel, TrainState]:
    """A fresh state for `model` (EMA = a copy of the model unless `ema_model` is given)."""
    train_model, params, buffers = split_model(model)
    ema_params = params if ema_model is None else nnx.state(ema_model, nnx.Param)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, buffers=buffers,
                       ema_params=jax.tree.map(jnp.copy, ema_params), opt_state=tx.init(params),
                       ema_updates=jnp.zeros((), jnp.int32), skipped=jnp.zeros((), jnp.int32),
                       key=jax.random.key_data(jax.random.key(seed)), gns=GNSState.zeros())
    return train_model, state
