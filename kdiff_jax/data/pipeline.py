"""The training input pipeline: grain datasets with seeded per-epoch shuffling, per-host shards, worker processes,
the Karras augmentation, skipping of unreadable images, and a checkpointable iterator.

The example stream is defined over *global* batches, so what a host sees depends on the seed and the global batch,
not on the number of hosts or workers:

  epoch e visits the n items in the order perm_e = permutation of range(n) drawn from (seed, e);
  global batch k holds B = batch_size · shard_count consecutive positions of that stream, and host h takes the
  contiguous block h·batch_size … (h+1)·batch_size − 1 of it — so the hosts' batches, concatenated in host order
  (as `jax.make_array_from_process_local_data` does), are exactly the batch one host with batch size B would see.
  drop_remainder=True (k-diffusion's drop_last): each epoch gives n // B global batches and leaves out its last
  n mod B items; drop_remainder=False: the stream runs on into the next epoch, nothing is left out.

Every random choice of an item derives from (seed, epoch, item index): the cars' view, the augmentation.
An image that cannot be read is logged (warning, with its path), counted, and replaced by the next one, so batches
stay full; `TrainIterator.skipped` is the count.

Batches are dicts of numpy arrays:
  image       [B, H, W, C] float32 in [-1, 1], augmented (as k-diffusion's first output)
  image_orig  [B, H, W, C] float32 in [-1, 1], the same image un-augmented
  aug_cond    [B, 9] float32, the augmentation's conditioning (zeros without model.augment_wrapper)
  index       [B] int32, the item's index in its source;  epoch  [B] int32
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import threading
from typing import Any

import grain
import numpy as np

from .augmentation import KarrasAugment, no_augmentation
from .sources import ImageSource, make_source
from .transforms import pil_mode, to_model_array

logger = logging.getLogger(__name__)

_SHUFFLE_STREAM = 0x5348_5546  # "SHUF": the per-epoch permutation
_AUGMENT_STREAM = 0x4155_474D  # "AUGM": the augmentation draws
_STATE_VERSION = 1
_MAX_CONSECUTIVE_FAILURES = 1000
_SKIPPED_KEY = '_skipped'


def _seed64(seed: int) -> int:
    return int(seed) % 2 ** 64


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order in which epoch `epoch` visits the n items."""
    rng = np.random.default_rng(np.random.SeedSequence([_SHUFFLE_STREAM, _seed64(seed), int(epoch)]))
    return rng.permutation(n)


def augment_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random stream of item `index`'s augmentation in `epoch`."""
    return np.random.default_rng(np.random.SeedSequence([_AUGMENT_STREAM, _seed64(seed), int(epoch), int(index)]))


@dataclasses.dataclass(frozen=True)
class StreamLayout:
    """Which (epoch, position in the epoch) the i-th example of host `shard_index` is (see the module docstring).

    start_epoch / start_batch shift the stream: it begins at global batch `start_batch` counted from the start of
    epoch `start_epoch`.
    """

    num_items: int
    batch_size: int
    shard_index: int = 0
    shard_count: int = 1
    drop_remainder: bool = True
    start_epoch: int = 0
    start_batch: int = 0

    def __post_init__(self):
        if self.num_items < 1:
            raise ValueError('the dataset is empty')
        if self.batch_size < 1:
            raise ValueError(f'batch_size must be >= 1, got {self.batch_size}')
        if not 0 <= self.shard_index < self.shard_count:
            raise ValueError(f'shard_index {self.shard_index} out of range for shard_count {self.shard_count}')
        if self.drop_remainder and self.num_items < self.global_batch:
            raise ValueError(f'the dataset has {self.num_items} items, fewer than one global batch '
                             f'({self.batch_size} per host × {self.shard_count} hosts = {self.global_batch}); '
                             'lower the batch size or use drop_remainder=False')

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.shard_count

    @property
    def batches_per_epoch(self) -> int:
        """Global batches per epoch (with drop_remainder=False: complete ones; batches may span two epochs)."""
        return self.num_items // self.global_batch

    def locate(self, i: int) -> tuple[int, int]:
        """(epoch, position within the epoch's permutation) of this host's i-th example."""
        k, j = divmod(int(i), self.batch_size)
        k += self.start_batch
        offset = self.shard_index * self.batch_size + j
        if self.drop_remainder:
            epoch, kk = divmod(k, self.batches_per_epoch)
            return self.start_epoch + epoch, kk * self.global_batch + offset
        epoch, position = divmod(k * self.global_batch + offset, self.num_items)
        return self.start_epoch + epoch, position


