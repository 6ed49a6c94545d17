"""FID/KID of a model's samples against a dataset's reals: images stay on the devices, only the [n, 2048] Inception
features come back to the host.

Sampling as k-diffusion's train.py evaluates: EMA model, dpmpp_2m, 50 Karras steps from σ_max
(`generate.sample_batches`' default). Reals: the first n
un-augmented training images of the seeded stream (`data.pipeline.make_eval_images`), their features computed once.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from ..generate import sample_batches
from ..training.sharding import replicate
from .inception import FIDFeatureExtractor, jit_extract_features
from .metrics import fid, kid

class FeatureSet:
    """Inception features of image batches sharded over a mesh's 'data' axis (global batch `batch_size`)."""

    def __init__(self, extractor: FIDFeatureExtractor, mesh: Mesh, batch_size: int):
        self.mesh = mesh
        self.batch_size = max(mesh.size, -(-batch_size // mesh.size) * mesh.size)  # a multiple of the devices
        self.batch_sharding = NamedSharding(mesh, P('data'))
        self.state = replicate(extractor.state, mesh)  # the weights on every device (of every host)
        self._features = jit_extract_features(extractor.graphdef, out_shardings=NamedSharding(mesh, P()))

    def of_batches(self, batches: Iterator[jax.Array], n: int, desc: str) -> np.ndarray:
        """Features [n, 2048] of the first n images of `batches` (each [batch_size, H, W, C], sharded)."""
        out, total = [], 0
        with tqdm(total=n, desc=desc, unit='img', disable=jax.process_index() != 0, leave=False) as bar:
            for images in batches:
                feats = np.asarray(self._features(self.state, images), np.float32)
                out.append(feats[:n - total])
                total += len(out[-1])
                bar.update(len(out[-1]))
                if total >= n:
                    break
        return np.concatenate(out)

    def of_array(self, images: np.ndarray, desc: str = 'reals features') -> np.ndarray:
        """Features of host images [n, H, W, C] in [−1, 1] (the same full array on every process)."""
        n = len(images)

        def batches():
            for start in range(0, n, self.batch_size):
                chunk = images[start:start + self.batch_size]
                if len(chunk) < self.batch_size:  # pad the last batch; the padding's features are dropped
                    chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch_size - len(chunk), 0)])
                chunk = np.ascontiguousarray(chunk, np.float32)
                yield jax.make_array_from_callback(chunk.shape, self.batch_sharding, lambda idx, c=chunk: c[idx])

        return self.of_batches(batches(), n, desc)


def dataset_images(config, n: int, *, folder: str | Path | None = None, dataset=None, seed: int = 0) -> np.ndarray:
    """Up to n un-augmented images [m, H, W, C] in [−1, 1] at `config`'s model.input_size and channels: the first of
    the seeded stream of the image `folder`, or of `dataset` (a config's dataset section; default config's), training
    split; m = min(n, dataset size), as k-diffusion's feature loop ends with its loader's epoch."""
    from ..data.pipeline import make_eval_images
    from ..data.sources import ImageFolderSource, make_source
    if folder is not None:
        source = ImageFolderSource(str(folder))
    else:
        source = make_source({'dataset': config['dataset'] if dataset is None else dataset}, seed=seed)
    return make_eval_images(config, min(int(n), len(source)), seed=seed, source=source)


def check_samples_folder(folder: str | Path) -> None:
    """Raise DatasetError unless every readable image under `folder` has one size. Samples of one model do; a
    folder that also holds sample.py's --grid or --video files (or any other picture) would otherwise have those
    resized and counted as samples. Unreadable files are left to the loader, which skips and counts them."""
    from collections import Counter

    from PIL import Image

    from ..data.sources import DatasetError, ImageFolderSource
    sizes = {}
    for path in ImageFolderSource(str(folder)).paths:
        try:
            with Image.open(path) as image:
                sizes[path] = image.size
        except (OSError, ValueError):
            continue
    counts = Counter(sizes.values())
    if len(counts) > 1:
        common = counts.most_common(1)[0][0]
        odd = sorted(path for path, size in sizes.items() if size != common)
        listed = ', '.join(f'{w}x{h}: {k}' for (w, h), k in counts.most_common())
        raise DatasetError(f'--samples {folder}: its images are not all one size ({listed}; e.g. {odd[0]} is '
                           f'{sizes[odd[0]][0]}x{sizes[odd[0]][1]}). Point --samples at a folder that holds only '
                           'samples: sample.py writes its --grid and --video files beside them; move those out.')


def fid_kid(fake_features: np.ndarray, real_features: np.ndarray) -> dict[str, float]:
    return {'fid': fid(fake_features, real_features), 'kid': kid(fake_features, real_features)}


class TrainingEvaluator:
    """FID/KID of EMA samples against the cached reals' features, for train.py's --evaluate-every."""

    def __init__(self, features: FeatureSet, real_images: np.ndarray, config, n: int):
        self.features, self.config, self.n = features, config, n
        self.real_features = features.of_array(real_images, desc='reals features (once per run)')

    def __call__(self, denoiser, step: int) -> dict[str, float]:
        batches = sample_batches(denoiser, self.config, self.features.batch_size, self.features.mesh,
                                 seed=step % 2 ** 32)
        fakes = self.features.of_batches(batches, self.n, desc=f'evaluating step {step}')
        return fid_kid(fakes, self.real_features)
