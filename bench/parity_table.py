#!/usr/bin/env python3
"""Measure kdiff_jax vs k-diffusion 0.0.15 parity on random weights and print the README's markdown table.

  .venv/bin/python bench/parity_table.py [--cars128]

Relative error = ‖ours − k-diffusion‖ / ‖k-diffusion‖ over a batch with σ ∈ {0.01, 0.1, 0.5, 1, 5, 80}, fp32, CPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from kdiff_jax.config import load_config, to_kdiffusion_dict  # noqa: E402
from tests.parity import K, SIGMAS, make_pair, nchw, nhwc, perturb_, rel_err  # noqa: E402
from tests.test_model_parity import CASES, _inputs  # noqa: E402


def measure(config, seed=0):
    torch_denoiser, denoiser = make_pair(config, seed)
    x, kwargs, torch_kwargs = _inputs(config, seed)
    jk = {k: jnp.asarray(v) for k, v in kwargs.items()}
    s_t, s_j = torch.from_numpy(SIGMAS), jnp.asarray(SIGMAS)
    with torch.no_grad():
        ref_d = nhwc(torch_denoiser(nchw(x), s_t, **torch_kwargs))
        ref_f = nhwc(torch_denoiser.inner_model(nchw(x), s_t, **torch_kwargs))
        noise = np.random.default_rng(seed).standard_normal(x.shape).astype(np.float32)
        ref_loss = torch_denoiser.loss(nchw(np.tanh(x)), nchw(noise), s_t, **torch_kwargs).numpy()
    d = denoiser(jnp.asarray(x), s_j, **jk)
    f = denoiser.inner_model(jnp.asarray(x), s_j, **jk)
    loss = denoiser.loss(jnp.asarray(np.tanh(x)), jnp.asarray(noise), s_j, **jk)
    per_sigma = max(rel_err(d[i], ref_d[i]) for i in range(len(SIGMAS)))
    return rel_err(d, ref_d), per_sigma, rel_err(f, ref_f), rel_err(loss, ref_loss)


def measure_cars128():
    config = load_config(str(Path(__file__).resolve().parents[1] / 'configs' / 'cars128.py'))
    from kdiff_jax.factory import make_denoiser, make_model
    from kdiff_jax.interop import load_state_dict
    inner = perturb_(K.config.make_model(to_kdiffusion_dict(config)), seed=5).eval()
    model = make_model(config, initialize=False)
    load_state_dict(model, {k: v.numpy() for k, v in inner.state_dict().items()})
    x = np.random.default_rng(0).standard_normal((2, 128, 128, 3)).astype(np.float32)
    sigma = np.array([0.05, 20.], np.float32)
    with torch.no_grad():
        ref = nhwc(K.config.make_denoiser_wrapper(to_kdiffusion_dict(config))(inner)(nchw(x), torch.from_numpy(sigma)))
    return rel_err(make_denoiser(config, model)(jnp.asarray(x), jnp.asarray(sigma)), ref)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--cars128', action='store_true', help='also the full 49.5M-parameter cars128 network')
    args = parser.parse_args()
    rows = []
    for name, config in tqdm(CASES.items(), desc='parity cases'):
        rows.append((name, *measure(config)))
    print('| case | D(x,σ) batch | D worst single σ | network F | loss |')
    print('|---|---|---|---|---|')
    for name, d, ds, f, loss in rows:
        print(f'| {name} | {d:.1e} | {ds:.1e} | {f:.1e} | {loss:.1e} |')
    if args.cars128:
        print(f'| cars128 full (49,525,507 params), batch 2 at 128² | {measure_cars128():.1e} | | | |')


if __name__ == '__main__':
    main()
