"""Reading and writing PyTorch checkpoint files safely.

`.pth`/`.pt`/`.ckpt` files are read only with `torch.load(weights_only=True)`, which restores tensors and plain
containers and refuses any pickle that would construct other objects or run code; `.safetensors` files hold no code
at all. torch is needed for `.pth` files only and is imported lazily.
"""

from __future__ import annotations

import os

from collections.abc import Mapping
from pathlib import Path

import numpy as np

TRAIN_CHECKPOINT_KEYS = ('model', 'model_ema')


class CheckpointError(ValueError):
    """A checkpoint file cannot be used: unsafe, unreadable, or not the expected content."""


def _import_torch():
    try:
        import torch
    except ImportError as e:
        raise CheckpointError('reading or writing .pth files needs PyTorch: pip install "kdiff_jax[torch]" '
                              '(or convert the file to .safetensors elsewhere)') from e
    return torch


def read_checkpoint_file(path: str | Path) -> Mapping:
    """The object stored in a PyTorch checkpoint file, with tensors as numpy arrays (nested dicts are kept)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'{path}: no such file')
    if path.suffix == '.safetensors':
        from safetensors.numpy import load_file
        try:
            return load_file(str(path))
        except Exception as e:
            raise CheckpointError(f'{path}: not a readable safetensors file ({e})') from e
    torch = _import_torch()
    import pickle
    try:
        obj = torch.load(str(path), map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        detail = _unpickler_detail(e)
        if 'global' in detail.lower() or 'unsupported class' in detail.lower():
            raise CheckpointError(
                f'{path}: refused to load: the file contains pickled objects other than tensors and plain '
                f'containers, which could run code. Nothing from it was executed. ({detail}) If you trust the file, '
                f're-save its state_dict as .safetensors.') from e
        raise CheckpointError(f'{path}: not a readable PyTorch checkpoint (invalid pickle: {detail})') from e
    except Exception as e:
        raise CheckpointError(f'{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})') from e
    return _tensors_to_numpy(obj, torch)


def _unpickler_detail(error: Exception) -> str:
    """The last line of torch's weights-only unpickler error before its boilerplate: what it met."""
    text = str(error).split('Check the documentation', 1)[0]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1].replace('WeightsUnpickler error:', '').strip() if lines else type(error).__name__


def _tensors_to_numpy(obj, torch):
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        return (t.float() if t.dtype in (torch.bfloat16, torch.float16) else t).numpy()
    if isinstance(obj, Mapping):
        return {k: _tensors_to_numpy(v, torch) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_tensors_to_numpy(v, torch) for v in obj)
    return obj


def select_state_dict(obj: Mapping, which: str = 'model_ema', source: str = 'checkpoint') -> dict[str, np.ndarray]:
    """The model state_dict inside a train.py checkpoint (`obj[which]`) or `obj` itself if it is a bare state_dict."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f'{source}: expected a dict, found {type(obj).__name__}')
    if any(k in obj for k in TRAIN_CHECKPOINT_KEYS):
        if which not in TRAIN_CHECKPOINT_KEYS:
            raise CheckpointError(f'--which must be one of {TRAIN_CHECKPOINT_KEYS}, got {which!r}')
        if which not in obj:
            raise CheckpointError(f'{source}: train checkpoint has no {which!r} entry (it has {sorted(obj)})')
        obj = obj[which]
    not_arrays = [k for k, v in obj.items() if not isinstance(v, np.ndarray)]
    if not_arrays:
        raise CheckpointError(f'{source}: not a state_dict: entries {not_arrays[:5]} are not tensors; expected a '
                              f'k-diffusion train.py checkpoint (with {TRAIN_CHECKPOINT_KEYS}) or a bare state_dict')
    return dict(obj)


def write_state_dict(state_dict: Mapping[str, np.ndarray], path: str | Path) -> Path:
    """Write a state_dict as `.safetensors` (no torch needed) or `.pth` (torch.save of a dict of tensors), through a
    temporary file beside it that replaces `path` only once complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.ascontiguousarray(v) for k, v in state_dict.items()}
    partial = path.with_name(f'.{path.name}.partial-{os.getpid()}')
    try:
        if path.suffix == '.safetensors':
            from safetensors.numpy import save_file
            save_file(arrays, str(partial))
        else:
            torch = _import_torch()
            torch.save({k: torch.from_numpy(v.copy()) for k, v in arrays.items()}, str(partial))
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path
