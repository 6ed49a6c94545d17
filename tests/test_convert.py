"""The checkpoint converter: safe reading, strict mapping, round trips, export, and the full cars128 network."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import kdiff_jax
from kdiff_jax.config import config_to_dict, load_config, to_kdiffusion_dict
from kdiff_jax.factory import count_params, make_model
from kdiff_jax.interop import (CheckpointError, StateDictMismatch, export_torch_state_dict, load_state_dict,
                               model_from_torch_checkpoint, model_to_state_dict, read_checkpoint_file,
                               select_state_dict)
from tests.parity import K, SIGMAS, make_pair, nchw, nhwc, perturb_, rel_err, small_config, torch_state_dict_np

ROOT = Path(__file__).resolve().parents[1]
CARS64, CARS128 = ROOT / 'configs' / 'cars64.py', ROOT / 'configs' / 'cars128.py'


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / 'convert_torch_ckpt.py'), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT)


def train_checkpoint(inner: torch.nn.Module, ema: torch.nn.Module) -> dict:
    """A dict shaped like k-diffusion train.py's checkpoints."""
    return {'model': inner.state_dict(), 'model_ema': ema.state_dict(), 'opt': {'state': {}, 'param_groups': []},
            'sched': {'last_epoch': 3}, 'ema_sched': {'power': 0.6667, 'last_epoch': 3}, 'epoch': 0, 'step': 3,
            'gns_stats': None}


@pytest.fixture(scope='module')
def small():
    """A small config, its random-weight k-diffusion model + a different EMA model, and a train checkpoint."""
    config = small_config(has_variance=True)
    kd = to_kdiffusion_dict(config)
    inner = perturb_(K.config.make_model(kd), seed=0).eval()
    ema = perturb_(K.config.make_model(kd), seed=1).eval()
    return config, inner, ema


def _forward_both(config, torch_inner, model):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((len(SIGMAS), *config.model.input_size, config.model.input_channels)).astype(np.float32)
    with torch.no_grad():
        ref = nhwc(torch_inner(nchw(x), torch.from_numpy(SIGMAS)))
    return np.asarray(model(jnp.asarray(x), jnp.asarray(SIGMAS))), ref


def test_cli_converts_train_checkpoint_and_load_denoiser_matches(small, tmp_path):
    config, inner, ema = small
    cfg_file = tmp_path / 'small.json'
    import json
    cfg_file.write_text(json.dumps(config_to_dict(config)))
    torch.save(train_checkpoint(inner, ema), tmp_path / 'run.pth')
    for which, reference in (('model_ema', ema), ('model', inner)):
        out = tmp_path / f'ckpt_{which}'
        args = ['--checkpoint', tmp_path / 'run.pth', '--config', cfg_file, '--out', out]
        result = run_cli(*args, *(['--which', which] if which == 'model' else []))
        assert result.returncode == 0, result.stderr
        assert str(out) in result.stdout.splitlines()[-2]
        denoiser = kdiff_jax.load_denoiser(out)
        torch_denoiser = K.config.make_denoiser_wrapper(to_kdiffusion_dict(config))(reference)
        ours, ref = _forward_both(config, torch_denoiser, denoiser)
        assert rel_err(ours, ref) <= 1e-5
        assert kdiff_jax.checkpoint.load_checkpoint_config(out) == config


def test_round_trip_torch_to_jax_to_torch_is_exact(small, tmp_path):
    config, inner, _ = small
    model = make_model(config, initialize=False)
    load_state_dict(model, torch_state_dict_np(inner))
    back = model_to_state_dict(model)
    original = torch_state_dict_np(inner)
    assert set(back) == set(original)
    for key, value in original.items():
        assert back[key].shape == value.shape and back[key].dtype == np.float32
        np.testing.assert_array_equal(back[key], value, err_msg=key)


