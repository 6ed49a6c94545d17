"""PyTorch k-diffusion state_dict ↔ kdiff_jax model, both directions, strict.

Names: the NNX path joined with '.', minus the container name `layers` (PyTorch Sequentials are indexed directly),
with a Param's `kernel` (Conv/Linear) or `scale` (LayerNorm) called `weight`. Buffers keep their names.
Layouts: Conv kernels HWIO ↔ OIHW, Linear kernels (in, out) ↔ (out, in); everything else as is.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path as FsPath

import numpy as np
from flax import nnx

from ..variables import Path, assign_variables, saved_variables

_CONTAINER_NAMES = {'layers'}
_PARAM_RENAMES = {'kernel': 'weight', 'scale': 'weight'}


class StateDictMismatch(ValueError):
    """A PyTorch state_dict does not fit the model of the config: keys or shapes differ."""


def torch_key(path: Path, variable: nnx.Variable) -> str:
    names = [str(p) for p in path if p not in _CONTAINER_NAMES]
    if isinstance(variable, nnx.Param):
        names[-1] = _PARAM_RENAMES.get(names[-1], names[-1])
    return '.'.join(names)


def _is_weight_matrix(path: Path, variable: nnx.Variable) -> bool:
    return isinstance(variable, nnx.Param) and path[-1] == 'kernel'


def to_torch_layout(path: Path, variable: nnx.Variable, array: np.ndarray) -> np.ndarray:
    if _is_weight_matrix(path, variable):
        return np.transpose(array, (3, 2, 0, 1) if array.ndim == 4 else (1, 0))
    return array


def from_torch_layout(path: Path, variable: nnx.Variable, array: np.ndarray) -> np.ndarray:
    if _is_weight_matrix(path, variable):
        return np.transpose(array, (2, 3, 1, 0) if array.ndim == 4 else (1, 0))
    return array


def expected_torch_shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
    """k-diffusion state_dict keys and PyTorch shapes for `model` (which may be abstract, from `nnx.eval_shape`)."""
    shapes = {}
    for path, var in saved_variables(model).items():
        shape = var.shape
        if _is_weight_matrix(path, var):
            shape = tuple(shape[i] for i in ((3, 2, 0, 1) if len(shape) == 4 else (1, 0)))
        shapes[torch_key(path, var)] = tuple(shape)
    return shapes


def model_to_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """The k-diffusion state_dict (numpy float32 arrays in PyTorch layout) of `model`."""
    return {torch_key(path, var): np.ascontiguousarray(to_torch_layout(path, var, np.asarray(var[...])))
            for path, var in saved_variables(model).items()}


def describe_mismatch(expected: Mapping[str, tuple], found: Mapping[str, tuple], limit: int = 20) -> str | None:
    """A readable list of missing keys, unexpected keys and shape differences; None if the two agree."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = sorted(k for k in set(expected) & set(found) if tuple(expected[k]) != tuple(found[k]))
    if not (missing or unexpected or shapes):
        return None
    lines = []
    for title, keys, fmt in (
            ('missing from the checkpoint', missing, lambda k: f'{k} (model expects {tuple(expected[k])})'),
            ('unexpected in the checkpoint', unexpected, lambda k: f'{k} (checkpoint has {tuple(found[k])})'),
            ('shape mismatch', shapes,
             lambda k: f'{k}: checkpoint {tuple(found[k])}, model expects {tuple(expected[k])}')):
        if keys:
            lines.append(f'{len(keys)} {title}:')
            lines += [f'  {fmt(k)}' for k in keys[:limit]]
            if len(keys) > limit:
                lines.append(f'  ... and {len(keys) - limit} more')
    return '\n'.join(lines)


def load_state_dict(model: nnx.Module, state_dict: Mapping[str, np.ndarray], *, source: str = 'state_dict',
                    candidate_configs: Iterable[str | FsPath] = ()) -> None:
    """Fill every parameter and buffer of `model` from a k-diffusion state_dict, strictly.

    Every key must be consumed and every variable filled with the right shape; otherwise StateDictMismatch lists
    each offending key with both shapes, and names those of `candidate_configs` whose model would fit. The
    resampling kernels, fixed in k-diffusion, must hold its filter (Downsample2d relies on it being separable).
    """
    found = {k: tuple(np.shape(v)) for k, v in state_dict.items()}
    problems = describe_mismatch(expected_torch_shapes(model), found)
    if problems:
        hint = _config_hint(found, candidate_configs)
        raise StateDictMismatch(f'{source} does not match the model of the config:\n{problems}{hint}')
    altered = [key for key, kernel in resampling_kernels(model).items()
               if not np.array_equal(np.asarray(state_dict[key], np.float32), kernel)]
    if altered:
        raise StateDictMismatch(f"{source}: these resampling kernels differ from k-diffusion's fixed 4×4 filter, "
                                f"which the model assumes: {', '.join(altered)}")
    values = {}
    for path, var in saved_variables(model).items():
        values[path] = from_torch_layout(path, var, np.asarray(state_dict[torch_key(path, var)], np.float32))
    assign_variables(model, values)


def resampling_kernels(model: nnx.Module) -> dict[str, np.ndarray]:
    """The state_dict key and fixed value (k-diffusion's "linear" filter) of every Downsample2d/Upsample2d kernel."""
    from ..models.layers import Downsample2d, Upsample2d
    return {torch_key((*path, 'kernel'), node.kernel): np.asarray(node.default_kernel())
            for path, node in nnx.iter_graph(model) if isinstance(node, (Downsample2d, Upsample2d))}


def _config_hint(found: Mapping[str, tuple], candidate_configs: Iterable[str | FsPath]) -> str:
    from ..config import load_config
    from ..factory import abstract_model

    matches = []
    for path in candidate_configs:
        try:
            expected = expected_torch_shapes(abstract_model(load_config(str(path))))
        except Exception:  # a candidate that does not even load is simply not a match
            continue
        if describe_mismatch(expected, found) is None:
            matches.append(str(path))
    if matches:
        return '\nThe checkpoint matches ' + ' and '.join(matches) + ': pass that as the config.'
    return ''
