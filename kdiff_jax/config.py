"""Training/sampling configs: k-diffusion's five JSON sections as an `ml_collections.ConfigDict`.

`load_config` reads a Python config (a `.py` file whose `get_config()` returns the user's values), a k-diffusion
`.json` config, or a dict; it fills in k-diffusion 0.0.15's defaults (`DEFAULTS`) and validates the result strictly:
unknown keys (with a "did you mean"), wrong types, missing required keys and inconsistent model settings each raise
one `ConfigError` that names the dotted key and the file. `to_kdiffusion_dict` gives the k-diffusion JSON layout back
(for `k_diffusion.config.make_model`), `config_to_dict` a plain JSON-serialisable dict of everything.
"""

from __future__ import annotations

import copy
import difflib
import importlib.util
import json
import numbers
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import ml_collections


class ConfigError(ValueError):
    """A config that cannot be read or does not validate."""


# Every accepted key with its default; None marks a key without a default (required ones are listed in REQUIRED).
DEFAULTS: dict[str, dict[str, Any]] = {
    'model': {
        'type': None,  # 'image_v1'
        'input_channels': None,
        'input_size': None,
        'patch_size': 1,
        'skip_stages': 0,
        'mapping_out': None,
        'depths': None,
        'channels': None,
        'self_attn_depths': None,
        'cross_attn_depths': None,
        'cross_cond_dim': 0,
        'mapping_cond_dim': 0,
        'unet_cond_dim': 0,
        'has_variance': False,
        'dropout_rate': 0.0,
        'augment_wrapper': True,
        'augment_prob': 0.0,
        'sigma_data': 1.0,
        'sigma_min': 1e-2,
        'sigma_max': 80.0,
        'sigma_sample_density': {'type': 'lognormal', 'mean': -1.2, 'std': 1.2},
        'loss_config': 'karras',
        'dtype': 'float32',  # kdiff_jax only: the compute dtype
    },
    'dataset': {
        'type': 'imagefolder',
        'location': None,
        'image_key': None,
    },
    'optimizer': {
        'type': 'adamw',
        'lr': 1e-4,
        'betas': [0.95, 0.999],
        'eps': 1e-6,
        'weight_decay': 1e-3,
        'momentum': None,  # sgd only
        'nesterov': None,  # sgd only
    },
    'lr_sched': {
        'type': 'constant',
        'inv_gamma': 1.0,
        'power': 1.0,
        'warmup': 0.0,
        'min_lr': 0.0,
        'num_steps': None,  # required by 'exponential'
        'decay': 0.5,
    },
    'ema_sched': {
        'type': 'inverse',
        'power': 0.6667,
        'max_value': 0.9999,
    },
}

REQUIRED: dict[str, tuple[str, ...]] = {
    'model': ('type', 'input_channels', 'input_size', 'mapping_out', 'depths', 'channels', 'self_attn_depths'),
}

# Keys whose value is replaced as a whole rather than merged key by key.
_REPLACED_WHOLE = {('model', 'sigma_sample_density')}

# Keys that exist only in kdiff_jax (left out of the k-diffusion JSON layout).
_KDIFF_JAX_ONLY = {('model', 'dtype')}

# Keys that k-diffusion reads with [] even when None (so they stay in the JSON layout as null).
_KEEP_NONE = {('model', 'cross_attn_depths')}

DATASET_TYPES = ('imagefolder', 'cifar10', 'mnist', 'huggingface', 'cars', 'srn_cars', 'digits')

# sigma_sample_density: the keys each type accepts, and the alias groups of which one must be given.
DENSITY_KEYS: dict[str, tuple[str, ...]] = {
    'lognormal': ('mean', 'loc', 'std', 'scale'),
    'loglogistic': ('loc', 'scale', 'min_value', 'max_value'),
    'loguniform': ('min_value', 'max_value'),
    'v-diffusion': ('min_value', 'max_value'),
    'cosine': ('min_value', 'max_value'),
    'split-lognormal': ('mean', 'loc', 'std_1', 'scale_1', 'std_2', 'scale_2'),
}
_DENSITY_ALIASES: dict[str, tuple[tuple[str, str], ...]] = {
    'lognormal': (('mean', 'loc'), ('std', 'scale')),
    'split-lognormal': (('mean', 'loc'), ('std_1', 'scale_1'), ('std_2', 'scale_2')),
}