class _Locate:
    """grain map: example number → (epoch, item index), through the epoch's permutation (cached per epoch)."""

    def __init__(self, layout: StreamLayout, seed: int):
        self.layout = layout
        self.seed = seed
        self._perms: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def __getstate__(self):
        return {'layout': self.layout, 'seed': self.seed}

    def __setstate__(self, state):
        self.__init__(state['layout'], state['seed'])

    def __call__(self, i) -> tuple[int, int]:
        epoch, position = self.layout.locate(i)
        with self._lock:
            perm = self._perms.get(epoch)
            if perm is None:
                perm = epoch_permutation(self.seed, epoch, self.layout.num_items)
                while len(self._perms) >= 2:
                    del self._perms[min(self._perms)]
                self._perms[epoch] = perm
        return epoch, int(perm[position])


class LoadFailure:
    """Stands in the stream for an image that could not be read (dropped by `SkipFailedIterDataset`)."""

    __slots__ = ('what', 'error')

    def __init__(self, what: str, error: str):
        self.what, self.error = what, error

    def __reduce__(self):
        return LoadFailure, (self.what, self.error)


class LoadExample:
    """grain map: (epoch, index) → example dict (see the module docstring), or a LoadFailure when the image cannot be
    read or decoded (logged as a warning with its path)."""

    def __init__(self, source: ImageSource, size, channels: int, augment: KarrasAugment | None, seed: int):
        self.source, self.size, self.channels = source, tuple(size), channels
        self.augment, self.seed = augment, seed
        pil_mode(channels)

    def __call__(self, record):
        epoch, index = record
        try:
            array = to_model_array(self.source.load(index, epoch), self.size, self.channels)
        except Exception as e:  # noqa: BLE001 - any decoding failure of one file must not stop a run
            what = self.source.describe(index)
            logger.warning('skipping unreadable image %s: %s: %s', what, type(e).__name__, e)
            return LoadFailure(what, f'{type(e).__name__}: {e}')
        if self.augment is None:
            image, image_orig, aug_cond = no_augmentation(array)
        else:
            image, image_orig, aug_cond = self.augment(array, augment_rng(self.seed, epoch, index))
        return {'image': image, 'image_orig': image_orig, 'aug_cond': aug_cond,
                'index': np.int32(index), 'epoch': np.int32(epoch)}


class _SkipFailedIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator):
        super().__init__(parent)

    def __next__(self):
        skipped = 0
        while True:
            element = next(self._parent)
            if not isinstance(element, LoadFailure):
                element[_SKIPPED_KEY] = np.int32(skipped)
                return element
            skipped += 1
            if skipped >= _MAX_CONSECUTIVE_FAILURES:
                raise RuntimeError(f'{skipped} images in a row could not be read (the last: {element.what}: '
                                   f'{element.error}); check dataset.location and the files')

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)


class SkipFailedIterDataset(grain.IterDataset):
    """Drops LoadFailure elements; each kept element carries '_skipped', the number dropped just before it."""

    def __init__(self, parent: grain.IterDataset):
        super().__init__(parent)

    def __iter__(self) -> grain.DatasetIterator:
        return _SkipFailedIterator(self._parent.__iter__())

    def __str__(self) -> str:
        return 'SkipFailedIterDataset'


def _absl_flags_usable():
    """grain's multiprocessing reads absl flags, which raise until parsed; a program that never parses them (one
    not started by absl.app) gets their defaults."""
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _resolve_shards(shard_index, shard_count) -> tuple[int, int]:
    if shard_index is None or shard_count is None:
        import jax
        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    return int(shard_index), int(shard_count)


def make_augment(config) -> KarrasAugment | None:
    """The augmentation of `config['model']`: KarrasAugment(augment_prob) with augment_wrapper, else None."""
    model = config['model']
    return KarrasAugment(a_prob=float(model['augment_prob'])) if model['augment_wrapper'] else None