@pytest.mark.parametrize('suffix', ['.pth', '.safetensors'])
def test_export_loads_into_k_diffusion_strictly(small, tmp_path, suffix):
    config, inner, _ = small
    model = make_model(config, initialize=False)
    load_state_dict(model, torch_state_dict_np(inner))
    save_dir = kdiff_jax.save_model(tmp_path / 'jax_ckpt', model, config)
    path = tmp_path / f'exported{suffix}'
    result = run_cli('--checkpoint', save_dir, '--out', path)
    assert result.returncode == 0, result.stderr
    state_dict = {k: torch.from_numpy(v) for k, v in read_checkpoint_file(path).items()}
    fresh = K.config.make_model(to_kdiffusion_dict(config)).eval()
    fresh.load_state_dict(state_dict, strict=True)
    ours, ref = _forward_both(config, fresh, model)
    assert rel_err(ours, ref) <= 1e-5
    before = path.read_bytes()  # an existing file (perhaps the PyTorch original) is never overwritten
    result = run_cli('--checkpoint', save_dir, '--out', path)
    assert result.returncode == 2 and 'exists: not overwritten' in result.stderr and path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ['exported' + suffix, 'jax_ckpt']  # no partial files


def test_save_model_replaces_only_an_earlier_model_checkpoint(small, tmp_path, monkeypatch):
    """save_model writes beside the target and moves the result into place: an earlier kdiff_jax model checkpoint
    (or an empty folder) is replaced, anything else is refused untouched, and an interrupted save leaves the
    earlier checkpoint as it was."""
    import orbax.checkpoint as ocp
    config, inner, ema = small
    first, second = (make_model(config, initialize=False) for _ in range(2))
    load_state_dict(first, torch_state_dict_np(inner))
    load_state_dict(second, torch_state_dict_np(ema))
    x = jnp.ones((1, *config.model.input_size, config.model.input_channels))
    outputs = lambda model: np.asarray(model(x, jnp.ones((1,))))  # noqa: E731
    target = tmp_path / 'ckpt'
    kdiff_jax.save_model(target, first, config)
    kdiff_jax.save_model(target, second, config)
    np.testing.assert_array_equal(outputs(kdiff_jax.load_model(target)), outputs(second))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(ocp.Checkpointer, 'save', interrupted)
        with pytest.raises(KeyboardInterrupt):
            kdiff_jax.save_model(target, first, config)
    np.testing.assert_array_equal(outputs(kdiff_jax.load_model(target)), outputs(second))

    (tmp_path / 'empty').mkdir()
    kdiff_jax.save_model(tmp_path / 'empty', first, config)
    run = tmp_path / 'run'
    (run / 'checkpoints').mkdir(parents=True)
    (run / 'metrics.csv').write_text('step,loss\n')
    (tmp_path / 'file').write_text('keep me')
    for other in (run, tmp_path / 'file'):
        with pytest.raises(FileExistsError, match='not a kdiff_jax model checkpoint'):
            kdiff_jax.save_model(other, first, config)
    assert (run / 'metrics.csv').read_text() == 'step,loss\n' and (tmp_path / 'file').read_text() == 'keep me'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['ckpt', 'empty', 'file', 'run']  # nothing left beside


def test_safetensors_state_dict_converts(small, tmp_path):
    config, inner, _ = small
    from safetensors.torch import save_file
    save_file(inner.state_dict(), str(tmp_path / 'bare.safetensors'))
    model = model_from_torch_checkpoint(tmp_path / 'bare.safetensors', config)
    ours, ref = _forward_both(config, inner, model)
    assert rel_err(ours, ref) <= 1e-5
    # the config may also be given as a config file's path
    import json
    from kdiff_jax.config import config_to_dict
    (tmp_path / 'config.json').write_text(json.dumps(config_to_dict(config)))
    for config_path in (tmp_path / 'config.json', str(tmp_path / 'config.json')):
        ours_from_path, _ = _forward_both(config, inner, model_from_torch_checkpoint(tmp_path / 'bare.safetensors',
                                                                                     config_path))
        np.testing.assert_array_equal(ours_from_path, ours)


