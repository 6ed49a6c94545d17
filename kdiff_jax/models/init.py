"""PyTorch's default weight init, drawn so that XLA compiles a model's initialisation quickly.

`make_model` builds a network inside one `jax.jit`; XLA:CPU compiles each `jax.random` draw there as its own rolled
loop of the threefry hash, and LLVM takes longer the higher the rank of the drawn array (vmapped over 8 keys: a
[64, 64] draw compiled in 0.77 s, a [4096] one in 0.37 s). Two things keep that program small, with the same values:
- `torch_default_init` draws a flat vector and reshapes it. jax's counters are the row-major flat index, so the
  values are those of drawing the shape directly.
- Inside `deferred_draws()` an `Initializer` returns a placeholder and records (key, shape, dtype); `fill(tree)`
  then draws each distinct (initializer, shape, dtype) once, `jax.vmap`ped over the recorded keys (the hash is
  elementwise in (key, counter), so vmap only stacks the keys), and puts each draw where its placeholder is. A
  U-Net has few distinct kernel shapes: cars64 draws 218 parameters in 16 shapes.
cars64's initialisation compiled in 16.9 s before, 5.7 s now (bench/RESULTS.md, session 14); tests/test_factory.py
checks the values against flax's initializer and flax's per-parameter draws.
Written by hand: flax and jax draw per call; nothing batches the initializers of a module tree.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections import defaultdict
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp


class Initializer:
    """`fn(key, shape, dtype) -> array`, a random initializer as flax calls one, whose draw `deferred_draws` defers."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, key, shape, dtype=jnp.float32):
        draws = _active.get()
        return self.fn(key, shape, dtype) if draws is None else draws.defer(self, key, shape, dtype)


def _uniform_fan_in(key, shape, dtype):
    """U(−1, 1)·√(3·(1/3)/fan_in), fan_in = prod(shape[:-1]), computed as flax's `variance_scaling(1/3, 'fan_in',
    'uniform')` computes it, but drawn as a flat vector."""
    shape = tuple(shape)
    variance = jnp.array((1 / 3) / math.prod(shape[:-1]), dtype=dtype)
    return (jax.random.uniform(key, (math.prod(shape),), dtype, -1) * jnp.sqrt(3 * variance)).reshape(shape)


#: PyTorch's default Conv2d/Linear weight init (kaiming_uniform with a=sqrt(5)): U(±1/√fan_in), for kernels laid out
#: [..., in, out] (HWIO, and nnx.Linear's [in, out]).
torch_default_init = Initializer(_uniform_fan_in)


class DeferredDraws:
    """The draws deferred while it was active: placeholders, and what each stands for."""

    def __init__(self):
        self._pending: dict[int, tuple] = {}  # id(placeholder) -> (placeholder, initializer, key, shape, dtype)

    def defer(self, init: Initializer, key, shape, dtype) -> jax.Array:
        placeholder = jnp.zeros(shape, dtype)  # a new array per call, kept alive here so that its id stays unique
        self._pending[id(placeholder)] = (placeholder, init, key, tuple(shape), jnp.dtype(dtype))
        return placeholder

    def fill(self, tree):
        """`tree` with every placeholder replaced by its draw. Raises if one is not in `tree` as returned (a module
        that transformed its initializer's output before storing it would otherwise keep zeros)."""
        groups = defaultdict(list)
        for pid, (_, init, key, shape, dtype) in self._pending.items():
            groups[init, shape, dtype].append((pid, key))
        drawn = {}
        for (init, shape, dtype), members in groups.items():
            values = jax.vmap(lambda key: init.fn(key, shape, dtype))(  # noqa: B023 -- called here
                jnp.stack([key for _, key in members]))
            drawn.update((pid, values[i]) for i, (pid, _) in enumerate(members))
        placed = set()

        def place(x):
            if id(x) not in drawn:
                return x
            placed.add(id(x))
            return drawn[id(x)]

        tree = jax.tree.map(place, tree)
        if len(placed) != len(drawn):
            raise RuntimeError(f'{len(drawn) - len(placed)} of {len(drawn)} deferred parameter draws are not in the '
                               'model state as drawn (a module changed its initializer output)')
        return tree


_active: contextvars.ContextVar[DeferredDraws | None] = contextvars.ContextVar('deferred_draws', default=None)


@contextlib.contextmanager
def deferred_draws() -> Iterator[DeferredDraws]:
    """Within it, `Initializer`s return placeholders; call `fill` on the built state to draw them."""
    draws = DeferredDraws()
    token = _active.set(draws)
    try:
        yield draws
    finally:
        _active.reset(token)