# ----------------------------------------------------------------------------------------------------------------
# Value checkers: each returns the (possibly converted) value or raises _Mismatch naming what it expected.

class _Mismatch(Exception):
    def __init__(self, expected: str):
        super().__init__(expected)
        self.expected = expected


Checker = Callable[[Any], Any]


def _as_int(value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _Mismatch('int')
    return int(value)


def _as_float(value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _Mismatch('float')
    return float(value)


def _as_bool(value):
    if not isinstance(value, bool):
        raise _Mismatch('bool')
    return value


def _as_str(value):
    if not isinstance(value, str):
        raise _Mismatch('str')
    return value


def _list_of(item: Checker, name: str, length: int | None = None) -> Checker:
    expected = f'list of {length} {name}s' if length else f'list of {name}'

    def check(value):
        if not isinstance(value, (list, tuple)) or (length is not None and len(value) != length):
            raise _Mismatch(expected)
        try:
            return [item(v) for v in value]
        except _Mismatch:
            raise _Mismatch(expected) from None
    return check


def _optional(checker: Checker) -> Checker:
    def check(value):
        if value is None:
            return None
        try:
            return checker(value)
        except _Mismatch as e:
            raise _Mismatch(f'{e.expected} or None') from None
    return check


def _one_of(*options: str) -> Checker:
    def check(value):
        if value not in options:
            raise _Mismatch('one of ' + ', '.join(repr(o) for o in options))
        return value
    return check


_TYPES: dict[str, dict[str, Checker]] = {
    'model': {
        'type': _one_of('image_v1'),
        'input_channels': _as_int,
        'input_size': _list_of(_as_int, 'int', 2),
        'patch_size': _as_int,
        'skip_stages': _as_int,
        'mapping_out': _as_int,
        'depths': _list_of(_as_int, 'int'),
        'channels': _list_of(_as_int, 'int'),
        'self_attn_depths': _list_of(_as_bool, 'bool'),
        'cross_attn_depths': _optional(_list_of(_as_bool, 'bool')),
        'cross_cond_dim': _as_int,
        'mapping_cond_dim': _as_int,
        'unet_cond_dim': _as_int,
        'has_variance': _as_bool,
        'dropout_rate': _as_float,
        'augment_wrapper': _as_bool,
        'augment_prob': _as_float,
        'sigma_data': _as_float,
        'sigma_min': _as_float,
        'sigma_max': _as_float,
        'sigma_sample_density': lambda v: v,  # checked by _check_density
        'loss_config': _one_of('karras', 'simple'),
        'dtype': _one_of('float32', 'bfloat16'),
    },
    'dataset': {
        'type': _one_of(*DATASET_TYPES),
        'location': _optional(_as_str),
        'image_key': _optional(_as_str),
    },
    'optimizer': {
        'type': _one_of('adamw', 'sgd'),
        'lr': _as_float,
        'betas': _list_of(_as_float, 'float', 2),
        'eps': _as_float,
        'weight_decay': _as_float,
        'momentum': _optional(_as_float),
        'nesterov': _optional(_as_bool),
    },
    'lr_sched': {
        'type': _one_of('constant', 'inverse', 'exponential'),
        'inv_gamma': _as_float,
        'power': _as_float,
        'warmup': _as_float,
        'min_lr': _as_float,
        'num_steps': _optional(_as_float),  # k-diffusion's ExponentialLR takes a float
        'decay': _as_float,
    },
    'ema_sched': {
        'type': _one_of('inverse'),
        'power': _as_float,
        'max_value': _as_float,
    },
}


# ----------------------------------------------------------------------------------------------------------------
# Reading sources.

def _to_plain(value):
    """Deep copy of `value` with Mappings (ConfigDicts included) as dicts and tuples as lists."""
    if isinstance(value, ml_collections.ConfigDict):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return copy.deepcopy(value)


def _import_python_config(path: Path):
    spec = importlib.util.spec_from_file_location(f'_kdiff_jax_config_{path.stem}', path)
    if spec is None or spec.loader is None:
        raise ConfigError(f'{path}: cannot be imported as a Python config')
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise ConfigError(f'{path}: importing the config failed: {type(e).__name__}: {e}') from e
    if not callable(getattr(module, 'get_config', None)):
        raise ConfigError(f'{path}: a Python config must define get_config() (returning a dict or ConfigDict)')
    return module.get_config()


def _read_json_config(path: Path):
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f'{path}: not valid JSON: {e}') from e


def _read_source(source) -> tuple[Any, str | None]:
    """(the user's values, the file they came from or None)."""
    if isinstance(source, (Mapping, ml_collections.ConfigDict)):
        return source, None
    if not isinstance(source, (str, os.PathLike)):
        raise ConfigError(f'cannot load a config from {type(source).__name__}; '
                          'give a .py or .json path, a dict or a ConfigDict')
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f'config file {str(path)!r} does not exist')
    if path.suffix == '.py':
        return _import_python_config(path), str(path)
    if path.suffix == '.json':
        return _read_json_config(path), str(path)
    raise ConfigError(f'{path}: unknown config file type {path.suffix!r}; expected .py or .json')