def test_missing_unexpected_and_misshapen_keys_are_all_reported(small):
    config, inner, _ = small
    sd = torch_state_dict_np(inner)
    del sd['inner_model.timestep_embed.weight']
    sd['inner_model.extra.weight'] = np.zeros((2, 2), np.float32)
    sd['inner_model.proj_in.weight'] = np.zeros((7, 3, 1, 1), np.float32)
    with pytest.raises(StateDictMismatch) as err:
        load_state_dict(make_model(config, initialize=False), sd)
    msg = str(err.value)
    assert 'inner_model.timestep_embed.weight (model expects (32, 1))' in msg
    assert 'inner_model.extra.weight (checkpoint has (2, 2))' in msg
    assert 'inner_model.proj_in.weight: checkpoint (7, 3, 1, 1), model expects (32, 3, 1, 1)' in msg


def test_altered_resampling_kernel_is_refused(small):
    """k-diffusion fixes the resampling filters; Downsample2d relies on its separable form, so a checkpoint with
    another filter is an error, not a silently different model."""
    config, inner, _ = small
    sd = torch_state_dict_np(inner)
    key = next(k for k in sd if k.endswith('.kernel') and sd[k].shape == (4, 4))
    sd[key] = np.eye(4, dtype=np.float32) / 4
    with pytest.raises(StateDictMismatch, match=f"differ from k-diffusion's fixed 4×4 filter.*{key}"):
        load_state_dict(make_model(config, initialize=False), sd)


def test_refuses_pickles_that_run_code(tmp_path):
    marker = tmp_path / 'pwned'

    class Evil:
        def __reduce__(self):
            return os.system, (f'touch {marker}',)

    torch.save({'model_ema': {'w': torch.zeros(1)}, 'payload': Evil()}, tmp_path / 'zip_format.pth')
    torch.save({'model_ema': Evil()}, tmp_path / 'legacy_format.pth', _use_new_zipfile_serialization=False)
    for name in ('zip_format.pth', 'legacy_format.pth'):
        with pytest.raises(CheckpointError, match='refused to load.*GLOBAL posix.system'):
            read_checkpoint_file(tmp_path / name)
        result = run_cli('--checkpoint', tmp_path / name, '--config', CARS64, '--out', tmp_path / 'out')
        assert result.returncode == 2 and 'refused to load' in result.stderr
    with open(tmp_path / 'plain_pickle.pth', 'wb') as f:  # not a torch file at all: rejected as unreadable
        pickle.dump({'model_ema': Evil()}, f)
    with pytest.raises(CheckpointError, match='not a readable PyTorch checkpoint'):
        read_checkpoint_file(tmp_path / 'plain_pickle.pth')
    assert not marker.exists()


def test_corrupt_missing_and_wrong_content_files_give_one_clear_error(tmp_path):
    (tmp_path / 'corrupt.pth').write_bytes(b'\x00garbage' * 100)
    (tmp_path / 'corrupt.safetensors').write_bytes(b'\x00garbage' * 100)
    with pytest.raises(CheckpointError, match='not a readable PyTorch checkpoint'):
        read_checkpoint_file(tmp_path / 'corrupt.pth')
    with pytest.raises(CheckpointError, match='not a readable safetensors file'):
        read_checkpoint_file(tmp_path / 'corrupt.safetensors')
    with pytest.raises(CheckpointError, match='no such file'):
        read_checkpoint_file(tmp_path / 'absent.pth')
    with pytest.raises(CheckpointError, match="no 'model_ema' entry"):
        select_state_dict({'model': {'w': np.zeros(1)}})
    with pytest.raises(CheckpointError, match='not a state_dict'):
        select_state_dict({'w': np.zeros(1), 'step': 3})


@pytest.fixture(scope='module')
def cars128(tmp_path_factory):
    """A random-init k-diffusion cars128 model (49,525,507 parameters) saved as a train.py-style checkpoint."""
    config = load_config(str(CARS128))
    inner = perturb_(K.config.make_model(to_kdiffusion_dict(config)), seed=5).eval()
    path = tmp_path_factory.mktemp('cars') / 'cars128.pth'
    torch.save(train_checkpoint(inner, inner), path)
    return config, inner, path


