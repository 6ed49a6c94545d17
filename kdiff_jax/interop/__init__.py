"""PyTorch k-diffusion interop: safe reading of checkpoints, strict key/layout mapping, export."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from flax import nnx

from .torch_io import CheckpointError, read_checkpoint_file, select_state_dict, write_state_dict
from .torch_state import StateDictMismatch, load_state_dict, model_to_state_dict

__all__ = ['CheckpointError', 'StateDictMismatch', 'model_from_torch_checkpoint', 'export_torch_state_dict',
           'read_checkpoint_file', 'select_state_dict', 'load_state_dict', 'model_to_state_dict']


def default_candidate_configs() -> list[Path]:
    """The Python configs shipped in the repository's configs/ folder, if this is a source checkout."""
    folder = Path(__file__).resolve().parents[2] / 'configs'
    return sorted(p for p in folder.glob('*.py') if p.name != '__init__.py')


def model_from_torch_checkpoint(path: str | Path, config, which: str = 'model_ema',
                                candidate_configs: Iterable[str | Path] | None = None) -> nnx.Module:
    """The kdiff_jax network of `config` (a loaded config, or a .py / k-diffusion .json config file's path) holding
    the weights of a PyTorch k-diffusion checkpoint.

    `path`: a train.py checkpoint (`which` picks 'model_ema' or 'model'), a bare state_dict `.pth`, or a
    `.safetensors` file. Loading is strict (see `load_state_dict`).
    """
    from ..config import as_config
    from ..factory import make_model

    config = as_config(config)
    state_dict = select_state_dict(read_checkpoint_file(path), which, source=str(path))
    model = make_model(config, initialize=False)
    candidates = default_candidate_configs() if candidate_configs is None else candidate_configs
    load_state_dict(model, state_dict, source=str(path), candidate_configs=candidates)
    return model


def export_torch_state_dict(model: nnx.Module, path: str | Path) -> Path:
    """Write `model`'s k-diffusion state_dict to `.pth` or `.safetensors`; k-diffusion loads it with strict=True."""
    return write_state_dict(model_to_state_dict(model), path)
