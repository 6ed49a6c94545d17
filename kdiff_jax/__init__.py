"""kdiff_jax: k-diffusion (Karras et al. 2022, EDM) in JAX/Flax NNX, with PyTorch checkpoint interop.

The names below (and the submodules) are imported on first use (PEP 562), so that `import kdiff_jax.config` or the
CLIs' start-up (kdiff_jax.malloc restarts the process before any work) do not pay for importing JAX.
"""

from __future__ import annotations

import importlib
import importlib.util

__version__ = '0.1.0'
_EXPORTS = {
    'load_denoiser': 'checkpoint', 'load_model': 'checkpoint', 'save_model': 'checkpoint',
    'ConfigError': 'config', 'load_config': 'config',
    'Denoiser': 'denoisers', 'DenoiserWithVariance': 'denoisers', 'SimpleLossDenoiser': 'denoisers',
    'make_denoiser': 'factory', 'make_model': 'factory',
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f'.{_EXPORTS[name]}', __name__), name)
    if importlib.util.find_spec(f'{__name__}.{name}') is not None:  # a submodule, e.g. kdiff_jax.checkpoint
        return importlib.import_module(f'.{name}', __name__)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
    return sorted([*globals(), *_EXPORTS])
