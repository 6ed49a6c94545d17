"""Images to files: [-1, 1] NHWC arrays to uint8, grids, PNG, animated GIF/MP4."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image


def to_uint8(x) -> np.ndarray:
    """[-1, 1] floats to uint8 (k-diffusion's to_pil_image: clamp, (x + 1)/2, ·255, rounded)."""
    x = np.asarray(x, np.float32)
    return np.round((np.clip(x, -1, 1) + 1) / 2 * 255).astype(np.uint8)


def make_grid(images, nrow: int | None = None) -> np.ndarray:
    """Tile [N, H, W, C] images into one [rows·H, nrow·W, C] image, row-major, no padding (empty cells black)."""
    images = np.asarray(images)
    n, h, w, c = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.zeros((rows * h, nrow * w, c), images.dtype)
    for i, image in enumerate(images):
        r, col = divmod(i, nrow)
        grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = image
    return grid


def to_pil(image_uint8: np.ndarray) -> Image.Image:
    return Image.fromarray(image_uint8[..., 0] if image_uint8.shape[-1] == 1 else image_uint8)


def save_grid(images, path: str | Path, nrow: int | None = None) -> Path:
    """Save [N, H, W, C] images in [-1, 1] as one PNG grid."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    to_pil(make_grid(to_uint8(images), nrow)).save(path)
    return path


def save_animation(frames, path: str | Path, fps: int = 10, nrow: int | None = None) -> Path:
    """Save [T, N, H, W, C] frames in [-1, 1] as an animated grid: .gif (Pillow) or .mp4 (imageio-ffmpeg)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grids = [make_grid(to_uint8(f), nrow) for f in frames]
    if path.suffix == '.gif':
        images = [to_pil(g) for g in grids]
        images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    else:
        import warnings

        import imageio
        rgb = [np.repeat(g, 3, axis=-1) if g.shape[-1] == 1 else g for g in grids]
        with warnings.catch_warnings():  # imageio-ffmpeg starts ffmpeg with subprocess; it does not touch JAX
            warnings.filterwarnings('ignore', message='os.fork', category=RuntimeWarning)
            imageio.mimwrite(path, rgb, fps=fps, macro_block_size=1)
    return path
