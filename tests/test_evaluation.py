"""Evaluation end to end: train.py --evaluate-every/--gns, evaluate.py on a checkpoint and on folders, the missing
weights error, and FID's ordering on real data. Inception weights are random (tests/inception_oracle.py), so nothing
waits on a download."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kdiff_jax.config import config_to_dict, load_config
from kdiff_jax.evaluation.evaluator import FeatureSet, dataset_images
from kdiff_jax.evaluation.inception import FIDFeatureExtractor
from kdiff_jax.evaluation.metrics import fid
from kdiff_jax.images import save_grid, to_pil, to_uint8
from kdiff_jax.interop import export_torch_state_dict
from kdiff_jax.training.checkpointing import load_ema_model
from kdiff_jax.training.sharding import data_mesh
from tests.inception_oracle import write_random_inception_weights
from tests.test_train_cli import ROOT, run_train, train_cmd

DEMO = ROOT / 'configs' / 'demo.py'


@pytest.fixture(scope='module')
def inception_weights(tmp_path_factory):
    return write_random_inception_weights(tmp_path_factory.mktemp('inception') / 'pt_inception-random.pth')


@pytest.fixture(scope='module')
def evaluated_run(tmp_path_factory, inception_weights):
    out = tmp_path_factory.mktemp('runs')
    result = run_train(out, 'eval', '--end-step', '4', '--evaluate-every', '2', '--evaluate-n', '8', '--gns',
                       '--inception-weights', str(inception_weights), devices=2)  # sampling/features/GNS sharded
    return out / 'eval', result


def test_training_logs_fid_kid_and_the_gradient_noise_scale(evaluated_run):
    run_dir, result = evaluated_run
    with open(run_dir / 'metrics.csv') as f:
        rows = list(csv.DictReader(f))
    evaluated = [r for r in rows if r.get('fid')]
    assert [int(r['step']) for r in evaluated] == [2, 4]
    for r in evaluated:
        assert math.isfinite(float(r['fid'])) and float(r['fid']) > 0 and math.isfinite(float(r['kid']))
    logged = [r for r in rows if r.get('loss')]
    assert logged and all(math.isfinite(float(r['gns'])) and float(r['gns']) > 0 for r in logged)
    assert 'FID' in result.stdout + result.stderr
    assert not list(run_dir.rglob('*.png'))  # evaluation writes no image files (and --demo-every is 0)


def test_missing_inception_weights_fail_fast_naming_the_file_and_flag(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != 'KDIFF_JAX_INCEPTION_WEIGHTS'} | {'HOME': str(tmp_path)}
    result = subprocess.run(train_cmd(tmp_path, 'noweights', '--end-step', '2', '--evaluate-every', '1'),
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert result.returncode == 2
    assert 'pt_inception-2015-12-05-6726825d.pth' in result.stderr and '--inception-weights' in result.stderr
    assert 'Traceback' not in result.stderr
    assert not (tmp_path / 'noweights' / 'checkpoints').exists()  # nothing started
    result = subprocess.run([sys.executable, str(ROOT / 'evaluate.py'), '--reals', str(DEMO), '--samples',
                             str(tmp_path)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert result.returncode == 2 and 'Traceback' not in result.stderr
    assert 'pt_inception-2015-12-05-6726825d.pth' in result.stderr and '--inception-weights' in result.stderr


def _evaluate(*args):
    return subprocess.run([sys.executable, str(ROOT / 'evaluate.py'), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=600)


def _write_folder(folder: Path, images: np.ndarray) -> Path:
    folder.mkdir(parents=True)
    for k, image in enumerate(to_uint8(images)):
        to_pil(image).save(folder / f'{k:03}.png')
    return folder


def test_evaluate_command_on_a_checkpoint_and_on_folders(evaluated_run, inception_weights, tmp_path):
    run_dir, _ = evaluated_run
    result = _evaluate('--reals', DEMO, '--samples', run_dir, '-n', 8, '--batch-size', 8, '--inception-weights',
                       inception_weights, '--out', tmp_path / 'fid.json')
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / 'fid.json').read_text())
    assert report['n_samples'] == 8 and report['n_reals'] == 8 and report['sampler'] == 'dpmpp_2m'
    assert math.isfinite(report['fid']) and report['fid'] > 0 and math.isfinite(report['kid'])
    assert not list(tmp_path.rglob('*.png'))

    # a PyTorch state dict of the run's EMA model: its model config is the --reals config (a JSON written here)
    model, config = load_ema_model(run_dir)
    export_torch_state_dict(model, tmp_path / 'ema.pth')
    (tmp_path / 'tiny.json').write_text(json.dumps(config_to_dict(config)))
    result = _evaluate('--reals', tmp_path / 'tiny.json', '--samples', tmp_path / 'ema.pth', '-n', 8, '--batch-size',
                       8, '--steps', 5, '--inception-weights', inception_weights)
    assert result.returncode == 0, result.stderr[-3000:]
    assert '(8 samples vs 8 reals)' in result.stdout

    digits = dataset_images(load_config(str(DEMO)), 8)
    noise = np.random.default_rng(0).uniform(-1, 1, digits.shape).astype(np.float32)
    reals, fakes = _write_folder(tmp_path / 'reals', digits), _write_folder(tmp_path / 'fakes', noise)
    result = _evaluate('--reals', reals, '--samples', fakes, '--config', DEMO, '-n', 8, '--batch-size', 8,
                       '--inception-weights', inception_weights)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith('FID ') and '(8 samples vs 8 reals)' in result.stdout

    result = _evaluate('--reals', reals, '--samples', fakes, '--inception-weights', inception_weights)
    assert result.returncode == 2 and 'pass --config' in result.stderr
    # sample.py --grid writes its grid beside the samples: not a sample, so such a folder is refused
    save_grid(noise[:4], fakes / 'sample_grid.png')
    result = _evaluate('--reals', reals, '--samples', fakes, '--config', DEMO, '--inception-weights', inception_weights)
    assert result.returncode == 2 and 'not all one size' in result.stderr and 'sample_grid.png' in result.stderr
    result = _evaluate('--reals', reals, '--samples', tmp_path / 'nowhere', '--inception-weights', inception_weights)
    assert result.returncode == 2 and 'neither a checkpoint nor a folder' in result.stderr


def test_fid_between_digit_halves_is_far_below_fid_against_noise(inception_weights):
    """Real data, random-weight features: two disjoint halves of the bundled digits are close; digits and uniform
    noise images are not."""
    config = load_config(str(DEMO))
    digits = dataset_images(config, 64)
    noise = np.random.default_rng(0).uniform(-1, 1, (32, *digits.shape[1:])).astype(np.float32)
    # evaluate.py's batch size in the test above: the Inception program it compiled comes from the cache
    features = FeatureSet(FIDFeatureExtractor.load(inception_weights), data_mesh(), 8)
    first, second = features.of_array(digits[:32]), features.of_array(digits[32:])
    noise_features = features.of_array(noise)
    halves, against_noise = fid(first, second), fid(first, noise_features)
    print(f'FID digits/digits {halves:.4g}, digits/noise {against_noise:.4g}')
    assert halves * 5 < against_noise, (halves, against_noise)