# ----------------------------------------------------------------------------------------------------------------
# Validation.

def _where(origin: str | None) -> str:
    return f' (in {origin})' if origin else ''


def _unknown_key_message(dotted: str, accepted, scope: str) -> str:
    name = dotted.rsplit('.', 1)[-1]
    message = f'unknown config key {dotted!r}'
    close = difflib.get_close_matches(name, list(accepted), n=1)
    if close:
        message += f'; did you mean {close[0]!r}?'
    return message + f' Accepted keys in {scope}: {", ".join(sorted(accepted))}'


def _raise_all(problems: list[str], origin: str | None):
    if len(problems) == 1:
        raise ConfigError(problems[0] + _where(origin))
    if problems:
        raise ConfigError(f'{len(problems)} problems in the config{_where(origin)}:\n  - ' + '\n  - '.join(problems))


def _check_known_keys(user: Mapping, origin: str | None):
    problems = []
    for section, values in user.items():
        if section not in DEFAULTS:
            problems.append(_unknown_key_message(str(section), DEFAULTS, 'the top level'))
        elif not isinstance(values, Mapping):
            problems.append(f'config section {section!r} must be a dict, got {values!r}')
        else:
            problems += [_unknown_key_message(f'{section}.{key}', DEFAULTS[section], repr(section))
                         for key in values if key not in DEFAULTS[section]]
    _raise_all(problems, origin)


def _merge(user: Mapping) -> dict:
    merged = copy.deepcopy(DEFAULTS)
    for section, values in user.items():
        for key, value in values.items():
            current = merged[section][key]
            if isinstance(current, dict) and isinstance(value, Mapping) and (section, key) not in _REPLACED_WHOLE:
                current.update(value)
            else:
                merged[section][key] = value
    return merged


def _check_required(config: dict, origin: str | None):
    missing = [f'{section}.{key}' for section, keys in REQUIRED.items() for key in keys
               if config[section][key] is None]
    if missing:
        raise ConfigError(f'missing required config key(s): {", ".join(missing)}{_where(origin)}')


def _check_types(config: dict, origin: str | None):
    """Check every value against _TYPES, converting in place (ints to floats, tuples to lists)."""
    problems = []
    for section, checkers in _TYPES.items():
        for key, check in checkers.items():
            value = config[section][key]
            if value is None and key not in REQUIRED.get(section, ()):
                continue
            try:
                config[section][key] = check(value)
            except _Mismatch as e:
                problems.append(f'{section}.{key}: expected {e.expected}, got {value!r}')
    _raise_all(problems, origin)


