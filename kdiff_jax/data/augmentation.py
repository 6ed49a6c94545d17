"""Karras et al. (2022) non-leaking augmentation, as k-diffusion 0.0.15's `KarrasAugmentationPipeline`, in numpy.

It runs on the host, inside the data workers. It is split in two so it can be checked against k-diffusion draw for
draw:

1. `draw_augmentation(rng)`: the 13 random numbers k-diffusion draws per image, in its call order (`DRAW_KINDS`):
   randint(2) for the x-flip, then per gated transform a uniform "do it" number followed by the transform's own draws.
   Every draw is made whether or not its transform is enabled, so the count is fixed.
2. `apply_augmentation(image, draws, ...)`: a pure function of the draws and a uint8 image. With p = a_prob and
   [c] = 1 if c else 0 (all arithmetic in float32, like torch):

       a0 = x-flip bit                                  (always random)
       a1 = y-flip bit · [u1 < p]
       a2 = n_scale · [u3 < p]                          isotropic scale a_scale**a2
       a3 = (2π·u6 − π) · [u5 < p]                      rotation by a3
       a4 = (2π·u8 − π) · [u7 < p], a5 = n · [u7 < p]   anisotropic scale a_aniso**(±a5) along the angle a4
       a6, a7 = n_x · [u10 < p], n_y · [u10 < p]        translation by a_trans · size · (a6, a7)

   The affine matrix (in pixel x = column, y = row coordinates) is the product, left to right, of
   T(c) · S(1−2a0, 1) · S(1, 1−2a1) · S(s, s) · R(−a3) · R(a4) · S(α, 1/α) · R(−a4) · T(t) · T(−c), with c the image
   centre, and the image is resampled through its inverse with `skimage.transform.warp` (order 3, mode 'reflect').
   The conditioning vector is aug_cond = [a0, a1, a2, cos a3 − 1, sin a3, a5 cos a4, a5 sin a4, a6, a7].

k-diffusion reads `h, w = image.size` from a PIL image, whose size is (width, height): so its translation is
tx = a_trans·height·a6 and ty = a_trans·width·a7. That is kept (it only matters for non-square images).

Outputs are HWC float32 in [-1, 1]: (augmented image, un-augmented image, aug_cond [9]).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

# torch functions k-diffusion calls, in order, once per image.
DRAW_KINDS = ('randint', 'rand', 'randint', 'rand', 'randn', 'rand', 'rand', 'rand', 'rand', 'randn', 'rand',
              'randn', 'randn')
N_DRAWS = len(DRAW_KINDS)
AUG_COND_DIM = 9
AUG_COND_NAMES = ('xflip', 'yflip', 'scale', 'cos_rot_minus_1', 'sin_rot', 'aniso_cos', 'aniso_sin', 'tx', 'ty')

_F = np.float32
_PI = _F(math.pi)


def draw_augmentation(rng: np.random.Generator) -> np.ndarray:
    """The 13 random numbers of one image (float32, in `DRAW_KINDS` order): randint(2) ∈ {0, 1}, rand ∈ [0, 1),
    randn ~ N(0, 1)."""
    draws = np.empty(N_DRAWS, np.float32)
    for i, kind in enumerate(DRAW_KINDS):
        if kind == 'randint':
            draws[i] = rng.integers(0, 2)
        elif kind == 'rand':
            draws[i] = rng.random(dtype=np.float32)
        else:
            draws[i] = rng.standard_normal(dtype=np.float32)
    return draws


def augmentation_values(draws, a_prob: float) -> np.ndarray:
    """a0 … a7 (float32 [8]) from the draws: the transform parameters, zero where a gated transform is off."""
    d = np.asarray(draws, np.float32)
    if d.shape != (N_DRAWS,):
        raise ValueError(f'expected {N_DRAWS} augmentation draws, got shape {d.shape}')
    p = _F(a_prob)
    on = [_F(d[i] < p) for i in (1, 3, 5, 7, 10)]
    a0 = d[0]
    a1 = d[2] * on[0]
    a2 = d[4] * on[1]
    a3 = (d[6] * _F(2) * _PI - _PI) * on[2]
    a4 = (d[8] * _F(2) * _PI - _PI) * on[3]
    a5 = d[9] * on[3]
    a6 = d[11] * on[4]
    a7 = d[12] * on[4]
    return np.array([a0, a1, a2, a3, a4, a5, a6, a7], np.float32)


def _translate(tx, ty) -> np.ndarray:
    return np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1]], np.float32)


def _scale(sx, sy) -> np.ndarray:
    return np.array([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], np.float32)


def _cos(x) -> np.float32:
    """float32 cosine, correctly rounded (evaluated in float64): closer to torch's than numpy's float32 SIMD one."""
    return _F(math.cos(float(x)))


def _sin(x) -> np.float32:
    return _F(math.sin(float(x)))


def _rotate(theta) -> np.ndarray:
    theta = _F(theta)
    return np.array([[_cos(theta), _sin(-theta), 0], [_sin(theta), _cos(theta), 0], [0, 0, 1]], np.float32)


def _matmul3(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """float32 3×3 product summed left to right, one rounding per operation (as torch's CPU matmul does for these
    sizes; numpy's BLAS call rounds differently)."""
    return (x[:, 0:1] * y[0:1, :] + x[:, 1:2] * y[1:2, :]) + x[:, 2:3] * y[2:3, :]


def augmentation_matrix(values, height: int, width: int, *, a_scale: float = 2 ** 0.2, a_aniso: float = 2 ** 0.2,
                        a_trans: float = 1 / 8) -> np.ndarray:
    """The 3×3 float32 affine matrix (output pixel → input pixel is its inverse) of the values a0 … a7."""
    a0, a1, a2, a3, a4, a5, a6, a7 = (_F(v) for v in np.asarray(values, np.float32))
    cx, cy = width / 2 - 0.5, height / 2 - 0.5
    scale = _F(a_scale) ** a2
    aniso = _F(a_aniso)
    mats = [
        _translate(cx, cy),
        _scale(_F(1) - _F(2) * a0, 1),
        _scale(1, _F(1) - _F(2) * a1),
        _scale(scale, scale),
        _rotate(-a3),
        _rotate(a4),
        _scale(aniso ** a5, aniso ** -a5),
        _rotate(-a4),
        _translate(_F(a_trans * height) * a6, _F(a_trans * width) * a7),  # k-diffusion's (w, h) naming, kept
        _translate(-cx, -cy),
    ]
    mat = mats[0]
    for m in mats[1:]:
        mat = _matmul3(mat, m)
    return mat


def aug_cond_from_values(values) -> np.ndarray:
    """[a0, a1, a2, cos a3 − 1, sin a3, a5 cos a4, a5 sin a4, a6, a7] (float32 [9])."""
    a0, a1, a2, a3, a4, a5, a6, a7 = (_F(v) for v in np.asarray(values, np.float32))
    return np.array([a0, a1, a2, _cos(a3) - _F(1), _sin(a3), a5 * _cos(a4), a5 * _sin(a4), a6, a7],
                    np.float32)


def _as_unit_hwc(image) -> np.ndarray:
    """uint8 HW or HWC → float32 HWC in [0, 1] (k-diffusion: np.array(image, float32) / 255)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise TypeError(f'the augmentation takes uint8 images (as decoded from files), got {image.dtype}')
    unit = image.astype(np.float32) / 255
    return unit[..., None] if unit.ndim == 2 else unit


def apply_augmentation(image, draws, *, a_prob: float = 0.12, a_scale: float = 2 ** 0.2, a_aniso: float = 2 ** 0.2,
                       a_trans: float = 1 / 8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(augmented image, un-augmented image, aug_cond) of a uint8 HW/HWC image for the given draws.

    Images come back HWC float32 in [-1, 1]; aug_cond is float32 [9].
    """
    unit = _as_unit_hwc(image)
    height, width = unit.shape[:2]
    values = augmentation_values(draws, a_prob)
    mat = augmentation_matrix(values, height, width, a_scale=a_scale, a_aniso=a_aniso, a_trans=a_trans)
    augmented = warp_image(unit, mat) * 2 - 1
    return augmented, unit * 2 - 1, aug_cond_from_values(values)


def warp_image(unit: np.ndarray, mat: np.ndarray) -> np.ndarray:
    """HWC float32 image resampled through the inverse of the 3×3 affine `mat` (x = column, y = row), as
    k-diffusion does: `skimage.transform.warp`, bicubic (order 3), mode 'reflect', no clipping."""
    mat = np.asarray(mat, np.float32)
    width = unit.shape[1]
    if np.array_equal(mat, _translate(0, 0)):
        return unit
    if np.array_equal(mat, np.array([[-1, 0, width - 1], [0, 1, 0], [0, 0, 1]], np.float32)):
        # A plain x-flip maps pixel centres onto pixel centres, where the cubic kernel returns the samples
        # themselves: skip the warp (about half of all images when a_prob is small).
        return np.ascontiguousarray(unit[:, ::-1])
    from skimage import transform
    warped = transform.warp(unit, transform.AffineTransform(mat).inverse, order=3, mode='reflect', cval=0.5,
                            clip=False, preserve_range=True)
    return np.asarray(warped, np.float32)


@dataclasses.dataclass(frozen=True)
class KarrasAugment:
    """The pipeline with its settings: `augment(image_uint8, rng)` → (image, image_orig, aug_cond)."""

    a_prob: float = 0.12
    a_scale: float = 2 ** 0.2
    a_aniso: float = 2 ** 0.2
    a_trans: float = 1 / 8

    def __call__(self, image, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return apply_augmentation(image, draw_augmentation(rng), a_prob=self.a_prob, a_scale=self.a_scale,
                                  a_aniso=self.a_aniso, a_trans=self.a_trans)


def no_augmentation(image) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, image, zeros(9)) for models without the augmentation wrapper."""
    orig = _as_unit_hwc(image) * 2 - 1
    return orig, orig, np.zeros(AUG_COND_DIM, np.float32)
