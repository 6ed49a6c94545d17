"""kdiff_jax model checkpoints: an orbax directory holding the parameters, buffers and the config.

Layout (orbax CompositeCheckpointHandler, written atomically):
  <dir>/params   flat {NNX path joined by '.': array}, every parameter and buffer of the network
  <dir>/config   the full config as JSON
`load_denoiser(dir)` rebuilds the network from the stored config and returns the preconditioned denoiser.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from .config import config_to_dict, load_config
from .denoisers import Denoiser
from .factory import abstract_model, make_denoiser, make_model
from .variables import assign_variables, path_to_str, saved_variables, str_to_path


def is_model_checkpoint(directory: str | Path) -> bool:
    """Whether `directory` holds a kdiff_jax model checkpoint (what `save_model` writes)."""
    directory = Path(directory)
    return (directory / 'config').is_dir() and (directory / 'params').is_dir()


def save_model(directory: str | Path, model: nnx.Module, config) -> Path:
    """Write `model` (the network, not the denoiser) and `config` to the orbax checkpoint `directory`.

    The checkpoint is written beside `directory` and moved into place once complete. An existing `directory` is
    replaced only if it is empty or an earlier kdiff_jax model checkpoint; anything else (a training run, a folder of
    other files, a file) raises FileExistsError and is left as it is."""
    directory = Path(directory).absolute()
    if directory.exists() and not is_model_checkpoint(directory) and (
            not directory.is_dir() or any(directory.iterdir())):
        raise FileExistsError(f'{directory} exists and is not a kdiff_jax model checkpoint: not overwritten (choose '
                              'another directory, or remove it)')
    params = {path_to_str(p): np.asarray(v[...]) for p, v in saved_variables(model).items()}
    directory.parent.mkdir(parents=True, exist_ok=True)
    partial = directory.with_name(f'.{directory.name}.partial-{os.getpid()}')
    replaced = directory.with_name(f'.{directory.name}.replaced-{os.getpid()}')
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
            ckptr.save(partial, ocp.args.Composite(params=ocp.args.StandardSave(params),
                                                   config=ocp.args.JsonSave(config_to_dict(config))), force=True)
        if directory.exists():
            directory.rename(replaced)
        try:
            partial.rename(directory)
        except BaseException:  # put the earlier checkpoint back
            if replaced.exists() and not directory.exists():
                replaced.rename(directory)
            raise
    finally:
        for leftover in (partial, replaced):
            if leftover.exists():
                shutil.rmtree(leftover)
    return directory


def load_checkpoint_config(directory: str | Path):
    """The config stored in a kdiff_jax checkpoint."""
    directory = Path(directory).absolute()
    if not (directory / 'config').exists():
        raise FileNotFoundError(f'{directory} is not a kdiff_jax checkpoint (no config/ inside)')
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        restored = ckptr.restore(directory, ocp.args.Composite(config=ocp.args.JsonRestore()))
    return load_config(dict(restored.config))


def load_model(directory: str | Path, config=None) -> nnx.Module:
    """The network stored in `directory`, in eval mode (config from the checkpoint unless given)."""
    directory = Path(directory).absolute()
    config = config if config is not None else load_checkpoint_config(directory)
    target = {path_to_str(p): jax.ShapeDtypeStruct(v.shape, v.dtype)
              for p, v in saved_variables(abstract_model(config)).items()}
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        restored = ckptr.restore(directory, ocp.args.Composite(params=ocp.args.StandardRestore(target)))
    model = make_model(config, initialize=False)
    assign_variables(model, {str_to_path(k): v for k, v in restored.params.items()})
    return model


def load_denoiser(directory: str | Path) -> Denoiser:
    """The Karras-preconditioned denoiser stored in a kdiff_jax checkpoint directory, ready to sample (eval mode)."""
    config = load_checkpoint_config(directory)
    return make_denoiser(config, load_model(directory, config))
