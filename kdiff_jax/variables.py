"""The saved variables of a model — parameters and buffers, not RNG streams — as a flat {path: Variable} map.

Checkpoints (orbax and PyTorch interop alike) read and write models through these two functions.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from .models.layers import Buffer

Path = tuple[str | int, ...]
SAVED = nnx.Any(nnx.Param, Buffer)


def saved_variables(model: nnx.Module) -> dict[Path, nnx.Variable]:
    """Parameters and buffers of `model` by NNX path, e.g. ('inner_model', 'proj_in', 'kernel')."""
    return dict(nnx.to_flat_state(nnx.state(model, SAVED)))


def path_to_str(path: Path) -> str:
    return '.'.join(str(p) for p in path)


def str_to_path(name: str) -> Path:
    return tuple(int(p) if p.isdigit() else p for p in name.split('.'))


def assign_variables(model: nnx.Module, values: Mapping[Path, object]) -> None:
    """Set saved variables of `model` in place; `values` must cover exactly `saved_variables(model)`.

    Each value is cast to the variable's dtype; shapes must already match (callers check and report them).
    """
    current = saved_variables(model)
    if set(values) != set(current):
        missing, extra = set(current) - set(values), set(values) - set(current)
        raise KeyError(f'variables do not match the model: missing {sorted(map(path_to_str, missing))}, '
                       f'unexpected {sorted(map(path_to_str, extra))}')
    new = {}
    for path, var in current.items():
        value = jnp.asarray(values[path], dtype=var.dtype)
        if value.shape != var.shape:
            raise ValueError(f'{path_to_str(path)}: shape {value.shape} does not match the model\'s {var.shape}')
        new[path] = var.replace(value)
    nnx.update(model, nnx.from_flat_state(new))


def non_finite_variables(model: nnx.Module) -> list[str]:
    """The paths of `model`'s saved variables that hold a NaN or an infinity (a damaged checkpoint or a diverged
    run: a network with any cannot give a finite output)."""
    values = {path_to_str(p): np.asarray(v[...]) for p, v in saved_variables(model).items()}  # numpy: no compiles
    return [name for name, value in values.items()
            if not np.issubdtype(value.dtype, np.integer) and value.dtype != bool  # floats, bfloat16 too
            and not np.isfinite(value).all()]
