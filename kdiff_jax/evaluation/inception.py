"""The FID/KID feature extractor of k-diffusion 0.0.15: the 2015-12-05 TensorFlow Inception v3 graph, 2048-d pool
features, in Flax NNX (NHWC, kernels HWIO).

k-diffusion's `InceptionV3FeatureExtractor` maps NCHW images x in [−1, 1] to features by

    x ← resize_right.resize(x, out_shape=(299, 299), pad_mode='reflect')    if the size is not 299 × 299
    x ← x repeated to 3 channels                                            if it has 1 channel
    x ← clamp(127.5 x + 127.5, 0, 255)
    features = Inception((x − 128) / 128)      clean-fid's InceptionV3W(resize_inside=False) on the TF graph

`FIDFeatureExtractor` / `extract_features` do the same on NHWC arrays. The network is the TF graph as ported to
PyTorch by pytorch-fid and torch-fidelity, with its FID-specific details: no biases in the convolutions, batch norm
with ε = 1e-3 (here in inference form: running statistics, never updated), average pools in the A, C and first E
blocks that do not count the zero padding, a 3×3 *max* pool (stride 1, padding 1) in the last E block's pool branch,
and a global average pool to 2048 features. The classifier (`fc`) is not part of the features.

Weights come only from a state_dict with pytorch-fid's key names (`Conv2d_1a_3x3.conv.weight`,
`Mixed_5b.branch1x1.bn.running_mean`, ...), e.g. pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`; there is no
random initialisation (the module is laid out with placeholder shapes and every array is filled from the file).
"""

from __future__ import annotations

import functools
import os
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..compiler_options import cpu_compiler_options
from ..interop.torch_io import CheckpointError, read_checkpoint_file
from ..interop.torch_state import describe_mismatch
from .resize import resize_to

INCEPTION_WEIGHTS_FILE = 'pt_inception-2015-12-05-6726825d.pth'
INCEPTION_WEIGHTS_URL = ('https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/'
                         'pt_inception-2015-12-05-6726825d.pth')
INCEPTION_WEIGHTS_ENV = 'KDIFF_JAX_INCEPTION_WEIGHTS'
INCEPTION_SIZE = (299, 299)
FEATURE_DIM = 2048
BN_EPS = 1e-3

# State_dict keys that may be present and are not used: the classifier, and BatchNorm's step counters.
IGNORED_KEYS = ('fc.weight', 'fc.bias')
_IGNORED_SUFFIX = '.num_batches_tracked'


class InceptionWeightsMissing(FileNotFoundError, CheckpointError):
    """The Inception weights file is not where it was looked for (it is never downloaded automatically)."""


class InceptionWeightsMismatch(CheckpointError):
    """An Inception state_dict has missing or unexpected keys, or arrays of the wrong shape."""


# ---------------------------------------------------------------------------------------------------------------------
# The network

def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def abstract_array(shape: tuple[int, ...]) -> jax.ShapeDtypeStruct:
    """A float32 placeholder: builds the network with shapes only, to be filled from a state_dict."""
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def zeros_array(shape: tuple[int, ...]) -> jax.Array:
    return jnp.zeros(shape, jnp.float32)


class Conv2d(nnx.Module):
    """2-D convolution without bias, NHWC, kernel HWIO, explicit symmetric padding."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, *, precision,
                 init: Callable = zeros_array):
        kh, kw = _pair(kernel_size)
        self.kernel = nnx.Param(init((kh, kw, in_channels, out_channels)))
        self.strides = _pair(stride)
        self.padding = tuple((p, p) for p in _pair(padding))
        self.precision = precision

    def __call__(self, x):
        return jax.lax.conv_general_dilated(x, self.kernel[...], self.strides, self.padding,
                                            dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=self.precision)


class BatchNorm(nnx.Module):
    """Batch norm in inference form: (x − running_mean) / √(running_var + ε) · scale + bias, ε = 1e-3. The running
    statistics are `nnx.BatchStat` variables (not trainable, never updated here)."""

    def __init__(self, channels: int, *, init: Callable = zeros_array):
        self.scale = nnx.Param(init((channels,)))
        self.bias = nnx.Param(init((channels,)))
        self.mean = nnx.BatchStat(init((channels,)))
        self.var = nnx.BatchStat(init((channels,)))

    def __call__(self, x):
        factor = self.scale[...] * jax.lax.rsqrt(self.var[...] + BN_EPS)
        return (x - self.mean[...]) * factor + self.bias[...]


class BasicConv2d(nnx.Module):
    """Convolution without bias → batch norm → ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, *, precision,
                 init: Callable = zeros_array):
        self.conv = Conv2d(in_channels, out_channels, kernel_size, stride, padding, precision=precision, init=init)
        self.bn = BatchNorm(out_channels, init=init)

    def __call__(self, x):
        return jax.nn.relu(self.bn(self.conv(x)))


