"""The FID feature extractor against PyTorch: resize_right's resize, torch-fidelity's Inception v3 (pytorch-fid's
network and keys) on the same random weights, and k-diffusion 0.0.15's InceptionV3FeatureExtractor end to end; plus
the loader's strictness and its refusals (pickles that run code, TorchScript archives, missing weights)."""

from __future__ import annotations

import pickle
import zipfile

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from resize_right import resize

from kdiff_jax.evaluation.inception import (INCEPTION_WEIGHTS_ENV, INCEPTION_WEIGHTS_FILE, INCEPTION_WEIGHTS_URL,
                                            FIDFeatureExtractor, InceptionWeightsMismatch, InceptionWeightsMissing,
                                            inception_from_state_dict, load_inception, resolve_inception_path)
from kdiff_jax.evaluation.resize import resize_to
from kdiff_jax.interop.torch_io import CheckpointError, read_checkpoint_file
from tests.inception_oracle import (kdiffusion_extractor, pool_features, to_nchw, torch_fidelity_inception,
                                    write_random_inception_weights)

TOLERANCE = 1e-4


def relative_errors(out, ref) -> tuple[float, float]:
    """||out − ref|| / ||ref|| and max |out − ref| / max |ref|."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return (float(np.linalg.norm(out - ref) / np.linalg.norm(ref)),
            float(np.abs(out - ref).max() / np.abs(ref).max()))


@pytest.fixture(scope='module')
def weights_path(tmp_path_factory):
    return write_random_inception_weights(tmp_path_factory.mktemp('inception') / INCEPTION_WEIGHTS_FILE, seed=0)


@pytest.fixture(scope='module')
def torch_net(weights_path):
    """torch-fidelity's network, loaded by torch-fidelity itself from the file kdiff_jax reads."""
    return torch_fidelity_inception(weights_path)


@pytest.fixture(scope='module')
def extractor(weights_path):
    return FIDFeatureExtractor.load(weights_path)


# ---------------------------------------------------------------------------------------------------------------------
# resize

@pytest.mark.parametrize('shape', [(2, 32, 32, 3), (2, 28, 28, 1), (1, 64, 64, 3), (1, 512, 512, 3), (1, 40, 17, 2)])
def test_resize_matches_resize_right(shape):
    x = np.random.default_rng(sum(shape)).uniform(-1, 1, shape).astype(np.float32)
    ref = resize(to_nchw(x), out_shape=(299, 299), pad_mode='reflect').permute(0, 2, 3, 1).numpy()
    out = np.asarray(resize_to(x, (299, 299)))
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# network and extractor parity

def test_network_matches_torch_fidelity(weights_path, torch_net, extractor):
    rng = np.random.default_rng(1)
    smooth = np.kron(rng.uniform(-1, 1, (1, 23, 23, 3)), np.ones((1, 13, 13, 1)))  # 299 = 23 · 13
    x = np.concatenate([smooth, rng.uniform(-1, 1, (1, 299, 299, 3))]).astype(np.float32)
    with torch.no_grad():
        ref = pool_features(torch_net, to_nchw(x)).numpy()
    model = nnx.merge(extractor.graphdef, extractor.state)
    out = np.asarray(nnx.jit(lambda m, v: m(v))(model, x))
    assert out.shape == (2, 2048) and out.dtype == np.float32
    assert 0.1 < np.abs(ref).mean() < 10  # the calibrated random network keeps unit scale
    rel, rel_max = relative_errors(out, ref)
    print(f'InceptionV3 vs torch-fidelity (random weights, 299² input): rel {rel:.2e}, max-abs rel {rel_max:.2e}')
    assert rel < TOLERANCE and rel_max < TOLERANCE


@pytest.mark.parametrize('shape', [(2, 32, 32, 3), (2, 28, 28, 1)])
def test_extractor_matches_k_diffusion(shape, torch_net, extractor):
    x = np.random.default_rng(shape[-1]).uniform(-1, 1, shape).astype(np.float32)
    with torch.no_grad():
        ref = kdiffusion_extractor(torch_net)(to_nchw(x)).numpy()
    out = np.asarray(extractor.features(jax.numpy.asarray(x)))
    assert out.shape == (shape[0], 2048)
    rel, rel_max = relative_errors(out, ref)
    print(f'FIDFeatureExtractor vs k-diffusion on {shape}: rel {rel:.2e}, max-abs rel {rel_max:.2e}')
    assert rel < TOLERANCE and rel_max < TOLERANCE


# ---------------------------------------------------------------------------------------------------------------------
# loading: strictness and refusals

def test_state_dict_mismatch_is_one_error_naming_every_key(weights_path):
    state_dict = dict(read_checkpoint_file(weights_path))
    del state_dict['Mixed_6b.branch7x7_2.conv.weight']
    state_dict['Mixed_6b.branch7x7_9.conv.weight'] = np.zeros((128, 128, 1, 7), np.float32)
    state_dict['Mixed_7c.branch_pool.bn.running_var'] = np.ones(191, np.float32)
    with pytest.raises(InceptionWeightsMismatch) as info:
        inception_from_state_dict(state_dict, source='broken.pth')
    message = str(info.value)
    for needle in ('broken.pth', 'Mixed_6b.branch7x7_2.conv.weight', 'Mixed_6b.branch7x7_9.conv.weight',
                   'Mixed_7c.branch_pool.bn.running_var', '(191,)', '(192,)'):
        assert needle in message, (needle, message)
    assert isinstance(info.value, CheckpointError)


