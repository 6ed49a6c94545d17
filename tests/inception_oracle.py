"""PyTorch references for the FID feature extractor: torch-fidelity's Inception v3 (the same network and state_dict
keys as pytorch-fid's pt_inception-2015-12-05-6726825d.pth) and k-diffusion 0.0.15's InceptionV3FeatureExtractor.

torch-fidelity's package __init__ imports its CLIP/VGG/DINOv2 extractors, which need torchvision (not installed, and
not to be: its wheels would replace the CPU torch). Only its `feature_extractor_inceptionv3` module is needed, so the
package is put in `sys.modules` as a bare module whose `__path__` is the real package directory: submodules import
normally and the package __init__ never runs.

torch-fidelity's `forward` resizes with its own TF-style bilinear and takes uint8 input; the references here call its
layers directly on an already normalised 299² input, as clean-fid's `InceptionV3W(resize_inside=False)` (which
k-diffusion uses) does with the TorchScript copy of the same graph.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tests.oracle import import_k_diffusion


def _torch_fidelity_inception_module():
    name = 'torch_fidelity.feature_extractor_inceptionv3'
    if name in sys.modules:
        return sys.modules[name]
    if 'torch_fidelity' not in sys.modules:
        spec = importlib.util.find_spec('torch_fidelity')
        if spec is None or not spec.submodule_search_locations:
            raise ImportError('torch-fidelity is not installed (it is in requirements/test.txt)')
        package = types.ModuleType('torch_fidelity', 'torch-fidelity, without running its package __init__')
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules['torch_fidelity'] = package
    return importlib.import_module(name)


def _random_init_class():
    module = _torch_fidelity_inception_module()

    class RandomInitInceptionV3(module.FeatureExtractorInceptionV3):
        """torch-fidelity's network; given an empty state_dict it keeps PyTorch's default random initialisation."""

        def load_state_dict(self, state_dict, *args, **kwargs):
            if not state_dict:
                return None
            return super().load_state_dict(state_dict, *args, **kwargs)

    return RandomInitInceptionV3


def torch_fidelity_inception(weights_path: str | Path | None = None, *, seed: int = 0) -> torch.nn.Module:
    """torch-fidelity's FeatureExtractorInceptionV3 in eval mode: weights from `weights_path` (a state_dict .pth),
    or PyTorch's default random initialisation from `seed` if None (never downloads)."""
    cls = _random_init_class()
    if weights_path is not None:
        return cls('inception-v3-compat', ['2048'], feature_extractor_weights_path=str(weights_path))
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / 'empty.pth'
        torch.save({}, empty)
        torch.manual_seed(seed)
        return cls('inception-v3-compat', ['2048'], feature_extractor_weights_path=str(empty))