def _check_density(density, origin: str | None):
    """Validate model.sigma_sample_density in place: its type, the keys of that type, and numeric values."""
    prefix = 'model.sigma_sample_density'
    if not isinstance(density, Mapping):
        raise ConfigError(f'{prefix}: expected a dict with a "type", got {density!r}{_where(origin)}')
    kind = density.get('type')
    if kind not in DENSITY_KEYS:
        raise ConfigError(f'{prefix}.type: expected one of {", ".join(repr(t) for t in DENSITY_KEYS)}, '
                          f'got {kind!r}{_where(origin)}')
    accepted = ('type',) + DENSITY_KEYS[kind]
    problems = [_unknown_key_message(f'{prefix}.{key}', accepted, f'{prefix} of type {kind!r}')
                for key in density if key not in accepted]
    for key in DENSITY_KEYS[kind]:
        if key in density:
            try:
                density[key] = _as_float(density[key])
            except _Mismatch:
                problems.append(f'{prefix}.{key}: expected float, got {density[key]!r}')
    for names in _DENSITY_ALIASES.get(kind, ()):
        given = [n for n in names if n in density]
        if not given:
            problems.append(f'{prefix}: type {kind!r} needs {" or ".join(names)}')
        elif len(given) > 1:
            problems.append(f'{prefix}: give only one of {" / ".join(names)} (they are aliases)')
    _raise_all(problems, origin)


def _downsampling_stages(model: Mapping) -> int:
    return max(0, len(model['depths']) - 1 - model['skip_stages'])


def _model_problems(m: Mapping) -> list[str]:
    problems = []
    lists = ['depths', 'channels', 'self_attn_depths'] + (['cross_attn_depths'] if m['cross_attn_depths'] else [])
    lengths = {name: len(m[name]) for name in lists}
    if len(set(lengths.values())) > 1:
        problems.append('model: ' + ', '.join(f'{k} has {v}' for k, v in lengths.items())
                        + ' entries; they must have the same length (one per U-Net stage)')
    if not m['depths']:
        problems.append('model.depths: needs at least one stage')
    if any(d < 1 for d in m['depths']) or any(c < 1 for c in m['channels']):
        problems.append('model.depths and model.channels: entries must be >= 1')
    for key in ('input_channels', 'mapping_out', 'patch_size'):
        if m[key] < 1:
            problems.append(f'model.{key}: must be >= 1, got {m[key]}')
    if not 0 <= m['skip_stages'] < max(1, len(m['depths'])):
        problems.append(f'model.skip_stages: must be in [0, len(depths) = {len(m["depths"])}), got {m["skip_stages"]}')
    elif m['patch_size'] >= 1:
        factor = m['patch_size'] * 2 ** _downsampling_stages(m)
        if any(s < 1 or s % factor for s in m['input_size']):
            problems.append(f'model.input_size: {m["input_size"]} must be divisible by patch_size * 2**(downsampling '
                            f'stages) = {factor} (len(depths) - 1 - skip_stages = {_downsampling_stages(m)})')
    for key in ('cross_cond_dim', 'mapping_cond_dim', 'unet_cond_dim'):
        if m[key] < 0:
            problems.append(f'model.{key}: must be >= 0, got {m[key]}')
    if m['cross_attn_depths'] is not None and m['cross_cond_dim'] <= 0:
        problems.append('model.cross_attn_depths: cross-attention needs model.cross_cond_dim > 0')
    if m['has_variance'] and m['loss_config'] == 'simple':
        problems.append('model.has_variance: loss_config "simple" does not support a variance output')
    if not 0 <= m['dropout_rate'] < 1:
        problems.append(f'model.dropout_rate: must be in [0, 1), got {m["dropout_rate"]}')
    if not 0 <= m['augment_prob'] <= 1:
        problems.append(f'model.augment_prob: must be in [0, 1], got {m["augment_prob"]}')
    if m['sigma_data'] <= 0:
        problems.append(f'model.sigma_data: must be > 0, got {m["sigma_data"]}')
    if not 0 < m['sigma_min'] < m['sigma_max']:
        problems.append(f'model.sigma_min/sigma_max: need 0 < sigma_min < sigma_max, '
                        f'got {m["sigma_min"]} and {m["sigma_max"]}')
    return problems


