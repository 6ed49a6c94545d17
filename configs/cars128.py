"""SRN cars at 128x128: the grown second stage of the cars fork (config_64_cars_simpler_grow.json, also its
configs/sample.json) -- cars64 with the outermost U-Net stage switched on. Same parameters, 49,525,507 of them.
"""

import importlib.util
from pathlib import Path

import ml_collections


def _cars64_config() -> ml_collections.ConfigDict:
    # Loaded by path so that this file works both as `configs.cars128` and when a config loader imports it by path.
    spec = importlib.util.spec_from_file_location('_kdiff_jax_configs_cars64', Path(__file__).with_name('cars64.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config() -> ml_collections.ConfigDict:
    config = _cars64_config()
    config.model.input_size = [128, 128]
    config.model.skip_stages = 0
    return config
