"""kdiff_jax: k-diffusion (Karras et al. 2022, EDM) in JAX/Flax NNX, with PyTorch checkpoint interop."""

from .checkpoint import load_denoiser, load_model, save_model
from .config import ConfigError, load_config
from .denoisers import Denoiser, DenoiserWithVariance, SimpleLossDenoiser
from .factory import make_denoiser, make_model

__version__ = '0.1.0'
__all__ = ['ConfigError', 'Denoiser', 'DenoiserWithVariance', 'SimpleLossDenoiser', 'load_config', 'load_denoiser',
           'load_model', 'make_denoiser', 'make_model', 'save_model']
