"""Helpers shared by the parity tests: random-weight k-diffusion models, their kdiff_jax twins, error measures."""

from __future__ import annotations

import numpy as np
import torch

from kdiff_jax.config import load_config, to_kdiffusion_dict
from kdiff_jax.factory import make_denoiser, make_model
from kdiff_jax.interop import load_state_dict
from tests.oracle import import_k_diffusion

K = import_k_diffusion()

SIGMAS = np.array([0.01, 0.1, 0.5, 1.0, 5.0, 80.0], np.float32)


def small_config(**model_overrides):
    """A cars-like config small enough for CPU tests: 3 stages, attention in the deeper two, dropout on."""
    model = dict(type='image_v1', input_channels=3, input_size=[16, 16], patch_size=1, skip_stages=1, mapping_out=64,
                 depths=[1, 2, 2], channels=[32, 32, 64], self_attn_depths=[False, True, True], dropout_rate=0.05,
                 augment_wrapper=True, augment_prob=0.12, sigma_data=0.5, sigma_min=0.01, sigma_max=80.,
                 sigma_sample_density=dict(type='lognormal', mean=-1.2, std=1.2))
    model.update(model_overrides)
    return load_config({'model': model})


def perturb_(module: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Add noise to every tensor of the state_dict (buffers, zero-initialised proj_out included): nothing stays 0.
    Except the resampling filters, constants in k-diffusion, which load_state_dict checks instead."""
    fixed = {f'{name}.kernel' for name, m in module.named_modules()
             if isinstance(m, (K.layers.Downsample2d, K.layers.Upsample2d))}
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, v in module.state_dict().items():
            if key not in fixed:
                v.add_(torch.randn(v.shape, generator=gen) * scale)
    return module


def torch_state_dict_np(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def make_pair(config, seed: int = 0):
    """(k-diffusion denoiser, kdiff_jax denoiser) holding the same random weights, both in eval mode."""
    kd_config = to_kdiffusion_dict(config)
    inner = perturb_(K.config.make_model(kd_config), seed).eval()
    torch_denoiser = K.config.make_denoiser_wrapper(kd_config)(inner).eval()
    model = make_model(config, initialize=False)
    load_state_dict(model, torch_state_dict_np(inner))
    return torch_denoiser, make_denoiser(config, model)


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))
