"""Random-access image sources, one per `dataset.type`.

Every source follows grain's `RandomAccessDataSource` protocol (`__len__`, `__getitem__`) and adds two methods the
pipeline uses:

  load(index, epoch) -> PIL.Image    the image of item `index` in `epoch` (only the cars source depends on the epoch:
                                      it picks one view per car per epoch); raises if the file cannot be decoded
  describe(index) -> str             what to name in a log line (a path, or 'mnist[17]')

Sources hold only small, picklable state (paths, arrays, or dataset handles opened lazily), so they travel to grain
worker processes.

  imagefolder    every image under `location`, recursively, in any format PIL opens; sorted paths
  cars/srn_cars  `<location>/<car_id>/rgb/*.png`; one random view per car per epoch, seeded by (seed, epoch, car);
                 cars split 90/10 after shuffling the sorted ids with Python's `random.Random(0)` (the cars fork's
                 `random.seed(0); random.shuffle(ids)`: the same split for the same ids)
  digits         sklearn's 1797 8×8 digits (bundled with scikit-learn, offline), grayscale
  mnist/cifar10  tensorflow-datasets' prepared array_record files via `tfds.data_source` (never downloads)
  huggingface    `datasets.load_dataset(location, split='train')`, images under `image_key`
"""

from __future__ import annotations

import glob
import logging
import os
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

# Pillow plugins that register an extension but only identify files (reading needs an external handler).
_STUB_FORMATS = frozenset({'BUFR', 'GRIB', 'HDF5', 'WMF'})
_VIEW_STREAM = 0x5649_4557  # tags the per-epoch view choice's random stream ("VIEW")
SPLITS = ('train', 'val', 'all')


class DatasetError(ValueError):
    """A dataset that cannot be read: missing, empty, not prepared, or a missing optional package."""


def pil_extensions() -> frozenset[str]:
    """Lower-case file extensions (with the dot) of every format this Pillow can open."""
    Image.init()
    return frozenset(ext.lower() for ext, fmt in Image.registered_extensions().items()
                     if fmt in Image.OPEN and fmt not in _STUB_FORMATS)


def _open(path: str) -> Image.Image:
    with open(path, 'rb') as f:
        image = Image.open(f)
        image.load()
    return image


class ImageSource:
    """Base class: `load(index, epoch)` and `describe(index)` over `len(self)` items."""

    name = 'images'

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, index: int, epoch: int = 0) -> Image.Image:
        raise NotImplementedError

    def describe(self, index: int) -> str:
        return f'{self.name}[{index}]'

    def __getitem__(self, index: int) -> Image.Image:
        return self.load(int(index), 0)

    def _check_index(self, index: int) -> int:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f'{self.name}: index {index} out of range [0, {len(self)})')
        return index


class ImageFolderSource(ImageSource):
    """Every image under `root` (recursively, following symlinks, hidden files and folders left out), sorted."""

    name = 'imagefolder'

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f'dataset.location {str(self.root)!r}: not a directory (imagefolder reads every image '
                               'under it, recursively)')
        extensions = pil_extensions()
        paths, seen = [], set()
        for folder, dirs, files in os.walk(self.root, followlinks=True):
            real = os.path.realpath(folder)
            if real in seen:  # a symlink cycle
                dirs[:] = []
                continue
            seen.add(real)
            dirs[:] = [d for d in dirs if not d.startswith('.')]
            paths += [Path(folder, f) for f in files
                      if not f.startswith('.') and os.path.splitext(f)[1].lower() in extensions]
        if not paths:
            raise DatasetError(f'dataset.location {str(self.root)!r}: no images found (looked recursively for '
                               f'{", ".join(sorted(extensions)[:12])}, …)')
        self.paths = [str(p) for p in sorted(paths)]

    def __len__(self) -> int:
        return len(self.paths)

    def describe(self, index: int) -> str:
        return self.paths[index]

    def load(self, index: int, epoch: int = 0) -> Image.Image:
        return _open(self.paths[self._check_index(index)])


def split_ids(ids: Sequence[str], split: str, *, split_seed: int = 0, train_fraction: float = 0.9) -> list[str]:
    """The cars fork's split: sort the ids, shuffle them with `random.Random(split_seed)`, train = the first
    int(0.9 n), val = the rest."""
    if split not in SPLITS:
        raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
    ordered = sorted(ids)
    if split == 'all':
        return ordered
    random.Random(split_seed).shuffle(ordered)
    cut = int(len(ordered) * train_fraction)
    return ordered[:cut] if split == 'train' else ordered[cut:]


