"""Decoded image → model-sized uint8 array: colour mode, Lanczos resize of the shorter side, centre crop.

This is k-diffusion's `transforms.Resize(size, LANCZOS)` + `transforms.CenterCrop(size)` on PIL images (torchvision's
rules: the shorter side becomes `size`, the longer one int(size · long / short); the crop starts at
round((dim − size) / 2)), generalised to a rectangular (height, width): the image is scaled by the smallest factor
that covers both, then centre-cropped.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

MODES = {1: 'L', 3: 'RGB'}


def pil_mode(channels: int) -> str:
    """PIL mode of a channel count (1 → 'L', 3 → 'RGB')."""
    if channels not in MODES:
        raise ValueError(f'model.input_channels: image datasets give 1 (grayscale) or 3 (RGB) channels, got {channels}')
    return MODES[channels]


def resized_size(width: int, height: int, size: Sequence[int]) -> tuple[int, int]:
    """(width, height) after scaling so the image covers size = (H, W) (torchvision's rounding for square sizes)."""
    target_h, target_w = int(size[0]), int(size[1])
    if target_h * width >= target_w * height:  # the height is the binding side
        return max(target_w, int(target_h * width / height)), target_h
    return target_w, max(target_h, int(target_w * height / width))


def resize_center_crop(image: Image.Image, size: Sequence[int]) -> Image.Image:
    """Lanczos-resize `image` to cover size = (H, W), then crop the centre H × W."""
    target_h, target_w = int(size[0]), int(size[1])
    new_size = resized_size(image.width, image.height, size)
    if new_size != image.size:
        image = image.resize(new_size, Image.LANCZOS)
    left = int(round((image.width - target_w) / 2.0))
    top = int(round((image.height - target_h) / 2.0))
    if (left, top, image.width, image.height) != (0, 0, target_w, target_h):
        image = image.crop((left, top, left + target_w, top + target_h))
    return image


def to_model_array(image: Image.Image, size: Sequence[int], channels: int) -> np.ndarray:
    """uint8 [H, W, channels] array of a PIL image: converted to 'L'/'RGB' first (this decodes it fully, so a
    corrupt file raises here), then resized and cropped."""
    mode = pil_mode(channels)
    if image.mode != mode:
        image = image.convert(mode)
    else:
        image.load()
    array = np.asarray(resize_center_crop(image, size), np.uint8)
    return array[..., None] if array.ndim == 2 else array