def avg_pool_3x3_same_excluding_padding(x):
    """3×3 average pool, stride 1, padding 1, dividing by the number of real (unpadded) pixels in each window."""
    window, strides, pads = (1, 3, 3, 1), (1, 1, 1, 1), ((0, 0), (1, 1), (1, 1), (0, 0))
    total = jax.lax.reduce_window(x, jnp.zeros((), x.dtype), jax.lax.add, window, strides, pads)
    h, w = x.shape[1], x.shape[2]
    count_h = np.convolve(np.ones(h), np.ones(3), 'same')  # 2 at the borders, 3 inside (static shapes)
    count_w = np.convolve(np.ones(w), np.ones(3), 'same')
    counts = (count_h[:, None] * count_w[None, :])[None, :, :, None]
    return total / jnp.asarray(counts, x.dtype)


def max_pool_3x3(x, stride: int, padding: int = 0):
    """3×3 max pool; padding (if any) never wins."""
    pads = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    return jax.lax.reduce_window(x, jnp.array(-jnp.inf, x.dtype), jax.lax.max, (1, 3, 3, 1),
                                 (1, stride, stride, 1), pads)


class InceptionA(nnx.Module):
    def __init__(self, in_channels: int, pool_features: int, *, precision, init):
        conv = functools.partial(BasicConv2d, precision=precision, init=init)
        self.branch1x1 = conv(in_channels, 64, 1)
        self.branch5x5_1 = conv(in_channels, 48, 1)
        self.branch5x5_2 = conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = conv(in_channels, 64, 1)
        self.branch3x3dbl_2 = conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = conv(96, 96, 3, padding=1)
        self.branch_pool = conv(in_channels, pool_features, 1)

    def __call__(self, x):
        return jnp.concatenate([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(avg_pool_3x3_same_excluding_padding(x)),
        ], axis=-1)