def view_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random stream that picks item `index`'s view in `epoch`."""
    return np.random.default_rng(np.random.SeedSequence([_VIEW_STREAM, int(seed) % 2 ** 64, int(epoch), int(index)]))


class CarsSource(ImageSource):
    """SRN cars: `<root>/<car_id>/rgb/*.png`, one item per car; each epoch shows one view of it, drawn from
    (seed, epoch, car index)."""

    name = 'cars'

    def __init__(self, root: str | os.PathLike, *, split: str = 'train', seed: int = 0, split_seed: int = 0):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f'dataset.location {str(self.root)!r}: not a directory (the cars layout is '
                               '<location>/<car_id>/rgb/*.png)')
        views = {}
        for entry in sorted(os.scandir(self.root), key=lambda e: e.name):
            rgb = Path(entry.path, 'rgb')
            if entry.is_dir() and rgb.is_dir():
                files = sorted(f.name for f in os.scandir(rgb) if f.name.lower().endswith('.png')
                               and not f.name.startswith('.'))
                if files:
                    views[entry.name] = files
        if not views:
            raise DatasetError(f'dataset.location {str(self.root)!r}: no cars found (expected '
                               '<location>/<car_id>/rgb/*.png)')
        self.split = split
        self.seed = int(seed)
        self.car_ids = split_ids(list(views), split, split_seed=split_seed)
        if not self.car_ids:
            raise DatasetError(f'dataset.location {str(self.root)!r}: the {split!r} split of {len(views)} cars is '
                               'empty')
        self.views = [views[car] for car in self.car_ids]

    def __len__(self) -> int:
        return len(self.car_ids)

    def view(self, index: int, epoch: int) -> str:
        """File name (in `<car>/rgb/`) of car `index`'s view in `epoch`."""
        views = self.views[self._check_index(index)]
        return views[int(view_rng(self.seed, epoch, index).integers(len(views)))]

    def path(self, index: int, epoch: int) -> str:
        return str(self.root / self.car_ids[index] / 'rgb' / self.view(index, epoch))

    def describe(self, index: int) -> str:
        return str(self.root / self.car_ids[index] / 'rgb')

    def load(self, index: int, epoch: int = 0) -> Image.Image:
        return _open(self.path(index, epoch))


class ArraySource(ImageSource):
    """Images held in memory as a uint8 [N, H, W] or [N, H, W, C] array."""

    def __init__(self, images: np.ndarray, name: str = 'array'):
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise ValueError(f'{name}: expected uint8 [N, H, W(, C)] images, got {images.dtype} {images.shape}')
        self.images = images
        self.name = name

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int, epoch: int = 0) -> Image.Image:
        image = self.images[self._check_index(index)]
        return Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image)


def load_digits_uint8() -> np.ndarray:
    """sklearn's 1797 8×8 digits as uint8 [1797, 8, 8] (0…16 scaled to 0…255, rounded)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise DatasetError('dataset.type "digits" needs scikit-learn (its digits ship inside the wheel): '
                           'pip install scikit-learn') from e
    images = load_digits().images
    return np.round(images * (255 / 16)).astype(np.uint8)


class DigitsSource(ArraySource):
    """sklearn's digits (grayscale 8×8; upscaled with Lanczos by the pipeline)."""

    def __init__(self):
        super().__init__(load_digits_uint8(), name='digits')


def tfds_data_dir(location: str | None) -> Path:
    """dataset.location, else $TFDS_DATA_DIR, else ~/tensorflow_datasets (tensorflow-datasets' default)."""
    return Path(location or os.environ.get('TFDS_DATA_DIR') or Path.home() / 'tensorflow_datasets').expanduser()


def _not_prepared(name: str, data_dir: Path, found: str) -> DatasetError:
    return DatasetError(
        f'dataset.type {name!r}: {found}. kdiff_jax never downloads it (training machines are often offline); '
        f'prepare it once as array_record files where there is network access:\n'
        f'    pip install tensorflow tensorflow-datasets\n'
        f'    tfds build {name} --data_dir {data_dir} --file_format array_record\n'
        f'then copy the {name}/ folder into {data_dir} on this machine (or set dataset.location to the folder '
        f'that holds {name}/).')


