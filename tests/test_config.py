"""kdiff_jax.config: loading .py / .json / dict configs, k-diffusion defaults, strict validation, round trips."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import ml_collections
import pytest

from kdiff_jax.config import ConfigError, config_to_dict, load_config, to_kdiffusion_dict
from tests.oracle import import_k_diffusion

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / 'configs'
DATA = Path(__file__).resolve().parent / 'data'
CARS64_JSON = DATA / 'config_64_cars_simpler.json'
CARS128_JSON = DATA / 'config_64_cars_simpler_grow.json'


def cars64_values() -> dict:
    """The user values of configs/cars64.py as a plain dict (to edit in tests)."""
    return config_to_dict(load_config(CONFIGS / 'cars64.py'))


def without_dataset(config) -> dict:
    d = config_to_dict(config)
    del d['dataset']
    return d


def error_of(values, match=None) -> str:
    with pytest.raises(ConfigError, match=match) as info:
        load_config(values)
    return str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# Loading and defaults

@pytest.mark.parametrize('json_path,py_path', [(CARS64_JSON, 'cars64.py'), (CARS128_JSON, 'cars128.py')])
def test_json_and_python_cars_configs_agree(json_path, py_path):
    from_json, from_py = load_config(json_path), load_config(CONFIGS / py_path)
    assert isinstance(from_py, ml_collections.ConfigDict)
    # The fork's JSON names its dataset "cars" and hard-codes the location in its data loader; the Python configs
    # use kdiff_jax's SRN cars loader with an explicit location. Everything else is the same.
    assert without_dataset(from_json) == without_dataset(from_py)
    assert from_json.dataset.type == 'cars' and from_json.dataset.location is None
    assert from_py.dataset.to_dict() == {'type': 'srn_cars', 'location': 'data/cars_train', 'image_key': None}


def test_cars128_is_cars64_grown():
    c64, c128 = load_config(CONFIGS / 'cars64.py'), load_config(CONFIGS / 'cars128.py')
    assert (c64.model.input_size, c64.model.skip_stages) == ([64, 64], 1)
    assert (c128.model.input_size, c128.model.skip_stages) == ([128, 128], 0)
    c64.model.input_size, c64.model.skip_stages = [128, 128], 0
    assert c64 == c128


def test_python_config_importable_as_package_module():
    from configs import cars128
    assert load_config(cars128.get_config()) == load_config(CONFIGS / 'cars128.py')


def test_defaults_fill_in():
    mnist = load_config(CONFIGS / 'mnist.py')
    m = mnist.model
    assert (m.patch_size, m.skip_stages, m.loss_config, m.cross_attn_depths) == (1, 0, 'karras', None)
    assert (m.mapping_cond_dim, m.unet_cond_dim, m.cross_cond_dim, m.dtype) == (0, 0, 0, 'float32')
    assert (m.input_channels, m.input_size, m.has_variance, m.sigma_data) == (1, [28, 28], True, 0.6162)
    assert mnist.optimizer.lr == 2e-4 and mnist.lr_sched.warmup == 0.0 and mnist.ema_sched.power == 0.6667
    cifar = load_config(CONFIGS / 'cifar10.py')
    assert cifar.model.channels == [128, 256, 512] and cifar.model.self_attn_depths == [False, True, True]


def test_minimal_dict_gets_every_default():
    values = {'model': {k: cars64_values()['model'][k] for k in
                        ('type', 'input_channels', 'input_size', 'mapping_out', 'depths', 'channels',
                         'self_attn_depths')}}
    config = load_config(values)
    assert config.model.sigma_sample_density.to_dict() == {'type': 'lognormal', 'mean': -1.2, 'std': 1.2}
    assert (config.model.sigma_min, config.model.sigma_max, config.model.sigma_data) == (1e-2, 80.0, 1.0)
    assert (config.model.augment_wrapper, config.model.augment_prob, config.model.dropout_rate) == (True, 0.0, 0.0)
    assert config.dataset.type == 'imagefolder'
    assert config.optimizer.to_dict() == {'type': 'adamw', 'lr': 1e-4, 'betas': [0.95, 0.999], 'eps': 1e-6,
                                          'weight_decay': 1e-3, 'momentum': None, 'nesterov': None}
    assert config.lr_sched.to_dict() == {'type': 'constant', 'inv_gamma': 1.0, 'power': 1.0, 'warmup': 0.0,
                                         'min_lr': 0.0, 'num_steps': None, 'decay': 0.5}
    assert config.ema_sched.to_dict() == {'type': 'inverse', 'power': 0.6667, 'max_value': 0.9999}


def test_ints_become_floats_and_result_is_a_fresh_copy():
    values = cars64_values()
    values['model']['sigma_max'] = 80
    values['model']['sigma_sample_density'] = {'type': 'loguniform', 'min_value': 1, 'max_value': 50}
    config = load_config(values)
    assert type(config.model.sigma_max) is float and type(config.model.sigma_sample_density.min_value) is float
    config.model.depths.append(9)
    assert values['model']['depths'] == [4, 4, 4, 4, 4]
    assert load_config(values).model.depths == [4, 4, 4, 4, 4]


def test_tuples_in_python_configs_become_lists():
    values = cars64_values()
    values['model']['depths'] = (4, 4, 4, 4, 4)
    assert load_config(values).model.depths == [4, 4, 4, 4, 4]


def test_density_replaces_the_default_as_a_whole():
    values = cars64_values()
    values['model']['sigma_sample_density'] = {'type': 'v-diffusion'}
    assert load_config(values).model.sigma_sample_density.to_dict() == {'type': 'v-diffusion'}


@pytest.mark.parametrize('density', [
    {'type': 'lognormal', 'loc': -1.2, 'scale': 1.2},
    {'type': 'loglogistic', 'loc': -0.5, 'scale': 0.5, 'min_value': 0.01, 'max_value': 80},
    {'type': 'loguniform', 'min_value': 0.01, 'max_value': 80},
    {'type': 'cosine', 'min_value': 1e-3},
    {'type': 'split-lognormal', 'mean': -1.2, 'std_1': 1.0, 'scale_2': 1.5},
])
def test_density_types_accepted(density):
    values = cars64_values()
    values['model']['sigma_sample_density'] = density
    assert load_config(values).model.sigma_sample_density.type == density['type']


# ---------------------------------------------------------------------------------------------------------------
# Validation errors

def test_unknown_model_key_in_python_file_names_key_file_and_suggestion(tmp_path):
    values = cars64_values()
    values['model']['skip_stage'] = values['model'].pop('skip_stages')
    path = tmp_path / 'typo.py'
    path.write_text(f'def get_config():\n    return {values!r}\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "'model.skip_stage'" in message and "did you mean 'skip_stages'" in message
    assert str(path) in message and 'mapping_out' in message  # the accepted keys are listed


def test_unknown_top_level_key_suggests_section(tmp_path):
    values = cars64_values()
    values['optimiser'] = values.pop('optimizer')
    path = tmp_path / 'bad.json'
    path.write_text(json.dumps(values))
    message = error_of(path)
    assert "'optimiser'" in message and "did you mean 'optimizer'" in message and str(path) in message


def test_unknown_density_key_names_dotted_key():
    values = cars64_values()
    values['model']['sigma_sample_density'] = {'type': 'lognormal', 'mean': -1.2, 'stdev': 1.2}
    message = error_of(values)
    assert "'model.sigma_sample_density.stdev'" in message and "did you mean 'std'" in message


def test_unknown_density_type_and_missing_density_keys():
    values = cars64_values()
    values['model']['sigma_sample_density'] = {'type': 'log-normal', 'mean': 0.0, 'std': 1.0}
    assert 'model.sigma_sample_density.type' in error_of(values)
    values['model']['sigma_sample_density'] = {'type': 'lognormal', 'mean': 0.0}
    assert 'std or scale' in error_of(values)
    values['model']['sigma_sample_density'] = {'type': 'loguniform', 'mean': 0.0}
    assert "'model.sigma_sample_density.mean'" in error_of(values)


def test_several_unknown_keys_are_reported_in_one_error():
    values = cars64_values()
    values['model']['skip_stage'] = 1
    values['dataset']['locaton'] = 'x'
    message = error_of(values)
    assert 'model.skip_stage' in message and 'dataset.locaton' in message


@pytest.mark.parametrize('key,value,expected', [
    ('depths', '44444', 'list of int'),
    ('depths', [4, 4, 4.5, 4, 4], 'list of int'),
    ('skip_stages', 1.5, 'int'),
    ('skip_stages', True, 'int'),
    ('has_variance', 'yes', 'bool'),
    ('input_size', [64, 64, 64], 'list of 2 ints'),
    ('sigma_data', '0.5', 'float'),
    ('sigma_data', False, 'float'),
    ('loss_config', 'edm', "one of 'karras', 'simple'"),
    ('dtype', 'float16', "one of 'float32', 'bfloat16'"),
])
def test_wrong_types_are_rejected(key, value, expected):
    values = cars64_values()
    values['model'][key] = value
    message = error_of(values)
    assert f'model.{key}' in message and expected in message and repr(value) in message


def test_wrong_type_in_other_sections():
    values = cars64_values()
    values['optimizer']['betas'] = 0.9
    assert 'optimizer.betas' in error_of(values)
    values = cars64_values()
    values['dataset']['type'] = 'celeba'
    assert 'dataset.type' in error_of(values)
    values = cars64_values()
    values['model'] = 'image_v1'
    assert "section 'model' must be a dict" in error_of(values)


def test_missing_required_keys_are_named():
    values = cars64_values()
    del values['model']['depths'], values['model']['mapping_out']
    message = error_of(values, match='missing required')
    assert 'model.depths' in message and 'model.mapping_out' in message


@pytest.mark.parametrize('changes,match', [
    ({'channels': [128, 128, 256, 256]}, 'same length'),
    ({'self_attn_depths': [False, True]}, 'same length'),
    ({'cross_attn_depths': [False] * 5}, 'cross_cond_dim'),
    ({'cross_attn_depths': [False] * 4, 'cross_cond_dim': 8}, 'same length'),
    ({'skip_stages': 5}, 'skip_stages'),
    ({'skip_stages': -1}, 'skip_stages'),
    ({'patch_size': 0}, 'patch_size'),
    ({'input_size': [60, 60]}, 'divisible'),  # 3 downsamplings: needs a multiple of 8
    ({'input_size': [64, 64], 'patch_size': 3}, 'divisible'),
    ({'has_variance': True, 'loss_config': 'simple'}, 'variance'),
    ({'sigma_min': 100.0}, 'sigma_min'),
])
def test_inconsistent_model_settings(changes, match):
    values = cars64_values()
    values['model'].update(changes)
    error_of(values, match=match)


def test_consistent_variants_are_accepted():
    values = cars64_values()
    values['model'].update(input_size=[40, 72], cross_attn_depths=[False, False, True, True, True], cross_cond_dim=8)
    assert load_config(values).model.cross_attn_depths[-1] is True
    values = cars64_values()
    values['lr_sched'] = {'type': 'exponential', 'num_steps': 1000, 'warmup': 0.99}
    assert load_config(values).lr_sched.decay == 0.5
    del values['lr_sched']['num_steps']
    error_of(values, match='num_steps')


def test_bad_sources(tmp_path):
    missing = tmp_path / 'nope.py'
    assert str(missing) in error_of(missing)
    no_getter = tmp_path / 'empty.py'
    no_getter.write_text('X = 1\n')
    assert str(no_getter) in error_of(no_getter, match='get_config')
    yaml = tmp_path / 'c.yaml'
    yaml.write_text('model: {}\n')
    assert str(yaml) in error_of(yaml)


# ---------------------------------------------------------------------------------------------------------------
# Round trips and k-diffusion interop

@pytest.mark.parametrize('name', ['cars64.py', 'cars128.py', 'mnist.py', 'cifar10.py'])
def test_config_to_dict_round_trip(name):
    config = load_config(CONFIGS / name)
    stored = config_to_dict(config)
    assert json.loads(json.dumps(stored)) == stored
    assert load_config(json.loads(json.dumps(stored))) == config


def test_to_kdiffusion_dict_leaves_out_kdiff_jax_keys():
    kd = to_kdiffusion_dict(load_config(CONFIGS / 'cars128.py'))
    assert json.loads(json.dumps(kd)) == kd
    assert 'dtype' not in kd['model'] and kd['model']['cross_attn_depths'] is None
    assert 'image_key' not in kd['dataset'] and 'momentum' not in kd['optimizer']


def _contains(ours, theirs, path=''):
    """Every key of `theirs` is in `ours` with an equal value (recursively)."""
    if isinstance(theirs, dict):
        assert isinstance(ours, dict), path
        for key, value in theirs.items():
            assert key in ours, f'{path}.{key} missing'
            _contains(ours[key], value, f'{path}.{key}')
    else:
        assert ours == theirs, path


@pytest.mark.parametrize('json_path', [CARS64_JSON, CARS128_JSON])
def test_k_diffusion_load_config_agrees(json_path):
    K = import_k_diffusion()
    with open(json_path) as f:
        theirs = K.config.load_config(f)
    _contains(to_kdiffusion_dict(load_config(json_path)), theirs)


def test_k_diffusion_builds_cars128_with_the_known_parameter_count():
    K = import_k_diffusion()
    kd = to_kdiffusion_dict(load_config(CONFIGS / 'cars128.py'))
    model = K.config.make_model(copy.deepcopy(kd))
    assert K.utils.n_params(model) == 49_525_507
    assert K.config.make_denoiser_wrapper(kd).func is K.layers.Denoiser