def example_dataset(source: ImageSource, layout: StreamLayout, *, seed: int, size, channels: int,
                    augment: KarrasAugment | None) -> grain.MapDataset:
    """The host's (infinite) example stream as a grain MapDataset: LoadExample results, failures included (as
    LoadFailure)."""
    return (grain.MapDataset.range(sys.maxsize)
            .map(_Locate(layout, seed))
            .map(LoadExample(source, size, channels, augment, seed)))


class TrainIterator:
    """Iterator of training batches (dicts of numpy arrays) with a JSON-serialisable, restorable state.

    `skipped` counts the unreadable images skipped so far (kept across save/restore); `epoch` is the epoch of the
    latest batch. `set_state(get_state())` continues with exactly the next batch. A state saved with a different
    host index, host count, per-host batch size or worker count but the same seed, data and global batch resumes
    at the next global batch (exact unless images were skipped); any other state resumes at the start of the
    epoch after the one it reached, with a warning.
    """

    def __init__(self, source: ImageSource, *, batch_size: int, seed: int, shard_index: int, shard_count: int,
                 num_workers: int, drop_remainder: bool, size, channels: int, augment: KarrasAugment | None,
                 read_threads: int | None, fingerprint: dict):
        self.source = source
        self.batch_size, self.seed = batch_size, seed
        self.shard_index, self.shard_count = shard_index, shard_count
        self.num_workers, self.drop_remainder = num_workers, drop_remainder
        self.size, self.channels, self.augment = tuple(size), channels, augment
        self.read_threads = read_threads
        self.fingerprint = fingerprint
        self.skipped = 0
        self.batches = 0
        self.epoch = 0
        self._iterator = None
        self._start(0, 0)

    def _layout(self, start_epoch: int, start_batch: int) -> StreamLayout:
        return StreamLayout(len(self.source), self.batch_size, self.shard_index, self.shard_count,
                            self.drop_remainder, start_epoch, start_batch)

    def _start(self, start_epoch: int, start_batch: int):
        self.close()
        self.start_epoch, self.start_batch = start_epoch, start_batch
        layout = self._layout(start_epoch, start_batch)
        self.epoch = start_epoch
        examples = example_dataset(self.source, layout, seed=self.seed, size=self.size, channels=self.channels,
                                   augment=self.augment)
        workers = self.num_workers
        threads = self.read_threads
        if threads is None:
            threads = 1 if workers else min(4, os.cpu_count() or 1)
        buffer = max(2 * self.batch_size // max(1, workers), 2)
        ds = SkipFailedIterDataset(examples.to_iter_dataset(
            grain.ReadOptions(num_threads=threads, prefetch_buffer_size=buffer)))
        if workers > 0:
            _absl_flags_usable()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                             per_worker_buffer_size=max(2, buffer)))
        ds = ds.batch(self.batch_size, drop_remainder=True)
        self._iterator = iter(ds)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._iterator)
        self.skipped += int(np.sum(batch.pop(_SKIPPED_KEY)))
        self.batches += 1
        self.epoch = int(np.max(batch['epoch']))
        return batch

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable state: restoring it continues with the next batch."""
        state = {'version': _STATE_VERSION, 'fingerprint': self.fingerprint, 'start_epoch': self.start_epoch,
                 'start_batch': self.start_batch, 'batches': self.batches, 'epoch': self.epoch,
                 'skipped': self.skipped, 'grain': self._iterator.get_state()}
        return json.loads(json.dumps(state))  # a copy, and proof that it serialises

    def set_state(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get('version') != _STATE_VERSION:
            raise ValueError(f'not a kdiff_jax data iterator state (version {_STATE_VERSION}): {state!r:.200}')
        saved = state['fingerprint']
        self.skipped = int(state['skipped'])
        if saved == self.fingerprint:
            offsets = int(state['start_epoch']), int(state['start_batch'])
            if offsets != (self.start_epoch, self.start_batch) or self._iterator is None:
                self._start(*offsets)
            self._iterator.set_state(state['grain'])  # grain's own restore (worker processes are kept)
            self.batches, self.epoch = int(state['batches']), int(state['epoch'])
            return
        if _global_view(saved) == _global_view(self.fingerprint):
            logger.info('data iterator: resuming at global batch %d (state saved with a different host/worker '
                        'layout)', int(state['start_batch']) + int(state['batches']))
            self._start(int(state['start_epoch']), int(state['start_batch']) + int(state['batches']))
        else:
            changed = sorted(k for k in set(saved) | set(self.fingerprint) if saved.get(k) != self.fingerprint.get(k))
            untouched = int(state['batches']) == 0 and int(state['start_batch']) == 0
            epoch = int(state['start_epoch']) if untouched else int(state['epoch']) + 1
            logger.warning('data iterator: the saved state belongs to different data settings (%s changed); '
                           'starting at epoch %d', ', '.join(changed), epoch)
            self._start(epoch, 0)
        self.batches = 0

    def close(self) -> None:
        iterator, self._iterator = self._iterator, None
        if iterator is not None and hasattr(iterator, 'close'):
            iterator.close()


_LOCAL_KEYS = ('batch_size', 'shard_index', 'shard_count', 'num_workers')


def _global_view(fingerprint: dict) -> dict:
    return {k: v for k, v in fingerprint.items() if k not in _LOCAL_KEYS}


def _fingerprint(config, source: ImageSource, *, seed, batch_size, shard_index, shard_count, num_workers,
                 drop_remainder, augment) -> dict:
    dataset, model = config['dataset'], config['model']
    return {'dataset': str(dataset['type']), 'location': dataset.get('location'), 'num_items': len(source),
            'input_size': [int(s) for s in model['input_size']], 'channels': int(model['input_channels']),
            'augment_prob': None if augment is None else float(augment.a_prob), 'seed': int(seed),
            'drop_remainder': bool(drop_remainder), 'global_batch': int(batch_size * shard_count),
            'batch_size': int(batch_size), 'shard_index': int(shard_index), 'shard_count': int(shard_count),
            'num_workers': int(num_workers)}


def make_train_iterator(config, *, batch_size: int, seed: int, shard_index: int | None = None,
                        shard_count: int | None = None, num_workers: int = 0, drop_remainder: bool = True,
                        read_threads: int | None = None, source: ImageSource | None = None) -> TrainIterator:
    """Infinite iterator of this host's training batches of `batch_size` (per host) for `config`.

    shard_index / shard_count default to jax.process_index() / jax.process_count(). num_workers > 0 decodes and
    augments in that many grain worker processes (batches are assembled in this process, so they do not depend on
    num_workers unless images are skipped). read_threads: threads per process reading images (default
    min(4, cores) without workers, 1 per worker). `source` replaces the config's dataset (tests, custom data).
    """
    shard_index, shard_count = _resolve_shards(shard_index, shard_count)
    model = config['model']
    source = make_source(config, split='train', seed=seed) if source is None else source
    augment = make_augment(config)
    fingerprint = _fingerprint(config, source, seed=seed, batch_size=batch_size, shard_index=shard_index,
                               shard_count=shard_count, num_workers=num_workers, drop_remainder=drop_remainder,
                               augment=augment)
    return TrainIterator(source, batch_size=int(batch_size), seed=int(seed), shard_index=shard_index,
                         shard_count=shard_count, num_workers=int(num_workers), drop_remainder=bool(drop_remainder),
                         size=model['input_size'], channels=int(model['input_channels']), augment=augment,
                         read_threads=read_threads, fingerprint=fingerprint)


def make_eval_images(config, n: int, *, seed: int = 0, split: str = 'train', source: ImageSource | None = None,
                     read_threads: int | None = None) -> np.ndarray:
    """n un-augmented images [n, H, W, C] float32 in [-1, 1]: the first n of the seeded shuffled stream (epoch 0,
    then the following epochs if n exceeds the dataset), unreadable files skipped — the reals for FID/KID, as
    k-diffusion takes them from its training loader."""
    model = config['model']
    source = make_source(config, split=split, seed=seed) if source is None else source
    layout = StreamLayout(len(source), 1, drop_remainder=False)
    examples = example_dataset(source, layout, seed=seed, size=model['input_size'],
                               channels=int(model['input_channels']), augment=None)
    threads = read_threads if read_threads is not None else min(4, os.cpu_count() or 1)
    stream = iter(SkipFailedIterDataset(examples.to_iter_dataset(
        grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(2, min(int(n), 64))))))
    images = [next(stream)['image_orig'] for _ in range(int(n))]
    h, w = (int(s) for s in model['input_size'])
    return np.stack(images) if images else np.zeros((0, h, w, int(model['input_channels'])), np.float32)