def check_tfds_prepared(name: str, data_dir: Path) -> None:
    """Raise a DatasetError saying how to prepare `name` unless `data_dir/name/<version>/` holds array_record
    files with their dataset_info.json. Looks at the file system only (fast, no network)."""
    infos = glob.glob(str(data_dir / name / '**' / 'dataset_info.json'), recursive=True)
    if not infos:
        raise _not_prepared(name, data_dir, f'no prepared copy under {data_dir / name} (no dataset_info.json)')
    records = [p for info in infos for p in glob.glob(os.path.join(os.path.dirname(info), '*.array_record*'))]
    if not records:
        raise _not_prepared(name, data_dir, f'{os.path.dirname(infos[0])} holds no array_record files (tfrecord '
                                            'files cannot be read at random)')


class TfdsSource(ImageSource):
    """A tensorflow-datasets catalog dataset (mnist, cifar10, …) read through `tfds.data_source`, which needs the
    prepared array_record files and no TensorFlow."""

    def __init__(self, name: str, location: str | None = None, *, split: str = 'train', image_key: str = 'image'):
        self.name = name
        self.data_dir = tfds_data_dir(location)
        self.split = split
        self.image_key = image_key
        check_tfds_prepared(name, self.data_dir)
        self._source = None
        self._len = len(self._data_source())

    def _data_source(self):
        if self._source is None:
            try:
                import tensorflow_datasets as tfds
            except ImportError as e:
                raise DatasetError(f'dataset.type {self.name!r} needs tensorflow-datasets and array-record: '
                                   'pip install tensorflow-datasets array-record') from e
            self._source = tfds.data_source(self.name, split=self.split, data_dir=str(self.data_dir),
                                            download=False)
        return self._source

    def __getstate__(self):
        state = dict(self.__dict__)
        state['_source'] = None  # reopened in the worker
        return state

    def __len__(self) -> int:
        return self._len

    def load(self, index: int, epoch: int = 0) -> Image.Image:
        record = self._data_source()[self._check_index(index)]
        image = np.asarray(record[self.image_key])
        return Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image)


class HuggingFaceSource(ImageSource):
    """`datasets.load_dataset(location, split='train')`; the image under `image_key` (a PIL image, as decoded by
    the `datasets` Image feature, or an array)."""

    def __init__(self, location: str, *, image_key: str | None = None, split: str = 'train'):
        if not location:
            raise DatasetError('dataset.type "huggingface" needs dataset.location (a Hub name or a local path)')
        try:
            import datasets
        except ImportError as e:
            raise DatasetError('dataset.type "huggingface" needs the optional package `datasets`: '
                               'pip install datasets') from e
        self.name = f'huggingface:{location}'
        self.image_key = image_key or 'image'
        self.dataset = datasets.load_dataset(location, split=split)
        columns = getattr(self.dataset, 'column_names', None)
        if columns is not None and self.image_key not in columns:
            raise DatasetError(f'dataset.image_key {self.image_key!r}: not a column of {location!r} '
                               f'(columns: {", ".join(columns)})')

    def __len__(self) -> int:
        return len(self.dataset)

    def load(self, index: int, epoch: int = 0) -> Image.Image:
        image = self.dataset[self._check_index(index)][self.image_key]
        if isinstance(image, Image.Image):
            image.load()
            return image
        if isinstance(image, dict) and image.get('bytes') is not None:  # an undecoded Image feature
            import io
            return _open_bytes(io.BytesIO(image['bytes']))
        image = np.asarray(image)
        return Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image)


def _open_bytes(buffer) -> Image.Image:
    image = Image.open(buffer)
    image.load()
    return image


def make_source(config, *, split: str = 'train', seed: int = 0) -> ImageSource:
    """The source of `config['dataset']` (type, location, image_key). `seed` only affects the cars' view choice."""
    dataset = config['dataset']
    kind, location = dataset['type'], dataset.get('location')
    image_key = dataset.get('image_key')
    if kind == 'imagefolder':
        if not location:
            raise DatasetError('dataset.type "imagefolder" needs dataset.location (a folder of images)')
        return ImageFolderSource(location)
    if kind in ('cars', 'srn_cars'):
        if not location:
            raise DatasetError(f'dataset.type {kind!r} needs dataset.location (the SRN cars folder)')
        return CarsSource(location, split=split, seed=seed)
    if kind == 'digits':
        return DigitsSource()
    if kind in ('mnist', 'cifar10'):
        tfds_split = {'train': 'train', 'val': 'test', 'all': 'train+test'}[split]
        return TfdsSource(kind, location, split=tfds_split, image_key=image_key or 'image')
    if kind == 'huggingface':
        return HuggingFaceSource(location, image_key=image_key)
    raise DatasetError(f'dataset.type {kind!r}: unknown (expected imagefolder, cars, srn_cars, digits, mnist, '
                       'cifar10 or huggingface)')
