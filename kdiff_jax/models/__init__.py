"""Flax NNX networks: k-diffusion's image_v1 U-Net and its building blocks."""

from .image_v1 import ImageDenoiserModelV1, KarrasAugmentWrapper

__all__ = ['ImageDenoiserModelV1', 'KarrasAugmentWrapper']
