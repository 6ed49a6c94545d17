"""MNIST 28x28 (k-diffusion 0.0.15's config_mnist.json): three stages, attention in the deepest, learned variance."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        'model': {
            'type': 'image_v1',
            'input_channels': 1,
            'input_size': [28, 28],
            'mapping_out': 256,
            'depths': [2, 4, 4],
            'channels': [128, 128, 256],
            'self_attn_depths': [False, False, True],
            'has_variance': True,
            'dropout_rate': 0.05,
            'augment_wrapper': True,
            'augment_prob': 0.12,
            'sigma_data': 0.6162,
            'sigma_min': 1e-2,
            'sigma_max': 80.0,
            'sigma_sample_density': {'type': 'lognormal', 'mean': -1.2, 'std': 1.2},
        },
        'dataset': {
            'type': 'mnist',
            'location': 'data',
        },
        'optimizer': {
            'type': 'adamw',
            'lr': 2e-4,
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