def pool_features(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """torch-fidelity's forward from the first convolution to the 2048-d pool, for NCHW input already resized to
    299² and normalised to (x − 128) / 128."""
    x = net.Conv2d_2b_3x3(net.Conv2d_2a_3x3(net.Conv2d_1a_3x3(x)))
    x = net.MaxPool_1(x)
    x = net.Conv2d_4a_3x3(net.Conv2d_3b_1x1(x))
    x = net.MaxPool_2(x)
    for name in ('Mixed_5b', 'Mixed_5c', 'Mixed_5d', 'Mixed_6a', 'Mixed_6b', 'Mixed_6c', 'Mixed_6d', 'Mixed_6e',
                 'Mixed_7a', 'Mixed_7b', 'Mixed_7c'):
        x = getattr(net, name)(x)
    return torch.flatten(net.AvgPool(x), 1)


class InceptionV3W(torch.nn.Module):
    """clean-fid's InceptionV3W(resize_inside=False) forward, with torch-fidelity's layers instead of the TorchScript
    graph: x in [0, 255], already 299² → (x − 128) / 128 → 2048 features."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        assert x.shape[2] == 299 and x.shape[3] == 299
        return pool_features(self.net, (x - 128) / 128).view(x.shape[0], 2048)


def kdiffusion_extractor(net: torch.nn.Module) -> torch.nn.Module:
    """k-diffusion 0.0.15's InceptionV3FeatureExtractor (its own forward: resize_right, grey → RGB, scale, clamp)
    around `net`, built without its download step."""
    import_k_diffusion()
    evaluation = importlib.import_module('k_diffusion.evaluation')
    if getattr(evaluation, 'resize').__module__ != 'resize_right.resize_right':
        raise RuntimeError('k_diffusion.evaluation was imported with a stubbed resize_right')
    extractor = evaluation.InceptionV3FeatureExtractor.__new__(evaluation.InceptionV3FeatureExtractor)
    torch.nn.Module.__init__(extractor)
    extractor.model = InceptionV3W(net)
    extractor.size = (299, 299)
    return extractor.eval()


CALIBRATION_GRIDS = (8, 32, 96, 299)


def calibration_images(generator: torch.Generator, n: int = 4) -> torch.Tensor:
    """n random 299² images in [−1, 1] from smooth to rough: uniform noise on grids of 8², 32², 96² and 299² pixels
    (`CALIBRATION_GRIDS`, cycled), upsampled bicubically."""
    images = []
    for i in range(n):
        grid = CALIBRATION_GRIDS[i % len(CALIBRATION_GRIDS)]
        low = torch.rand(1, 3, grid, grid, generator=generator) * 2 - 1
        images.append(F.interpolate(low, size=(299, 299), mode='bicubic', align_corners=False).clamp(-1, 1))
    return torch.cat(images)


def random_inception_state_dict(seed: int = 0, calibrate: bool = True, n_images: int = 4) -> dict[str, torch.Tensor]:
    """A random-weight state_dict of the FID Inception v3 with pytorch-fid's keys (fc and num_batches_tracked
    included, as in the real file).

    The first convolution's kernels are made mostly spatially constant (3 × their spatial mean + 0.3 × the random
    kernel): PyTorch's zero-mean random kernels are high-pass filters, which would make the network ~100× more
    sensitive to pixel noise than to image content. Batch-norm affine parameters are random so that they matter:
    weight in [0.5, 1.5], bias ~ N(0.5, 0.2²). The positive mean keeps most ReLUs active, which makes the random
    network far better conditioned: with zero-mean biases float32 rounding is amplified ~10× more (float32 and
    float64 PyTorch then differ by ~2e-5 relative, too close to a 1e-4 parity tolerance).

    With `calibrate`, the running statistics are those of one train-mode forward (momentum 1) over `n_images` random
    images from smooth to rough (`calibration_images`), so that activations keep about unit scale through the network
    (features ~0.7 ± 0.3 for noise, smooth or upscaled images alike); without it they are random (mean ~ N(0, 0.1²),
    var in [0.5, 2]) and activations drift in scale with depth.
    """
    net = torch_fidelity_inception(seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        first = net.Conv2d_1a_3x3.conv.weight
        first.copy_(3 * first.mean((2, 3), keepdim=True) + 0.3 * first)
        for bn in bns:
            bn.weight.copy_(torch.rand(bn.weight.shape, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(bn.bias.shape, generator=g) * 0.2 + 0.5)
            bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=g) * 0.1)
            bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=g) * 1.5 + 0.5)
        if calibrate:
            for bn in bns:
                bn.momentum = 1.0
                bn.train()
            pool_features(net, calibration_images(g, n_images))
            for bn in bns:
                bn.momentum = 0.1
                bn.eval()
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def write_random_inception_weights(path: str | Path, seed: int = 0, calibrate: bool = True) -> Path:
    """Write `random_inception_state_dict(seed, calibrate)` as a torch.save'd state_dict .pth (loadable by
    kdiff_jax.evaluation.inception.load_inception and by torch-fidelity). A few seconds on a CPU."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(random_inception_state_dict(seed, calibrate), path)
    return path


def to_nchw(x_nhwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.transpose(x_nhwc, (0, 3, 1, 2))))
