"""Train on your own images: every image under `dataset.location` (recursively, any format PIL reads), 64x64 RGB.

  python train.py --config configs/imagefolder.py --config.dataset.location=/path/to/images --name mine
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        'model': {
            'type': 'image_v1',
            'input_channels': 3,
            'input_size': [64, 64],
            'mapping_out': 256,
            'depths': [2, 2, 4, 4],
            'channels': [128, 256, 256, 512],
            'self_attn_depths': [False, False, True, True],
            'dropout_rate': 0.05,
            'augment_prob': 0.12,
            'sigma_data': 0.5,
            'sigma_min': 1e-2,
            'sigma_max': 80.0,
            'sigma_sample_density': {'type': 'lognormal', 'mean': -1.2, 'std': 1.2},
        },
        'dataset': {'type': 'imagefolder', 'location': 'data/images'},
        'optimizer': {'type': 'adamw', 'lr': 1e-4, 'betas': [0.95, 0.999], 'eps': 1e-6, 'weight_decay': 1e-3},
        'lr_sched': {'type': 'constant'},
        'ema_sched': {'type': 'inverse', 'power': 0.6667, 'max_value': 0.9999},
    })