def test_full_cars128_converts_and_one_forward_matches(cars128, tmp_path):
    config, inner, path = cars128
    assert sum(p.numel() for p in inner.parameters()) == 49_525_507
    assert len(inner.state_dict()) == 440
    result = run_cli('--checkpoint', path, '--config', CARS128, '--out', tmp_path / 'cars128')
    assert result.returncode == 0, result.stderr
    assert '49,525,507 parameters' in result.stdout
    denoiser = kdiff_jax.load_denoiser(tmp_path / 'cars128')
    assert count_params(denoiser.inner_model) == 49_525_507
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 128, 128, 3)).astype(np.float32)
    sigma = np.array([0.05, 20.], np.float32)
    torch_denoiser = K.config.make_denoiser_wrapper(to_kdiffusion_dict(config))(inner)
    with torch.no_grad():
        ref = nhwc(torch_denoiser(nchw(x), torch.from_numpy(sigma)))
    assert rel_err(denoiser(jnp.asarray(x), jnp.asarray(sigma)), ref) <= 1e-5


def test_state_dict_keys_match_the_published_cars128_listing(cars128):
    config, _, _ = cars128
    listing = {}
    for line in (ROOT / 'tests' / 'data' / 'cars128_state_dict.txt').read_text().splitlines():
        if line.startswith('inner_model.'):
            key, shape = line.split(' ', 1)
            listing[key] = tuple(int(s) for s in shape.split(')')[0].strip('(').split(',') if s.strip())
    from kdiff_jax.factory import abstract_model
    from kdiff_jax.interop.torch_state import expected_torch_shapes
    assert expected_torch_shapes(abstract_model(config)) == listing


def test_wrong_cars_config_names_the_right_one(cars128, tmp_path):
    _, _, path = cars128
    result = run_cli('--checkpoint', path, '--config', CARS64, '--out', tmp_path / 'x')
    assert result.returncode == 2
    assert 'inner_model.u_net.d_blocks.1.0.kernel' in result.stderr
    assert 'matches' in result.stderr and 'cars128.py' in result.stderr and 'cars64.py' not in result.stderr.split(
        'matches')[1]


NO_TORCH_SCRIPT = '''
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
import json, numpy as np, jax.numpy as jnp
import kdiff_jax
from kdiff_jax.interop import CheckpointError, export_torch_state_dict, model_from_torch_checkpoint
tmp = sys.argv[1]
config = kdiff_jax.load_config(json.load(open(tmp + "/config.json")))
model = model_from_torch_checkpoint(tmp + "/weights.safetensors", config)
kdiff_jax.save_model(tmp + "/ckpt", model, config)
denoiser = kdiff_jax.load_denoiser(tmp + "/ckpt")
x = jnp.asarray(np.load(tmp + "/x.npy"))
np.save(tmp + "/out.npy", np.asarray(denoiser(x, jnp.full((x.shape[0],), 2.0))))
export_torch_state_dict(model, tmp + "/back.safetensors")
try:
    export_torch_state_dict(model, tmp + "/back.pth")
except CheckpointError as e:
    assert "kdiff_jax[torch]" in str(e), e
    print("pth needs torch: ok")
'''


def test_library_converts_and_samples_without_torch(small, tmp_path):
    """torch is an optional extra: safetensors conversion, orbax save/load and the denoiser work without it."""
    import json
    from safetensors.torch import save_file
    config, inner, _ = small
    save_file(inner.state_dict(), str(tmp_path / 'weights.safetensors'))
    (tmp_path / 'config.json').write_text(json.dumps(config_to_dict(config)))
    x = np.random.default_rng(0).standard_normal((2, *config.model.input_size, 3)).astype(np.float32)
    np.save(tmp_path / 'x.npy', x)
    result = subprocess.run([sys.executable, '-c', NO_TORCH_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert 'pth needs torch: ok' in result.stdout
    torch_denoiser = K.config.make_denoiser_wrapper(to_kdiffusion_dict(config))(inner)
    with torch.no_grad():
        ref = nhwc(torch_denoiser(nchw(x), torch.full((2,), 2.0)))
    assert rel_err(np.load(tmp_path / 'out.npy'), ref) <= 1e-5
    back = read_checkpoint_file(tmp_path / 'back.safetensors')
    for key, value in inner.state_dict().items():
        np.testing.assert_array_equal(back[key], value.numpy())
