"""Grow a trained model into a larger config, as k-diffusion's `train.py --grow CKPT --grow-config OLD` does.

k-diffusion builds the OLD model, loads its `model_ema`, and if skip_stages or patch_size differ calls
`set_skip_stages` / `set_patch_size`, which re-create proj_in (fresh init) and proj_out (zeros), and
`set_skip_stages` also re-creates every resampler (kernels back to their fixed default values); it then loads that
into the new model. Equivalently: start from a fresh model of the new config and copy every other variable from the
old one. EMA, optimizer and schedules then start fresh.
"""

from __future__ import annotations

from flax import nnx

from ..factory import abstract_model, make_model
from ..models.layers import Buffer
from ..variables import assign_variables, path_to_str, saved_variables

_RECREATED = ('proj_in', 'proj_out')


def grow_model(old_model: nnx.Module, old_config, new_config, *, seed: int = 0) -> nnx.Module:
    """A model of `new_config` holding `old_model`'s weights (see module docstring)."""
    old_m, new_m = old_config['model'], new_config['model']
    new_stages = old_m['skip_stages'] != new_m['skip_stages']
    reshaped = new_stages or old_m['patch_size'] != new_m['patch_size']
    old_vars = saved_variables(old_model)
    for path, var in saved_variables(abstract_model(new_config)).items():  # check shapes before initialising
        reshaped_here = reshaped and any(name in path for name in _RECREATED)
        if path in old_vars and not reshaped_here and old_vars[path].shape != var.shape:
            raise ValueError(f'cannot grow: {path_to_str(path)} has shape {old_vars[path].shape} in the old model '
                             f'and {var.shape} in the new one; only skip_stages and patch_size may differ')
    new_model = make_model(new_config, seed=seed)
    values = {}
    for path, var in saved_variables(new_model).items():
        resampler = isinstance(var, Buffer) and path[-1] == 'kernel'
        fresh = (reshaped and any(name in path for name in _RECREATED)) or (new_stages and resampler)
        values[path] = var[...] if fresh or path not in old_vars else old_vars[path][...]
    assign_variables(new_model, values)
    return new_model
