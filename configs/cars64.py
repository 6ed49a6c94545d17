"""SRN cars at 64x64: the first stage of the cars fork (its config_64_cars_simpler.json).

U-Net of five stages with the outermost one skipped (skip_stages 1), self-attention in the two deepest.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        'model': {
            'type': 'image_v1',
            'input_channels': 3,
            'input_size': [64, 64],
            'skip_stages': 1,
            'patch_size': 1,
            'mapping_out': 256,
            'depths': [4, 4, 4, 4, 4],
            'channels': [128, 128, 256, 256, 256],
            'self_attn_depths': [False, False, False, True, True],
            'has_variance': False,
            'dropout_rate': 0.05,
            'augment_wrapper': True,
            'augment_prob': 0.12,
            'sigma_data': 0.5,
            'sigma_min': 1e-2,
            'sigma_max': 80.0,
            'sigma_sample_density': {'type': 'lognormal', 'mean': -1.2, 'std': 1.2},
        },
        'dataset': {
            'type': 'srn_cars',
            'location': 'data/cars_train',
        },
        'optimizer': {
            'type': 'adamw',
            'lr': 1e-4,
            'betas': [0.95, 0.999],
            'eps': 1e-6,
            'weight_decay': 1e-3,
        },
        'lr_sched': {
            'type': 'constant',
        },
        'ema_sched': {
            'type': 'inverse',
            'power': 0.6667,
            'max_value': 0.9999,
        },
    })
