"""Drawing many samples from a checkpoint: what sample.py and the notebook run.

`load_any_denoiser` takes a kdiff_jax checkpoint directory or a PyTorch `.pth`/`.safetensors` (converted on the
fly with a config). `generate` draws n samples in batches sharded over all local devices; sample k's randomness
comes from (seed, k) alone, so the images do not depend on the batch size or the device count.
`sample_batches` keeps the batches on the devices, sharded over a mesh (training's demo grids and FID/KID).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from .denoisers import Denoiser
from .sampling.api import RANGE_SAMPLERS, SCHEDULES, get_sampler, get_sigmas, sample
from .sampling.noise import initial_noise, sample_keys

TORCH_SUFFIXES = ('.pth', '.pt', '.ckpt', '.safetensors')


def is_checkpoint(path: str | Path) -> bool:
    """Whether `path` is something `load_any_denoiser` reads (rather than, say, a folder of images)."""
    from .checkpoint import is_model_checkpoint
    from .training.checkpointing import is_run_checkpoint_dir
    path = Path(path)
    if path.suffix in TORCH_SUFFIXES:
        return path.is_file()
    return path.is_dir() and (is_run_checkpoint_dir(path) or is_model_checkpoint(path))


def load_any_denoiser(path: str | Path, config=None, which: str = 'model_ema') -> tuple[Denoiser, object]:
    """(denoiser, config) from a kdiff_jax checkpoint directory (converted model, or a training run: its latest EMA
    weights), or a PyTorch checkpoint converted on the fly. Weights holding a NaN or an infinity raise
    CheckpointError."""
    from .checkpoint import load_checkpoint_config, load_model
    from .config import ConfigError, as_config
    from .factory import make_denoiser
    from .interop import CheckpointError
    from .variables import non_finite_variables
    path = Path(path)
    if path.suffix in TORCH_SUFFIXES:
        if config is None:
            raise ConfigError(f'{path} is a PyTorch checkpoint, which holds no config: pass --config '
                              '(e.g. configs/cars128.py)')
        from .interop import model_from_torch_checkpoint
        config = as_config(config)
        model = model_from_torch_checkpoint(path, config, which=which)
    else:
        from .training.checkpointing import is_run_checkpoint_dir, load_ema_model
        if is_run_checkpoint_dir(path):
            model, config = load_ema_model(path)
        else:
            config = load_checkpoint_config(path) if config is None else as_config(config)
            model = load_model(path, config)
    bad = non_finite_variables(model)
    if bad:
        raise CheckpointError(f'{path}: {len(bad)} weight arrays hold NaN or infinite values ({", ".join(bad[:5])}'
                              f'{", …" if len(bad) > 5 else ""}): a damaged checkpoint or a diverged run')
    return make_denoiser(config, model), config


@dataclass
class SamplingPlan:
    """What to draw: the sampler, its σ schedule and its keyword arguments, validated up front."""
    sampler: str = 'dpmpp_2m'
    steps: int = 50
    schedule: str = 'karras'
    sigma_min: float = 0.01
    sigma_max: float = 80.
    rho: float | None = None
    options: dict = field(default_factory=dict)  # e.g. s_churn, s_tmin, s_tmax, s_noise, eta

    def __post_init__(self):
        fn = get_sampler(self.sampler)  # raises for an unknown name
        if self.steps < 1:
            raise ValueError(f'steps must be >= 1, got {self.steps}')
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f'need 0 < sigma_min < sigma_max, got sigma_min={self.sigma_min}, '
                             f'sigma_max={self.sigma_max}')
        if self.schedule not in SCHEDULES:
            raise ValueError(f'unknown schedule {self.schedule!r}; expected one of {", ".join(SCHEDULES)}')
        accepted = inspect.signature(fn).parameters
        wrong = [k for k in self.options if k not in accepted]
        if wrong:
            options = [k for k in accepted if k not in ('model', 'x', 'sigmas', 'extra_args', 'callback', 'disable',
                                                         'noise_sampler', 'key', 'sigma_min', 'sigma_max', 'n')]
            raise ValueError(f'sampler {self.sampler} does not take {", ".join(wrong)}; its options are: '
                             f'{", ".join(options) or "none"}')

    def sigmas(self):
        return get_sigmas(self.schedule, self.steps, self.sigma_min, self.sigma_max, self.rho)


def _batch_sharding():
    mesh = jax.sharding.Mesh(np.asarray(jax.local_devices()), ('data',))
    return mesh.size, NamedSharding(mesh, P('data'))


def generate(denoiser: Denoiser, config: Mapping, plan: SamplingPlan, n: int, *, batch_size: int = 64,
             seed: int = 0, record: bool = False, progress: bool = True):
    """n samples in [N, H, W, C] (roughly [-1, 1]); with `record`, also the denoised prediction at every step of
    the first batch, [steps, B, H, W, C] (for trajectory videos)."""
    from .config import as_config
    from .sampling.api import integer_seed
    config = as_config(config)
    if n < 1:
        raise ValueError(f'n must be >= 1, got {n}')
    seed = integer_seed(seed)
    m = config['model']
    n_devices, sharding = _batch_sharding()
    batch_size = max(n_devices, -(-min(batch_size, n) // n_devices) * n_devices)  # a multiple of the devices
    sigmas = plan.sigmas()
    frames, outputs = [], []
    callback = (lambda info: frames.append(np.asarray(info['denoised']))) if record else None
    for start in tqdm(range(0, n, batch_size), desc=f'sampling ({plan.sampler}, {plan.steps} steps)',
                      disable=not progress, unit='batch'):
        indices = jnp.arange(start, start + batch_size, dtype=jnp.uint32)  # padded past n; extras dropped below
        x = initial_noise(sample_keys(seed, indices), (batch_size, *m['input_size'], m['input_channels']))
        x = jax.device_put(x * sigmas[0] if plan.sampler not in RANGE_SAMPLERS else x * plan.sigma_max, sharding)
        out = sample(denoiser, x, sigmas, plan.sampler, seed=seed, indices=indices,
                     callback=callback if start == 0 else None, **plan.options)
        outputs.append(np.asarray(out))
    images = np.concatenate(outputs)[:n]
    return (images, np.stack(frames)[:, :min(n, batch_size)]) if record else images


def sample_batches(denoiser: Denoiser, config: Mapping, batch_size: int, mesh: jax.sharding.Mesh, seed: int,
                   plan: SamplingPlan | None = None) -> Iterator[jax.Array]:
    """Endless batches of samples [batch_size, H, W, C] sharded over `mesh`, sample i seeded by (seed, i), drawn
    with `plan` (a generate.SamplingPlan; default dpmpp_2m, 50 Karras steps between the config's σ_min and σ_max)."""
    m = config['model']
    plan = plan or SamplingPlan('dpmpp_2m', 50, 'karras', m['sigma_min'], m['sigma_max'], 7.)
    sigmas = plan.sigmas()
    scale = plan.sigma_max if plan.sampler in RANGE_SAMPLERS else sigmas[0]
    sharding = NamedSharding(mesh, P('data'))
    start = 0
    while True:
        indices = jnp.arange(start, start + batch_size, dtype=jnp.uint32)
        x = initial_noise(sample_keys(seed, indices), (batch_size, *m['input_size'], m['input_channels']))
        yield sample(denoiser, jax.device_put(x * scale, sharding), sigmas, plan.sampler, seed=seed,
                     indices=indices, **plan.options)
        start += batch_size
