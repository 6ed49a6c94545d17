"""The `make demo` config: a small U-Net on the bundled digits (sklearn's 1797 8x8 digits upscaled to 16x16).

Small enough to train in a few minutes on 2 CPU cores, large enough that samples look like digits.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        'model': {
            'type': 'image_v1',
            'input_channels': 1,
            'input_size': [16, 16],
            'mapping_out': 64,
            'depths': [2, 2, 2],
            'channels': [32, 64, 64],
            'self_attn_depths': [False, False, True],
            'dropout_rate': 0.0,
            'augment_wrapper': False,
            'augment_prob': 0.0,
            'sigma_data': 0.5,
            'sigma_min': 1e-2,
            'sigma_max': 80.0,
            'sigma_sample_density': {'type': 'lognormal', 'mean': -1.2, 'std': 1.2},
        },
        'dataset': {'type': 'digits'},
        'optimizer': {'type': 'adamw', 'lr': 1e-3, 'betas': [0.95, 0.999], 'eps': 1e-6, 'weight_decay': 1e-3},
        'lr_sched': {'type': 'constant'},
        'ema_sched': {'type': 'inverse', 'power': 0.75, 'max_value': 0.999},
    })