class InceptionB(nnx.Module):
    def __init__(self, in_channels: int, *, precision, init):
        conv = functools.partial(BasicConv2d, precision=precision, init=init)
        self.branch3x3 = conv(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = conv(in_channels, 64, 1)
        self.branch3x3dbl_2 = conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = conv(96, 96, 3, stride=2)

    def __call__(self, x):
        return jnp.concatenate([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            max_pool_3x3(x, stride=2),
        ], axis=-1)


class InceptionC(nnx.Module):
    def __init__(self, in_channels: int, channels_7x7: int, *, precision, init):
        conv = functools.partial(BasicConv2d, precision=precision, init=init)
        c7 = channels_7x7
        self.branch1x1 = conv(in_channels, 192, 1)
        self.branch7x7_1 = conv(in_channels, c7, 1)
        self.branch7x7_2 = conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = conv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = conv(in_channels, c7, 1)
        self.branch7x7dbl_2 = conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = conv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = conv(in_channels, 192, 1)

    def __call__(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7dbl = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            b7dbl = layer(b7dbl)
        return jnp.concatenate([
            self.branch1x1(x), b7, b7dbl, self.branch_pool(avg_pool_3x3_same_excluding_padding(x)),
        ], axis=-1)


class InceptionD(nnx.Module):
    def __init__(self, in_channels: int, *, precision, init):
        conv = functools.partial(BasicConv2d, precision=precision, init=init)
        self.branch3x3_1 = conv(in_channels, 192, 1)
        self.branch3x3_2 = conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = conv(in_channels, 192, 1)
        self.branch7x7x3_2 = conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = conv(192, 192, 3, stride=2)

    def __call__(self, x):
        b7 = x
        for layer in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = layer(b7)
        return jnp.concatenate([
            self.branch3x3_2(self.branch3x3_1(x)), b7, max_pool_3x3(x, stride=2),
        ], axis=-1)


class InceptionE(nnx.Module):
    """The E block; `pool='avg'` (Mixed_7b: average pool without the padding) or `'max'` (Mixed_7c: the TF graph's
    3×3 max pool, stride 1, padding 1)."""

    def __init__(self, in_channels: int, pool: str, *, precision, init):
        if pool not in ('avg', 'max'):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        conv = functools.partial(BasicConv2d, precision=precision, init=init)
        self.pool = pool
        self.branch1x1 = conv(in_channels, 320, 1)
        self.branch3x3_1 = conv(in_channels, 384, 1)
        self.branch3x3_2a = conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = conv(in_channels, 448, 1)
        self.branch3x3dbl_2 = conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = conv(in_channels, 192, 1)

    def __call__(self, x):
        b3 = self.branch3x3_1(x)
        b3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = avg_pool_3x3_same_excluding_padding(x) if self.pool == 'avg' else max_pool_3x3(x, 1, 1)
        return jnp.concatenate([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(b3dbl), self.branch3x3dbl_3b(b3dbl),
            self.branch_pool(pooled),
        ], axis=-1)


class InceptionV3(nnx.Module):
    """The FID Inception v3 up to its 2048-d average-pool features.

    Input: NHWC float images, 299 × 299 × 3, already normalised to (x − 128) / 128 for x in [0, 255].
    Output: [N, 2048] float32. Get one with weights from `load_inception` / `inception_from_state_dict`; the
    constructor only lays out the variables (`init(shape)` makes each: zeros by default, `abstract_array` for shapes
    only). `precision` is the convolution precision (default HIGHEST: true float32 also on GPUs/TPUs, which would
    otherwise use TF32/bf16 passes; on CPU it makes no difference).
    """

    def __init__(self, *, precision: jax.lax.PrecisionLike = jax.lax.Precision.HIGHEST,
                 init: Callable = zeros_array):
        conv = functools.partial(BasicConv2d, precision=precision, init=init)
        kw = dict(precision=precision, init=init)
        self.Conv2d_1a_3x3 = conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = conv(32, 32, 3)
        self.Conv2d_2b_3x3 = conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = conv(64, 80, 1)
        self.Conv2d_4a_3x3 = conv(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32, **kw)
        self.Mixed_5c = InceptionA(256, pool_features=64, **kw)
        self.Mixed_5d = InceptionA(288, pool_features=64, **kw)
        self.Mixed_6a = InceptionB(288, **kw)
        self.Mixed_6b = InceptionC(768, channels_7x7=128, **kw)
        self.Mixed_6c = InceptionC(768, channels_7x7=160, **kw)
        self.Mixed_6d = InceptionC(768, channels_7x7=160, **kw)
        self.Mixed_6e = InceptionC(768, channels_7x7=192, **kw)
        self.Mixed_7a = InceptionD(768, **kw)
        self.Mixed_7b = InceptionE(1280, pool='avg', **kw)
        self.Mixed_7c = InceptionE(2048, pool='max', **kw)

    def __call__(self, x):
        x = jnp.asarray(x, jnp.float32)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = max_pool_3x3(x, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = max_pool_3x3(x, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return jnp.mean(x, axis=(1, 2))


# ---------------------------------------------------------------------------------------------------------------------
# State_dict ↔ variables

# NNX variable name → PyTorch state_dict name (the last path element); conv kernels are HWIO here, OIHW in PyTorch.
_TORCH_NAMES = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean', 'var': 'running_var'}


def _torch_key(path: tuple) -> str:
    return '.'.join(str(p) for p in path[:-1]) + '.' + _TORCH_NAMES[path[-1]]


def _to_torch_shape(path: tuple, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(shape[i] for i in (3, 2, 0, 1)) if path[-1] == 'kernel' else tuple(shape)


def _abstract_inception(precision) -> InceptionV3:
    return InceptionV3(precision=precision, init=abstract_array)


def _torch_shapes(model: InceptionV3) -> dict[str, tuple[int, ...]]:
    return {_torch_key(path): _to_torch_shape(path, tuple(var.shape))
            for path, var in nnx.to_flat_state(nnx.state(model))}


def inception_state_dict_shapes() -> dict[str, tuple[int, ...]]:
    """The state_dict keys the network needs (pytorch-fid names) with their PyTorch shapes (conv weights OIHW)."""
    return _torch_shapes(_abstract_inception(None))


def _is_ignored(key: str, expected: Mapping[str, tuple]) -> bool:
    if key in IGNORED_KEYS:
        return True
    return key.endswith(_IGNORED_SUFFIX) and key[:-len(_IGNORED_SUFFIX)] + '.running_mean' in expected


def inception_from_state_dict(state_dict: Mapping[str, np.ndarray], source: str = 'state_dict', *,
                              precision: jax.lax.PrecisionLike = jax.lax.Precision.HIGHEST) -> InceptionV3:
    """The FID InceptionV3 with every parameter and running statistic taken from a pytorch-fid/torch-fidelity
    state_dict (PyTorch layouts), strictly.

    `fc.weight`, `fc.bias` (the classifier) and each batch norm's `num_batches_tracked` may be present and are
    ignored. Any other key must be used, every variable filled, every shape equal; otherwise one
    InceptionWeightsMismatch lists all missing keys, unexpected keys and shape differences. `source` names the state
    dict in messages (e.g. the file path).
    """
    if not isinstance(state_dict, Mapping):
        raise InceptionWeightsMismatch(f'{source}: expected a state_dict (a dict of tensors), found '
                                       f'{type(state_dict).__name__}')
    abstract = _abstract_inception(precision)
    expected = _torch_shapes(abstract)
    used = {k: v for k, v in state_dict.items() if not _is_ignored(k, expected)}
    not_arrays = sorted(k for k, v in used.items() if not isinstance(v, (np.ndarray, jax.Array)))
    if not_arrays:
        raise InceptionWeightsMismatch(f'{source}: not a state_dict: entries {not_arrays[:5]} are not tensors')
    problems = describe_mismatch(expected, {k: tuple(np.shape(v)) for k, v in used.items()})
    if problems:
        raise InceptionWeightsMismatch(
            f'{source} does not match the FID Inception v3 (pytorch-fid {INCEPTION_WEIGHTS_FILE} keys):\n{problems}')
    graphdef, state = nnx.split(abstract)
    filled = {}
    for path, var in nnx.to_flat_state(state):
        array = np.asarray(used[_torch_key(path)], np.float32)
        if path[-1] == 'kernel':
            array = np.transpose(array, (2, 3, 1, 0))  # OIHW → HWIO
        filled[path] = var.replace(jnp.asarray(array))
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


# ---------------------------------------------------------------------------------------------------------------------
# Finding and reading the weights file

def default_inception_path() -> Path:
    """Where the weights are looked for when no path is given and $KDIFF_JAX_INCEPTION_WEIGHTS is unset:
    $XDG_CACHE_HOME/kdiff_jax/ (default ~/.cache/kdiff_jax/) pt_inception-2015-12-05-6726825d.pth."""
    cache = os.environ.get('XDG_CACHE_HOME') or str(Path.home() / '.cache')
    return Path(cache) / 'kdiff_jax' / INCEPTION_WEIGHTS_FILE


def _missing_message(looked_at: str) -> str:
    return (
        f'FID/KID needs the Inception v3 weights file {INCEPTION_WEIGHTS_FILE} (pytorch-fid\'s port of the '
        f'2015-12-05 TensorFlow graph); {looked_at}. It is not downloaded automatically. Get it from\n'
        f'  {INCEPTION_WEIGHTS_URL}\n'
        f'and put it at {default_inception_path()} (the default location), or pass its path with '
        f'--inception-weights PATH, or set the environment variable {INCEPTION_WEIGHTS_ENV}=PATH.')


def resolve_inception_path(path: str | os.PathLike | None = None) -> Path:
    """The weights file to use: `path` if given, else $KDIFF_JAX_INCEPTION_WEIGHTS, else `default_inception_path()`.
    Raises InceptionWeightsMissing (naming the file, its URL and the ways to point at it) if it is not there."""
    if path is not None:
        where, looked_at = Path(path).expanduser(), f'no file at the given path {path}'
    elif os.environ.get(INCEPTION_WEIGHTS_ENV):
        env = os.environ[INCEPTION_WEIGHTS_ENV]
        where, looked_at = Path(env).expanduser(), f'${INCEPTION_WEIGHTS_ENV} is {env}, which is not a file'
    else:
        where = default_inception_path()
        looked_at = f'it is not at {where} and neither --inception-weights nor ${INCEPTION_WEIGHTS_ENV} is set'
    if not where.is_file():
        raise InceptionWeightsMissing(_missing_message(looked_at))
    return where


def _is_torchscript_archive(path: Path) -> bool:
    """A TorchScript archive is a zip holding `<name>/code/...` (Python source that torch.jit.load runs) and
    `<name>/constants.pkl`; a torch.save file is a zip with data.pkl and tensor data only."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except zipfile.BadZipFile:
        return False
    for name in names:
        parts = name.split('/')
        if 'code' in parts[:-1] or parts[-1] == 'constants.pkl':
            return True
    return False


def load_inception(path: str | os.PathLike | None = None, *,
                   precision: jax.lax.PrecisionLike = jax.lax.Precision.HIGHEST) -> InceptionV3:
    """The FID InceptionV3 with weights from `path` (a `.pth` state_dict, read with `torch.load(weights_only=True)`,
    or `.safetensors`); see `resolve_inception_path` for where it looks when `path` is None.

    Refused with CheckpointError: pickles that would construct objects or run code (nothing runs), and TorchScript
    archives such as clean-fid's/NVIDIA's `inception-2015-12-05.pt` (loading those means torch.jit.load, which
    executes the code inside) — the same network's weights are in pytorch-fid's state_dict file.
    """
    where = resolve_inception_path(path)
    if _is_torchscript_archive(where):
        raise CheckpointError(
            f'{where} is a TorchScript archive (it contains code/ and constants.pkl, like clean-fid\'s/NVIDIA\'s '
            f'inception-2015-12-05.pt). It is refused: loading it would need torch.jit.load, which executes the code '
            f'stored in the file. The same 2015-12-05 Inception network is available as a plain state_dict, '
            f'{INCEPTION_WEIGHTS_FILE}: {INCEPTION_WEIGHTS_URL}')
    return inception_from_state_dict(read_checkpoint_file(where), source=str(where), precision=precision)


# ---------------------------------------------------------------------------------------------------------------------
# The feature extractor

def preprocess(images: jax.Array, size: Sequence[int] = INCEPTION_SIZE) -> jax.Array:
    """NHWC images in [−1, 1] (1 or 3 channels, any size) → the network input: resized to `size` as resize_right
    does (if not already that size), grey repeated to RGB, 127.5 x + 127.5 clipped to [0, 255], then (x − 128) / 128."""
    x = jnp.asarray(images)
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f'expected NHWC images with 1 or 3 channels, got shape {x.shape}')
    x = x.astype(jnp.float32)
    if tuple(x.shape[1:3]) != tuple(size):
        x = resize_to(x, size)
    if x.shape[-1] == 1:
        x = jnp.concatenate([x] * 3, axis=-1)
    x = jnp.clip(x * 127.5 + 127.5, 0.0, 255.0)
    return (x - 128.0) / 128.0


def extract_features(graphdef: nnx.GraphDef, state: nnx.State, images: jax.Array) -> jax.Array:
    """[N, 2048] float32 Inception features of NHWC images in [−1, 1], as k-diffusion's InceptionV3FeatureExtractor.

    A pure function of the split model (`nnx.split(inception)`) and the images, for callers that jit it themselves
    (e.g. with a batch sharded on axis 0 and `state` replicated): `jit_extract_features(graphdef)(state, images)`.
    """
    return nnx.merge(graphdef, state)(preprocess(images))


def jit_extract_features(graphdef: nnx.GraphDef, **jit_kwargs) -> Callable:
    """`extract_features` of `graphdef` under `jax.jit(**jit_kwargs)`, with kdiff_jax's XLA options
    (`compiler_options.cpu_compiler_options`: on XLA:CPU the convolutions run on Eigen, which halved the time of a
    batch on an Intel Xeon host, bench/RESULTS.md session 10)."""
    return jax.jit(functools.partial(extract_features, graphdef), compiler_options=cpu_compiler_options(),
                   **jit_kwargs)


class FIDFeatureExtractor:
    """k-diffusion's InceptionV3FeatureExtractor: `features(images_nhwc)` with images in [−1, 1] → [N, 2048].

    `features` is one jitted function (compiled once per input shape); it accepts a batch sharded on axis 0 and
    places nothing itself. `graphdef` and `state` are public: put `state` where the batch will be (e.g.
    `extractor.state = jax.device_put(extractor.state, replicated_sharding)`) to avoid copying the weights per call.
    """

    def __init__(self, model: InceptionV3):
        self.graphdef, self.state = nnx.split(model)
        self._features: Callable = jit_extract_features(self.graphdef)

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, **kwargs) -> FIDFeatureExtractor:
        """The extractor with weights from `load_inception(path, **kwargs)`."""
        return cls(load_inception(path, **kwargs))

    def features(self, images: jax.Array) -> jax.Array:
        return self._features(self.state, images)

    __call__ = features