def _training_problems(config: Mapping) -> list[str]:
    problems = []
    opt, sched, ema = config['optimizer'], config['lr_sched'], config['ema_sched']
    if opt['lr'] < 0:
        problems.append(f'optimizer.lr: must be >= 0, got {opt["lr"]}')
    if not all(0 <= b < 1 for b in opt['betas']):
        problems.append(f'optimizer.betas: must be in [0, 1), got {opt["betas"]}')
    if sched['type'] == 'exponential' and (sched['num_steps'] is None or sched['num_steps'] <= 0):
        problems.append('lr_sched.num_steps: lr_sched type "exponential" needs num_steps > 0')
    if not 0 <= sched['warmup'] < 1:
        problems.append(f'lr_sched.warmup: must be in [0, 1), got {sched["warmup"]}')
    if not 0 <= ema['max_value'] <= 1:
        problems.append(f'ema_sched.max_value: must be in [0, 1], got {ema["max_value"]}')
    return problems


# ----------------------------------------------------------------------------------------------------------------
# Public API.

def validate(config: dict, origin: str | None = None) -> dict:
    """Check a merged plain-dict config (every section and key present), converting values in place."""
    _check_required(config, origin)
    _check_types(config, origin)
    _check_density(config['model']['sigma_sample_density'], origin)
    _raise_all(_model_problems(config['model']) + _training_problems(config), origin)
    return config


def load_config(source) -> ml_collections.ConfigDict:
    """The validated config of `source` (.py path with get_config(), k-diffusion .json path, dict or ConfigDict),
    with DEFAULTS filled in; a fresh ConfigDict that shares nothing with `source`."""
    raw, origin = _read_source(source)
    if not isinstance(raw, (Mapping, ml_collections.ConfigDict)):
        raise ConfigError(f'a config must be a dict or ConfigDict, got {type(raw).__name__}{_where(origin)}')
    user = _to_plain(raw)
    _check_known_keys(user, origin)
    return ml_collections.ConfigDict(validate(_merge(user), origin))


def as_config(config):
    """`config` as it is when already loaded (a ConfigDict, or a dict in its layout); a .py / .json file's path
    loaded with `load_config`. For functions that take either."""
    return load_config(os.fspath(config)) if isinstance(config, (str, os.PathLike)) else config


def config_to_dict(config) -> dict:
    """Plain, JSON-serialisable dict of the whole config (what checkpoints store); load_config gives it back."""
    return _to_plain(config)


def to_kdiffusion_dict(config) -> dict:
    """The config in k-diffusion's JSON layout (for `k_diffusion.config.make_model` etc.): kdiff_jax-only keys and
    unset optional keys left out."""
    plain = config_to_dict(config)
    return {section: {key: value for key, value in values.items()
                      if (section, key) not in _KDIFF_JAX_ONLY
                      and (value is not None or (section, key) in _KEEP_NONE)}
            for section, values in plain.items()}


def _parse_override_value(raw: str):
    """JSON first (numbers, true/false, lists), then Python literals (True, tuples), else the plain string."""
    import ast
    for parse in (json.loads, ast.literal_eval):
        try:
            return parse(raw)
        except (ValueError, SyntaxError):
            continue
    return raw


def apply_overrides(config, overrides: list[str]) -> ml_collections.ConfigDict:
    """`config` with command-line overrides `--config.section.key=value` applied and validated again.

    Misspelled keys and wrong types are reported like those of a config file.
    """
    values = config_to_dict(config)
    for arg in overrides:
        if not arg.startswith('--config.') or '=' not in arg:
            raise ConfigError(f'unrecognised argument {arg!r}; config overrides look like '
                              '--config.model.dropout_rate=0.1')
        dotted, raw = arg[len('--config.'):].split('=', 1)
        *parents, leaf = dotted.split('.')
        node = values
        for i, name in enumerate(parents):
            node = node.setdefault(name, {})
            if not isinstance(node, dict):
                raise ConfigError(f'--config.{dotted}: {".".join(parents[:i + 1])} is not a section')
        node[leaf] = _parse_override_value(raw)
    return load_config(values) if overrides else config
