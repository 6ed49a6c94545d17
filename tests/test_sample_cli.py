"""sample.py end to end: converted checkpoints and PyTorch files, grids, videos, argument errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import kdiff_jax
from kdiff_jax.config import config_to_dict
from kdiff_jax.factory import make_denoiser, make_model
from kdiff_jax.generate import SamplingPlan, generate
from kdiff_jax.interop import export_torch_state_dict
from tests.parity import small_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('sample')
    config = small_config(input_size=[8, 8], depths=[1, 1], channels=[8, 16], self_attn_depths=[False, True],
                          mapping_out=16, skip_stages=0)
    model = make_model(config, seed=4)
    model.inner_model.proj_out.kernel[...] = np.full(model.inner_model.proj_out.kernel.shape, 0.05, np.float32)
    kdiff_jax.save_model(tmp / 'ckpt', model, config)
    export_torch_state_dict(model, tmp / 'model.pth')
    (tmp / 'config.json').write_text(json.dumps(config_to_dict(config)))
    return tmp, config, model


def run_sample(*args):
    return subprocess.run([sys.executable, str(ROOT / 'sample.py'), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)


def test_sample_writes_images_grid_and_videos(checkpoints, tmp_path):
    tmp, config, model = checkpoints
    prefix = tmp_path / 'out' / 's'
    result = run_sample('--checkpoint', tmp / 'ckpt', '--sampler', 'dpmpp_2m', '--steps', '6', '-n', '5',
                        '--batch-size', '2', '--seed', '11', '--grid', '--video', '--prefix', prefix)
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith('wrote 5 images') and 's_grid.png' in last and '.gif' in last and '.mp4' in last
    images = [np.asarray(Image.open(f'{prefix}_{k:05}.png')) for k in range(5)]
    assert all(im.shape == (8, 8, 3) for im in images)
    assert Image.open(f'{prefix}_grid.png').size == (24, 16)  # 3 columns x 2 rows of 8x8
    gif = Image.open(f'{prefix}_trajectory.gif')
    assert gif.n_frames == 6 and gif.size == (16, 8)  # one frame per step; the first batch (2 images)
    assert Path(f'{prefix}_trajectory.mp4').stat().st_size > 0
    # the files hold what the library draws for the same seed, whatever the batch size
    ours = generate(make_denoiser(config, model), config, SamplingPlan('dpmpp_2m', 6, 'karras', 0.01, 80.), 5,
                    batch_size=5, seed=11, progress=False)
    expected = np.round((np.clip(ours, -1, 1) + 1) / 2 * 255)
    assert max(np.abs(im.astype(float) - e).max() for im, e in zip(images, expected)) <= 1


def test_sample_from_a_pytorch_file_on_the_fly(checkpoints, tmp_path):
    tmp, _, _ = checkpoints
    result = run_sample('--checkpoint', tmp / 'model.pth', '--config', tmp / 'config.json', '--sampler', 'dpm_2',
                        '--steps', '4', '--churn', '40', '--s-noise', '1.003', '-n', '2', '--prefix', tmp_path / 'p')
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / 'p_00001.png').exists()
    missing = run_sample('--checkpoint', tmp / 'model.pth', '-n', '1', '--prefix', tmp_path / 'q')
    assert missing.returncode == 2 and 'holds no config' in missing.stderr


@pytest.mark.parametrize('args,message', [
    (['--sampler', 'nope'], "unknown sampler 'nope'"),
    (['--steps', '0'], 'steps must be >= 1'),
    (['--sigma-min', '5', '--sigma-max', '1'], 'need 0 < sigma_min < sigma_max'),
    (['--sampler', 'heun', '--eta', '1'], 'sampler heun does not take eta'),
    (['--schedule', 'cosine'], "unknown schedule 'cosine'"),
])
def test_bad_arguments_get_one_clear_error(checkpoints, tmp_path, args, message):
    tmp, _, _ = checkpoints
    result = run_sample('--checkpoint', tmp / 'ckpt', *args, '--prefix', tmp_path / 'x')
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith('error: ') and message in result.stderr
    assert not list(tmp_path.glob('x*'))


def test_earlier_samples_beyond_n_are_not_left_beside_new_ones(checkpoints, tmp_path):
    """Sampling -n 2 into a prefix that holds 3 earlier samples is refused (the third would pass for a new one);
    the same -n again overwrites its own files."""
    tmp, _, _ = checkpoints
    for k in range(3):
        (tmp_path / f's_{k:05}.png').write_bytes(b'earlier')
    result = run_sample('--checkpoint', tmp / 'ckpt', '--steps', '2', '-n', '2', '--prefix', tmp_path / 's')
    assert result.returncode == 2 and 'already holds 1 samples numbered from 2 up (s_00002.png' in result.stderr
    assert all((tmp_path / f's_{k:05}.png').read_bytes() == b'earlier' for k in range(3))
    (tmp_path / 's_00002.png').unlink()
    result = run_sample('--checkpoint', tmp / 'ckpt', '--steps', '2', '-n', '2', '--prefix', tmp_path / 's')
    assert result.returncode == 0 and (tmp_path / 's_00001.png').read_bytes() != b'earlier', result.stderr[-3000:]


def test_weights_or_samples_that_are_not_finite_are_refused(checkpoints, tmp_path):
    """A checkpoint holding a NaN (damaged) is refused on load; weights so large that the samples overflow (a
    diverged run) give no images either: one error each, nothing written."""
    tmp, config, model = checkpoints
    from flax import nnx
    damaged, diverged = nnx.clone(model), nnx.clone(model)
    kernel = np.array(damaged.inner_model.proj_in.kernel[...])
    kernel.flat[0] = np.nan
    damaged.inner_model.proj_in.kernel[...] = kernel
    diverged.inner_model.proj_out.kernel[...] = diverged.inner_model.proj_out.kernel[...] * 1e38
    for name, broken, message in (('damaged', damaged, '1 weight arrays hold NaN or infinite values '
                                   '(inner_model.proj_in.kernel)'),
                                  ('diverged', diverged, '2 of 2 samples hold NaN or infinite values')):
        kdiff_jax.save_model(tmp_path / name, broken, config)
        result = run_sample('--checkpoint', tmp_path / name, '--steps', '2', '-n', '2', '--prefix', tmp_path / 'o')
        assert result.returncode == 2 and message in result.stderr, result.stderr[-3000:]
        assert not list(tmp_path.glob('o*'))
