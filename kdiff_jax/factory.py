"""Build networks and denoisers from a config (k-diffusion's `config.make_model` / `make_denoiser_wrapper`)."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .denoisers import Denoiser, DenoiserWithVariance, SimpleLossDenoiser
from .models import ImageDenoiserModelV1, KarrasAugmentWrapper
from .models.init import deferred_draws
from .variables import SAVED

AUG_COND_DIM = 9
COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


class _RngStream(nnx.RngStream):
    """`nnx.RngStream` with the same keys, fold_in(key, count) for count = 0, 1, …, whose counter is written whole,
    and computed when traced where key and count are known.

    flax 0.12's stream writes `count[...] += 1`; an indexed write compares the new value's `sharding` with the old
    one's, and on a tracer jax 0.10 answers that by raising an AttributeError whose message names the tracer's origin,
    found by a scan of every equation traced so far. Building a model under `jit`/`eval_shape` draws a key per
    parameter, so that made construction quadratic in the model's size (cars128: 6,480 such scans; converting its
    checkpoint took 28 s, now 12). `set_value` without an index assigns the new count directly, as the indexed write
    ends up doing (bench/RESULTS.md, session 12).

    `jax.ensure_compile_time_eval`: while a model is built inside `make_model`'s jit, the seeds' key and count are
    concrete (`_Rngs` makes them so), so each parameter's key is computed then and enters the program as a constant,
    rather than as one threefry loop per parameter for XLA to compile (cars64's initialisation compiled in 27 s,
    now 18; bench/RESULTS.md, session 13). Where the stream holds tracers (dropout in a training step) it is traced
    as before."""

    def __call__(self) -> jax.Array:
        self.count._check_can_update()
        with jax.ensure_compile_time_eval():
            key = jax.random.fold_in(self.key[...], self.count[...])
            self.count.set_value(self.count[...] + 1)
        return key


class _Rngs(nnx.Rngs):
    """`nnx.Rngs(**seeds)` made of `_RngStream`s (modules that keep a stream, e.g. dropout, fork one of these), whose
    keys and counters are concrete arrays even when made inside a trace."""

    def __init__(self, **seeds: int):
        with jax.ensure_compile_time_eval():
            for tag, seed in seeds.items():
                setattr(self, tag, _RngStream(seed, tag=tag))


def _build_model(config: Mapping, rngs: nnx.Rngs) -> nnx.Module:
    m = config['model']
    if m['type'] != 'image_v1':
        raise ValueError(f"model.type {m['type']!r} is not supported; expected 'image_v1'")
    model = ImageDenoiserModelV1(
        m['input_channels'], m['mapping_out'], list(m['depths']), list(m['channels']), list(m['self_attn_depths']),
        None if m.get('cross_attn_depths') is None else list(m['cross_attn_depths']),
        mapping_cond_dim=m['mapping_cond_dim'] + (AUG_COND_DIM if m['augment_wrapper'] else 0),
        unet_cond_dim=m['unet_cond_dim'], cross_cond_dim=m['cross_cond_dim'], dropout_rate=m['dropout_rate'],
        patch_size=m['patch_size'], skip_stages=m['skip_stages'], has_variance=m['has_variance'],
        dtype=COMPUTE_DTYPES[m.get('dtype', 'float32')], rngs=rngs)
    if m['augment_wrapper']:
        model = KarrasAugmentWrapper(model)
    model.eval()
    return model


def _initial_state(build) -> nnx.State:
    """The state of `build()`, its random parameters drawn one distinct shape at a time (models/init.py)."""
    with deferred_draws() as draws:
        model = build()
    return draws.fill(nnx.split(model)[1])


def make_model(config: Mapping, *, seed: int = 0, initialize: bool = True) -> nnx.Module:
    """The network for `config.model` (wrapped in KarrasAugmentWrapper if `augment_wrapper`), in eval mode.

    Parameters are initialised inside one `jax.jit` (one XLA compilation rather than one per initializer). With
    `initialize=False` parameters and buffers are zeros, for callers that load every one of them next (converters,
    checkpoint loaders); only the dropout RNG streams are made, which compiles in a moment.
    """
    build = lambda: _build_model(config, _Rngs(params=seed, dropout=seed + 1))
    if initialize:
        graphdef, _ = nnx.split(nnx.eval_shape(build))
        return nnx.merge(graphdef, jax.jit(lambda: _initial_state(build))())
    graphdef, saved, _ = nnx.split(nnx.eval_shape(build), SAVED, ...)
    rest = jax.jit(lambda: nnx.split(build(), SAVED, ...)[2])()
    return nnx.merge(graphdef, jax.device_put(jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), saved)), rest)


def denoiser_class(config: Mapping) -> type[Denoiser]:
    m = config['model']
    loss_config = m.get('loss_config', 'karras')
    if loss_config == 'karras':
        return DenoiserWithVariance if m['has_variance'] else Denoiser
    if loss_config == 'simple':
        if m['has_variance']:
            raise ValueError('loss_config "simple" does not support a variance output (model.has_variance)')
        return SimpleLossDenoiser
    raise ValueError(f'unknown model.loss_config {loss_config!r}; expected "karras" or "simple"')


def make_denoiser(config: Mapping, model: nnx.Module | None = None, **make_model_kwargs) -> Denoiser:
    """The Karras-preconditioned denoiser of `config` around `model` (a fresh one if not given)."""
    model = model if model is not None else make_model(config, **make_model_kwargs)
    return denoiser_class(config)(model, sigma_data=config['model']['sigma_data'])


def abstract_model(config: Mapping) -> nnx.Module:
    """The network of `config` with shapes only (no memory, no init compute), e.g. to restore a checkpoint into."""
    return nnx.eval_shape(lambda: _build_model(config, _Rngs(default=0)))


def count_params(model: nnx.Module) -> int:
    """Trainable parameters (PyTorch `parameters()`; buffers excluded)."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