def test_fc_and_num_batches_tracked_are_optional(weights_path, extractor):
    state_dict = read_checkpoint_file(weights_path)
    assert 'fc.weight' in state_dict and 'Conv2d_1a_3x3.bn.num_batches_tracked' in state_dict
    bare = {k: v for k, v in state_dict.items() if not (k.startswith('fc.') or k.endswith('num_batches_tracked'))}
    model = inception_from_state_dict(bare)
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(extractor.state)):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))


def test_legacy_torch_save_format_loads(tmp_path, weights_path):
    """pytorch-fid's file predates torch's zip format; torch.load(weights_only=True) reads the old format too."""
    state_dict = torch.load(weights_path, weights_only=True)
    legacy = tmp_path / 'legacy.pth'
    torch.save(state_dict, legacy, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(legacy)
    model = load_inception(legacy)
    np.testing.assert_array_equal(np.asarray(model.Mixed_7c.branch_pool.bn.var[...]),
                                  state_dict['Mixed_7c.branch_pool.bn.running_var'].numpy())
    np.testing.assert_array_equal(np.asarray(model.Conv2d_1a_3x3.conv.kernel[...]),
                                  state_dict['Conv2d_1a_3x3.conv.weight'].numpy().transpose(2, 3, 1, 0))


class _CreatesFileWhenUnpickled:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, 'w')


@pytest.mark.parametrize('writer', ['torch.save', 'pickle.dump'])
def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path, writer):
    marker = tmp_path / 'pwned'
    path = tmp_path / 'evil.pth'
    payload = {'Conv2d_1a_3x3.conv.weight': _CreatesFileWhenUnpickled(marker)}
    if writer == 'torch.save':
        torch.save(payload, path)
    else:
        with open(path, 'wb') as f:
            pickle.dump(payload, f, protocol=2)
    assert not marker.exists()
    with pytest.raises(CheckpointError) as info:
        load_inception(path)
    assert 'refused' in str(info.value) and 'Nothing from it was executed' in str(info.value)
    assert not marker.exists()


def test_torchscript_archive_is_refused_before_torch_load(tmp_path, monkeypatch):
    path = tmp_path / 'inception-2015-12-05.pt'
    with zipfile.ZipFile(path, 'w') as archive:
        archive.writestr('inception-2015-12-05/data.pkl', b'\x80\x02}q\x00.')
        archive.writestr('inception-2015-12-05/code/__torch__/inception.py', 'def forward(self, x): ...\n')
        archive.writestr('inception-2015-12-05/constants.pkl', b'\x80\x02).')
        archive.writestr('inception-2015-12-05/version', '3\n')

    def no_torch_load(*args, **kwargs):
        raise AssertionError('torch.load must not be called on a TorchScript archive')
    monkeypatch.setattr(torch, 'load', no_torch_load)
    with pytest.raises(CheckpointError) as info:
        load_inception(path)
    message = str(info.value)
    for needle in ('TorchScript', 'torch.jit.load', INCEPTION_WEIGHTS_FILE, INCEPTION_WEIGHTS_URL, str(path)):
        assert needle in message, (needle, message)


@pytest.fixture
def empty_home(tmp_path, monkeypatch):
    monkeypatch.setenv('HOME', str(tmp_path))
    monkeypatch.delenv('XDG_CACHE_HOME', raising=False)
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    return tmp_path


def _assert_tells_how_to_get_weights(message: str):
    for needle in (INCEPTION_WEIGHTS_FILE, INCEPTION_WEIGHTS_URL, '--inception-weights', INCEPTION_WEIGHTS_ENV):
        assert needle in message, (needle, message)


def test_missing_weights_error_says_where_to_get_them(empty_home, monkeypatch):
    with pytest.raises(InceptionWeightsMissing) as info:
        load_inception()
    _assert_tells_how_to_get_weights(str(info.value))
    assert str(empty_home / '.cache' / 'kdiff_jax' / INCEPTION_WEIGHTS_FILE) in str(info.value)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, CheckpointError)

    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, str(empty_home / 'nowhere.pth'))
    with pytest.raises(InceptionWeightsMissing) as info:
        FIDFeatureExtractor.load()
    _assert_tells_how_to_get_weights(str(info.value))
    assert 'nowhere.pth' in str(info.value)

    with pytest.raises(InceptionWeightsMissing) as info:
        load_inception(empty_home / 'given.pth')
    _assert_tells_how_to_get_weights(str(info.value))
    assert 'given.pth' in str(info.value)


def test_weights_are_found_in_env_var_then_cache(empty_home, monkeypatch, weights_path):
    cached = empty_home / '.cache' / 'kdiff_jax' / INCEPTION_WEIGHTS_FILE
    cached.parent.mkdir(parents=True)
    cached.symlink_to(weights_path)
    assert resolve_inception_path() == cached
    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, str(weights_path))
    assert resolve_inception_path() == weights_path
    assert resolve_inception_path(cached) == cached
