"""Dropout whose random numbers for a whole forward pass come from one draw.

XLA:CPU compiles each `jax.random` call as its own rolled threefry loop. nnx.Dropout derives a key from its RNG
stream and draws its mask on every call, and image_v1 has a dropout after every 3×3 convolution and in every
attention: cars64's training step held 240 such loops (80 dropouts; two key derivations and a draw each). With one
draw it compiled in 31–38 s (median 35) instead of 39–55 s (median 42) on 2 CPU cores (bench/RESULTS.md,
session 15).

`with_dropout_noise(key, fn)` runs `fn()` so that every `Dropout` in it in training mode takes its noise from one
draw: `fn` is first traced abstractly (`jax.eval_shape`, nothing computed) to record each dropout's mask shape
[N, ...], then U ~ U[0, 1) of shape [N, Σ_i m_i] (m_i: layer i's mask size per sample) is drawn once, and the i-th
dropout called keeps where U[:, columns of i] < 1 − p, scaling survivors by 1/(1 − p) as nnx.Dropout does. The
batch axis leads, so the draw shards with the batch. Outside that context `Dropout` is nnx.Dropout, drawing from its
own stream.
Written by hand: flax and jax draw per call; nothing draws the noise of several layers at once.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx


class Dropout(nnx.Dropout):
    """nnx.Dropout that takes its mask's noise from the active `with_dropout_noise`, if any."""

    def __call__(self, inputs, *, deterministic: bool | None = None, rngs=None):
        source = _active.get()
        off = self.deterministic if deterministic is None else deterministic
        if source is None or rngs is not None or off or self.rate in (0.0, 1.0):
            return super().__call__(inputs, deterministic=deterministic, rngs=rngs)
        keep_prob = 1.0 - self.rate
        shape = list(inputs.shape)
        for dim in self.broadcast_dims:
            shape[dim] = 1
        keep = jnp.broadcast_to(source.take(tuple(shape)) < keep_prob, inputs.shape)
        return jax.lax.select(keep, inputs / keep_prob, jnp.zeros_like(inputs))


class _ShapeRecorder:
    """The abstract pass: records each dropout's mask shape."""

    def __init__(self):
        self.shapes: list[tuple[int, ...]] = []

    def take(self, shape):
        self.shapes.append(shape)
        return jnp.zeros(shape, jnp.float32)


class _NoiseColumns:
    """The real pass: hands out consecutive columns of one [N, Σ m_i] draw, checking the shapes recorded."""

    def __init__(self, noise: jax.Array, shapes: list[tuple[int, ...]]):
        self.noise, self.shapes, self.taken, self.column = noise, shapes, 0, 0

    def take(self, shape):
        if self.taken >= len(self.shapes) or self.shapes[self.taken] != shape:
            expected = self.shapes[self.taken] if self.taken < len(self.shapes) else 'no further dropout'
            raise RuntimeError(f'dropout call {self.taken} asked for noise of shape {shape}, but the abstract pass '
                               f'recorded {expected}: the function must call the same dropouts each time it runs')
        size = math.prod(shape[1:])
        columns = self.noise[:, self.column:self.column + size]
        self.taken, self.column = self.taken + 1, self.column + size
        return columns.reshape(shape)


_active: contextvars.ContextVar = contextvars.ContextVar('dropout_noise', default=None)


@contextlib.contextmanager
def _using(source):
    token = _active.set(source)
    try:
        yield source
    finally:
        _active.reset(token)


def with_dropout_noise(key: jax.Array, fn: Callable[[], object]):
    """`fn()`, with the noise of every `Dropout` it calls in training mode drawn at once from `key`."""
    with _using(_ShapeRecorder()) as recorder:
        jax.eval_shape(fn)
    if not recorder.shapes:
        return fn()
    batch = {shape[0] for shape in recorder.shapes}
    if len(batch) != 1:
        raise ValueError(f'dropout masks must share their leading (batch) axis, got shapes {recorder.shapes}')
    noise = jax.random.uniform(key, (batch.pop(), sum(math.prod(s[1:]) for s in recorder.shapes)))
    with _using(_NoiseColumns(noise, recorder.shapes)) as columns:
        out = fn()
    if columns.taken != len(recorder.shapes):
        raise RuntimeError(f'{columns.taken} dropout calls took noise, but the abstract pass recorded '
                           f'{len(recorder.shapes)}: the function must call the same dropouts each time it runs')
    return out
