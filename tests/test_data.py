"""Data pipeline: Karras augmentation parity with k-diffusion 0.0.15, sources, skipping, sharding, resumable state.

All fixtures are tiny images written to tmp dirs at test time; nothing touches the network.
"""

from __future__ import annotations

import io
import json
import logging
import random
import sys
import time
import types

import numpy as np
import pytest
from PIL import Image

from kdiff_jax.config import load_config
from kdiff_jax.data import augmentation as A
from kdiff_jax.data.pipeline import StreamLayout, make_eval_images, make_train_iterator
from kdiff_jax.data.sources import (ArraySource, CarsSource, DatasetError, ImageFolderSource, make_source,
                                    pil_extensions)
from kdiff_jax.data.transforms import resize_center_crop, to_model_array

# ----------------------------------------------------------------------------------------------------------------
# helpers


def _config(dataset: dict, *, size=(8, 8), channels=3, augment=False, a_prob=0.0):
    return load_config({
        'model': {'type': 'image_v1', 'input_channels': channels, 'input_size': list(size), 'mapping_out': 8,
                  'depths': [1], 'channels': [8], 'self_attn_depths': [False], 'augment_wrapper': augment,
                  'augment_prob': a_prob},
        'dataset': dataset,
    })


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert sorted(x) == sorted(y)
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def _coded_source(n: int, size: int = 4) -> ArraySource:
    """n tiny RGB images whose pixel (0, 0) red value is the item's index (so any output names its item)."""
    images = np.zeros((n, size, size, 3), np.uint8)
    images[:, :, :, 0] = np.arange(n, dtype=np.uint8)[:, None, None]
    images[:, :, :, 1] = 200
    return ArraySource(images, name='coded')


def _code_of(image):
    """Decode the red value of _coded_source images back from [-1, 1]."""
    return np.rint((image[..., 0].mean(axis=(-1, -2)) + 1) / 2 * 255).astype(int)


# ----------------------------------------------------------------------------------------------------------------
# augmentation vs k-diffusion's KarrasAugmentationPipeline


def _astronaut(size):
    import skimage.data
    return np.asarray(Image.fromarray(skimage.data.astronaut()).resize(size[::-1], Image.LANCZOS))


def _run_oracle(monkeypatch, image_uint8, draws, a_prob):
    """k-diffusion's pipeline on `image_uint8` with torch.randint/rand/randn replaced by `draws` (checked to be called
    in DRAW_KINDS order); returns (image HWC, image_orig HWC, aug_cond, the affine matrix it warped with)."""
    torch = pytest.importorskip('torch')
    from skimage import transform
    from tests.oracle import import_k_diffusion
    K = import_k_diffusion()
    queue = list(zip(A.DRAW_KINDS, draws))
    calls = []

    def fake(kind):
        def draw(*args, **kwargs):
            expected, value = queue.pop(0)
            calls.append(kind)
            assert kind == expected, f'k-diffusion drew {kind} where {expected} was expected'
            if kind == 'randint':
                return torch.tensor(int(value))
            return torch.tensor(float(value), dtype=torch.float32)
        return draw

    matrices = []
    real_affine = transform.AffineTransform

    def recording_affine(matrix, *args, **kwargs):
        matrices.append(np.array(matrix))
        return real_affine(matrix, *args, **kwargs)

    with monkeypatch.context() as m:
        for kind in ('randint', 'rand', 'randn'):
            m.setattr(torch, kind, fake(kind))
        m.setattr(transform, 'AffineTransform', recording_affine)
        image, image_orig, cond = K.augmentation.KarrasAugmentationPipeline(a_prob)(Image.fromarray(image_uint8))
    assert not queue and len(calls) == A.N_DRAWS
    hwc = lambda t: t.movedim(0, 2).numpy().astype(np.float32)  # noqa: E731
    return hwc(image), hwc(image_orig), cond.numpy(), matrices[0]


CASES = [(seed, a_prob, shape) for seed in range(6) for a_prob in (1.0, 0.12)
         for shape in ((16, 16, 3), (12, 20), (20, 12, 3))]


@pytest.mark.parametrize('seed,a_prob,shape', CASES)
def test_augmentation_matches_k_diffusion(monkeypatch, seed, a_prob, shape):
    rng = np.random.default_rng(seed)
    image = _astronaut(shape[:2])
    image = image if len(shape) == 3 else np.asarray(Image.fromarray(image).convert('L'))
    if seed % 2:  # every other case on noise: the largest gradients
        image = rng.integers(0, 256, image.shape, dtype=np.uint8)
    draws = A.draw_augmentation(rng)
    o_image, o_orig, o_cond, o_mat = _run_oracle(monkeypatch, image, draws, a_prob)
    image_aug, image_orig, cond = A.apply_augmentation(image, draws, a_prob=a_prob)

    assert image_aug.dtype == image_orig.dtype == cond.dtype == np.float32
    assert image_aug.shape == image_orig.shape == o_image.shape
    np.testing.assert_array_equal(image_orig, o_orig)
    # aug_cond: the draws exactly; cos/sin to float32 rounding (torch's SLEEF and libm differ in the last bit).
    np.testing.assert_array_equal(cond[[0, 1, 2, 7, 8]], o_cond[[0, 1, 2, 7, 8]])
    np.testing.assert_allclose(cond, o_cond, rtol=0, atol=2.5e-7)
    # The affine matrix to float32 rounding, and the warp bit for bit given k-diffusion's own matrix.
    mat = A.augmentation_matrix(A.augmentation_values(draws, a_prob), *image_orig.shape[:2])
    np.testing.assert_allclose(mat, o_mat, rtol=0, atol=4e-6)
    np.testing.assert_allclose(A.warp_image((image_orig + 1) / 2, o_mat) * 2 - 1, o_image, rtol=0, atol=1e-6)
    # End to end. A last-bit difference in cos/sin moves sample points by ~1e-6 px, i.e. <= ~1.3e-5 on noise.
    np.testing.assert_allclose(image_aug, o_image, rtol=0, atol=2e-5)
    if seed % 2 == 0:
        np.testing.assert_allclose(image_aug, o_image, rtol=0, atol=1e-5)


@pytest.mark.parametrize('xflip', [0, 1])
def test_augmentation_flip_only_fast_path_matches_warp(monkeypatch, xflip):
    """Every gated transform off (their 'do' draws above a_prob): the pure flip/identity path, no warp."""
    draws = np.array([xflip, .9, 1, .9, 1.5, .9, .3, .9, .7, -.4, .9, .2, -.6], np.float32)
    image = np.random.default_rng(3).integers(0, 256, (10, 14, 3), dtype=np.uint8)
    o_image, o_orig, o_cond, _ = _run_oracle(monkeypatch, image, draws, 0.12)
    image_aug, image_orig, cond = A.apply_augmentation(image, draws, a_prob=0.12)
    np.testing.assert_array_equal(cond, np.array([xflip, 0, 0, 0, 0, 0, 0, 0, 0], np.float32))
    np.testing.assert_array_equal(cond, o_cond)
    np.testing.assert_allclose(image_aug, o_image, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(image_aug, image_orig[:, ::-1] if xflip else image_orig)


def test_draws_have_k_diffusions_distributions():
    draws = np.stack([A.draw_augmentation(np.random.default_rng(s)) for s in range(400)])
    kinds = np.array(A.DRAW_KINDS)
    ints = draws[:, kinds == 'randint']
    assert set(np.unique(ints)) == {0.0, 1.0}
    uniform = draws[:, kinds == 'rand']
    assert uniform.min() >= 0 and uniform.max() < 1 and abs(uniform.mean() - 0.5) < 0.03
    normal = draws[:, kinds == 'randn']
    assert abs(normal.mean()) < 0.1 and abs(normal.std() - 1) < 0.1


def test_a_prob_zero_only_flips():
    image = np.random.default_rng(0).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    aug = A.KarrasAugment(a_prob=0.0)
    flips = set()
    for s in range(16):
        out, orig, cond = aug(image, np.random.default_rng(s))
        assert not cond[1:].any()
        flips.add(float(cond[0]))
        np.testing.assert_array_equal(out, orig[:, ::-1] if cond[0] else orig)
    assert flips == {0.0, 1.0}


# ----------------------------------------------------------------------------------------------------------------
# resize + crop


def test_resize_center_crop_follows_torchvision_rules():
    stripes = np.zeros((10, 30, 3), np.uint8)
    stripes[:, 10:20] = 255
    out = np.asarray(resize_center_crop(Image.fromarray(stripes), (10, 10)))  # no resize: crop the middle stripe
    assert out.shape == (10, 10, 3) and (out == 255).all()
    tall = Image.new('RGB', (20, 50))
    resized = resize_center_crop(tall, (8, 8))
    assert resized.size == (8, 8)
    from kdiff_jax.data.transforms import resized_size
    assert resized_size(20, 50, (8, 8)) == (8, int(8 * 50 / 20))  # shorter side -> 8, longer int(8 * 50 / 20)
    assert resized_size(50, 20, (8, 8)) == (int(8 * 50 / 20), 8)
    gray = to_model_array(Image.new('RGB', (12, 12), (10, 200, 30)), (6, 6), 1)
    assert gray.shape == (6, 6, 1) and gray.dtype == np.uint8
    with pytest.raises(ValueError, match='input_channels'):
        to_model_array(Image.new('RGB', (4, 4)), (4, 4), 2)


# ----------------------------------------------------------------------------------------------------------------
# imagefolder


def _save(path, array, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt)


def test_imagefolder_recursive_any_format(tmp_path):
    colours = {}
    files = {'a.png': 'PNG', 'sub/b.jpg': 'JPEG', 'sub/deeper/c.bmp': 'BMP', 'sub/deeper/d.TIFF': 'TIFF',
             'e.gif': 'GIF', 'x/y/z/f.webp': 'WEBP', 'g.ppm': 'PPM'}
    for i, (name, fmt) in enumerate(files.items()):
        colour = (20 + 30 * i, 100, 200 - 20 * i)
        colours[name] = colour
        _save(tmp_path / name, np.full((12, 16, 3), colour, np.uint8), fmt)
    _save(tmp_path / '.hidden' / 'h.png', np.zeros((4, 4, 3), np.uint8))
    _save(tmp_path / '.dotfile.png', np.zeros((4, 4, 3), np.uint8))
    (tmp_path / 'notes.txt').write_text('not an image')
    assert {'.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.gif', '.webp', '.ppm'} <= pil_extensions()

    source = ImageFolderSource(tmp_path)
    expected = sorted(tmp_path / name for name in files)
    assert source.paths == [str(p) for p in expected]

    config = _config({'type': 'imagefolder', 'location': str(tmp_path)}, size=(6, 6))
    batch = next(make_train_iterator(config, batch_size=len(files), seed=0, shard_index=0, shard_count=1))
    assert batch['image'].shape == (len(files), 6, 6, 3)
    assert sorted(batch['index']) == list(range(len(files)))
    for image, index in zip(batch['image_orig'], batch['index']):
        name = str(expected[index].relative_to(tmp_path))
        want = np.array(colours[name], np.float32) / 255 * 2 - 1
        tol = 0.05 if files[name] in ('JPEG', 'WEBP', 'GIF') else 1e-6
        np.testing.assert_allclose(image.mean(axis=(0, 1)), want, atol=tol, err_msg=name)
    np.testing.assert_array_equal(batch['image'], batch['image_orig'])  # no augment_wrapper: no augmentation
    assert not batch['aug_cond'].any()

    gray = _config({'type': 'imagefolder', 'location': str(tmp_path)}, size=(6, 6), channels=1)
    assert next(make_train_iterator(gray, batch_size=2, seed=0, shard_index=0, shard_count=1))['image'].shape \
        == (2, 6, 6, 1)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DatasetError, match='no images found'):
        ImageFolderSource(tmp_path)
    with pytest.raises(DatasetError, match='not a directory'):
        ImageFolderSource(tmp_path / 'missing')
    with pytest.raises(DatasetError, match='needs dataset.location'):
        make_source(_config({'type': 'imagefolder'}))


def test_corrupt_images_skipped_counted_logged(tmp_path, caplog):
    for i in range(6):
        _save(tmp_path / f'good{i}.png', np.full((8, 8, 3), 40 * i, np.uint8))
    (tmp_path / 'garbage.png').write_bytes(b'this is not a png at all')
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8) + 90).save(buffer, 'PNG')
    (tmp_path / 'sub').mkdir()
    (tmp_path / 'sub' / 'truncated.png').write_bytes(buffer.getvalue()[:60])
    config = _config({'type': 'imagefolder', 'location': str(tmp_path)}, size=(4, 4), augment=True, a_prob=0.5)

    caplog.set_level(logging.WARNING, logger='kdiff_jax.data')
    it = make_train_iterator(config, batch_size=3, seed=1, shard_index=0, shard_count=1, drop_remainder=False)
    batches = _take(it, 5)  # 15 good images: all of epochs 0 and 1 (8 files each, 6 readable) have been read
    for batch in batches:
        assert batch['image'].shape == (3, 4, 4, 3) and batch['aug_cond'].shape == (3, 9)
        assert np.isfinite(batch['image']).all()
    bad = {str(tmp_path / 'garbage.png'), str(tmp_path / 'sub' / 'truncated.png')}
    good_indices = {i for i, p in enumerate(it.source.paths) if p not in bad}
    assert {int(i) for b in batches for i in b['index']} <= good_indices
    assert it.skipped >= 4  # both bad files, in each of the two epochs
    logged = ' '.join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert all(path in logged for path in bad)
    assert json.loads(json.dumps(it.get_state()))['skipped'] == it.skipped


def test_all_unreadable_raises_instead_of_spinning(tmp_path):
    for i in range(3):
        (tmp_path / f'bad{i}.png').write_bytes(b'nope')
    config = _config({'type': 'imagefolder', 'location': str(tmp_path)}, size=(4, 4))
    from kdiff_jax.data import pipeline
    pipeline_limit = pipeline._MAX_CONSECUTIVE_FAILURES
    try:
        pipeline._MAX_CONSECUTIVE_FAILURES = 20
        logging.getLogger('kdiff_jax.data').disabled = True
        with pytest.raises(RuntimeError, match='in a row could not be read'):
            next(make_train_iterator(config, batch_size=1, seed=0, shard_index=0, shard_count=1,
                                     drop_remainder=False))
    finally:
        pipeline._MAX_CONSECUTIVE_FAILURES = pipeline_limit
        logging.getLogger('kdiff_jax.data').disabled = False


# ----------------------------------------------------------------------------------------------------------------
# SRN cars


def _make_cars(root, n_cars=10, n_views=3):
    """Car i, view v: a solid colour (10 + 20 i, 40 + 80 v, 7)."""
    ids = [f'car{i:02d}_{"abcdefghij"[i % 10]}' for i in range(n_cars)]
    for i, car in enumerate(ids):
        for v in range(n_views):
            _save(root / car / 'rgb' / f'{v:06d}.png', np.full((8, 8, 3), (10 + 20 * i, 40 + 80 * v, 7), np.uint8))
        (root / car / 'pose').mkdir()
    return ids


def _car_view(image):
    r, g = (np.rint((image.mean(axis=(0, 1))[:2] + 1) / 2 * 255)).astype(int)
    return (r - 10) // 20, (g - 40) // 80


def test_cars_split_is_the_forks(tmp_path):
    ids = _make_cars(tmp_path)
    (tmp_path / 'not_a_car').mkdir()
    shuffled = sorted(ids)
    random.seed(0)  # the cars fork: random.seed(0); random.shuffle(sorted ids); 90 % train
    random.shuffle(shuffled)
    train, val = CarsSource(tmp_path, split='train'), CarsSource(tmp_path, split='val')
    assert train.car_ids == shuffled[:9] and val.car_ids == shuffled[9:]
    assert len(train) == 9 and len(val) == 1 and not set(train.car_ids) & set(val.car_ids)
    assert train.views[0] == ['000000.png', '000001.png', '000002.png']
    with pytest.raises(DatasetError, match='no cars found'):
        CarsSource(tmp_path / 'not_a_car')


@pytest.mark.parametrize('kind', ['srn_cars', 'cars'])
def test_cars_one_view_per_car_per_epoch(tmp_path, kind):
    _make_cars(tmp_path)
    config = _config({'type': kind, 'location': str(tmp_path)}, size=(4, 4))
    it = make_train_iterator(config, batch_size=3, seed=5, shard_index=0, shard_count=1)
    source = it.source
    car_number = {car: int(car[3:5]) for car in source.car_ids}
    views_by_epoch = []
    for epoch in range(4):
        batches = _take(it, 3)  # 9 train cars / 3 = one epoch
        images = np.concatenate([b['image_orig'] for b in batches])
        indices = np.concatenate([b['index'] for b in batches])
        assert (np.concatenate([b['epoch'] for b in batches]) == epoch).all()
        assert sorted(indices) == list(range(9))  # every car once
        views = {}
        for image, index in zip(images, indices):
            car, view = _car_view(image)
            assert car == car_number[source.car_ids[index]]
            assert source.view(index, epoch) == f'{view:06d}.png'
            views[int(index)] = view
        views_by_epoch.append(views)
    assert len({tuple(sorted(v.items())) for v in views_by_epoch}) > 1  # the views change across epochs
    assert len({v for views in views_by_epoch for v in views.values()}) == 3
    again = make_train_iterator(config, batch_size=3, seed=5, shard_index=0, shard_count=1)
    _assert_batches_equal(_take(again, 3), _take(make_train_iterator(config, batch_size=3, seed=5,
                                                                      shard_index=0, shard_count=1), 3))
    other = _take(make_train_iterator(config, batch_size=3, seed=6, shard_index=0, shard_count=1), 6)
    mine = _take(make_train_iterator(config, batch_size=3, seed=5, shard_index=0, shard_count=1), 6)
    assert not all(np.array_equal(a['image'], b['image']) for a, b in zip(mine, other))


# ----------------------------------------------------------------------------------------------------------------
# digits, tfds, huggingface


@pytest.mark.parametrize('channels', [1, 3])
def test_digits_offline(channels):
    from sklearn.datasets import load_digits
    digits = load_digits().images
    config = _config({'type': 'digits'}, size=(16, 16), channels=channels)
    assert len(make_source(config)) == 1797
    batch = next(make_train_iterator(config, batch_size=4, seed=0, shard_index=0, shard_count=1))
    assert batch['image'].shape == (4, 16, 16, channels) and batch['image'].dtype == np.float32
    assert batch['image'].min() >= -1 and batch['image'].max() <= 1 and batch['image'].max() > 0.5
    for image, index in zip(batch['image_orig'], batch['index']):
        small = Image.fromarray(np.round(digits[index] * 255 / 16).astype(np.uint8))
        want = np.asarray(small.resize((16, 16), Image.LANCZOS), np.float32) / 255 * 2 - 1
        for c in range(channels):
            np.testing.assert_allclose(image[..., c], want, atol=1e-6)


def test_tfds_absent_raises_clear_error_fast(tmp_path, monkeypatch):
    monkeypatch.delenv('TFDS_DATA_DIR', raising=False)
    for name in ('mnist', 'cifar10'):
        start = time.perf_counter()
        with pytest.raises(DatasetError) as error:
            make_train_iterator(_config({'type': name, 'location': str(tmp_path)}, channels=1), batch_size=2,
                                seed=0, shard_index=0, shard_count=1)
        assert time.perf_counter() - start < 5
        message = str(error.value)
        assert f'tfds build {name} --data_dir {tmp_path} --file_format array_record' in message
        assert 'never downloads' in message
    assert list(tmp_path.iterdir()) == []  # nothing created


def _build_fake_mnist(data_dir, n=12):
    """A tiny 'mnist' prepared offline as array_record (PNG bytes encoded by PIL: no TensorFlow)."""
    tfds = pytest.importorskip('tensorflow_datasets')
    images = np.random.default_rng(0).integers(0, 256, (n, 28, 28), dtype=np.uint8)

    class Mnist(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version('3.0.1')

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                'image': tfds.features.Image(shape=(28, 28, 1)), 'label': tfds.features.ClassLabel(num_classes=10)}))

        def _split_generators(self, dl_manager):
            return {'train': self._generate_examples()}

        def _generate_examples(self):
            for i, image in enumerate(images):
                buffer = io.BytesIO()
                Image.fromarray(image).save(buffer, 'PNG')
                yield i, {'image': buffer.getvalue(), 'label': i % 10}

    Mnist(data_dir=str(data_dir), file_format='array_record').download_and_prepare()
    return images


def test_tfds_prepared_mnist_reads_offline(tmp_path):
    images = _build_fake_mnist(tmp_path)
    config = _config({'type': 'mnist', 'location': str(tmp_path)}, size=(28, 28), channels=1)
    batch = next(make_train_iterator(config, batch_size=4, seed=0, shard_index=0, shard_count=1))
    assert batch['image'].shape == (4, 28, 28, 1)
    expected = images / np.float32(255) * 2 - 1  # tfds stores examples in its own (hashed) order
    found = [int(np.flatnonzero((abs(expected - image[..., 0]) < 1e-6).all(axis=(1, 2)))[0])
             for image in batch['image_orig']]
    assert len(set(found)) == 4


def test_huggingface(monkeypatch):
    if 'datasets' not in sys.modules:
        try:
            import datasets  # noqa: F401
        except ImportError:
            with pytest.raises(DatasetError, match='pip install datasets'):
                make_source(_config({'type': 'huggingface', 'location': 'someone/cars'}))
    images = [Image.new('RGB', (10, 6), (i * 40, 0, 0)) for i in range(5)]

    class FakeDataset:
        column_names = ['img', 'label']

        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return {'img': images[i], 'label': i}

    calls = []
    fake = types.ModuleType('datasets')
    fake.load_dataset = lambda location, split: calls.append((location, split)) or FakeDataset()
    monkeypatch.setitem(sys.modules, 'datasets', fake)
    with pytest.raises(DatasetError, match="image_key 'image'.*img, label"):
        make_source(_config({'type': 'huggingface', 'location': 'someone/cars'}))
    config = _config({'type': 'huggingface', 'location': 'someone/cars', 'image_key': 'img'}, size=(4, 4))
    batch = next(make_train_iterator(config, batch_size=5, seed=0, shard_index=0, shard_count=1))
    assert calls[-1] == ('someone/cars', 'train')
    np.testing.assert_allclose(batch['image_orig'][..., 0].mean(axis=(1, 2)), batch['index'] * 40 / 255 * 2 - 1,
                               atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# sharding, determinism, state


def test_per_host_shards_are_disjoint_and_cover_the_epoch():
    config = _config({'type': 'digits'}, size=(4, 4))
    source = _coded_source(24)
    kw = dict(batch_size=3, seed=7, shard_count=2, source=source)
    shards = [_take(make_train_iterator(config, shard_index=h, **kw), 8) for h in range(2)]  # 2 epochs
    single = _take(make_train_iterator(config, batch_size=6, seed=7, shard_index=0, shard_count=1, source=source), 8)
    for epoch in range(2):
        per_host = [{int(i) for b in shards[h][4 * epoch:4 * epoch + 4] for i in b['index']} for h in range(2)]
        assert not per_host[0] & per_host[1]
        assert per_host[0] | per_host[1] == set(range(24))
    for k in range(8):  # host batches, concatenated in host order, are the single-host global batch
        for key in ('image', 'index', 'epoch'):
            np.testing.assert_array_equal(np.concatenate([shards[0][k][key], shards[1][k][key]]), single[k][key])
    codes = np.concatenate([_code_of(b['image_orig']) for b in single])
    np.testing.assert_array_equal(codes, np.concatenate([b['index'] for b in single]))
    epoch0, epoch1 = (np.concatenate([b['index'] for b in single[4 * e:4 * e + 4]]) for e in range(2))
    assert not np.array_equal(epoch0, epoch1)  # reshuffled every epoch


def test_stream_layout_drop_remainder():
    kept = StreamLayout(10, 3, drop_remainder=True)
    assert kept.batches_per_epoch == 3
    assert [kept.locate(i) for i in range(10)] == [(0, p) for p in range(9)] + [(1, 0)]  # item 9 dropped in epoch 0
    full = StreamLayout(10, 3, drop_remainder=False)
    assert [full.locate(i) for i in range(12)] == [(0, p) for p in range(10)] + [(1, 0), (1, 1)]
    with pytest.raises(ValueError, match='fewer than one global batch'):
        StreamLayout(5, 3, shard_count=2)


def test_deterministic_given_seed():
    config = _config({'type': 'digits'}, size=(8, 8), augment=True, a_prob=1.0)
    source = _coded_source(20, size=8)
    make = lambda seed: make_train_iterator(config, batch_size=4, seed=seed, shard_index=0,  # noqa: E731
                                            shard_count=1, source=source)
    first = _take(make(3), 3)
    _assert_batches_equal(first, _take(make(3), 3))
    other = _take(make(4), 3)
    assert not np.array_equal(first[0]['index'], other[0]['index'])
    assert not np.array_equal(first[0]['aug_cond'], other[0]['aug_cond'])
    assert first[0]['aug_cond'][:, 1:].any()  # a_prob 1: the gated transforms are on


@pytest.mark.parametrize('num_workers', [0, 2])
def test_state_restore_continues_with_the_next_batch(num_workers):
    config = _config({'type': 'digits'}, size=(8, 8), augment=True, a_prob=0.5)
    source = _coded_source(14, size=8)
    kw = dict(batch_size=4, seed=11, shard_index=0, shard_count=1, source=source)
    it = make_train_iterator(config, num_workers=num_workers, **kw)
    _take(it, 3)  # into the second epoch (3 batches per epoch)
    state = json.loads(json.dumps(it.get_state()))
    expected = _take(it, 4)
    if num_workers:
        it.set_state(state)  # rewinds the worker processes
        _assert_batches_equal(_take(it, 4), expected)
        it.close()
    # A fresh iterator (a resumed run). From a worker state into an in-process iterator this goes through the
    # layout-independent path: batches are assembled in the main process, so they do not depend on the workers.
    resumed = make_train_iterator(config, num_workers=0, **kw)
    resumed.set_state(state)
    _assert_batches_equal(_take(resumed, 4), expected)
    assert resumed.batches == (4 if num_workers else 3 + 4)


def test_state_from_another_host_layout_resumes_at_the_next_global_batch():
    config = _config({'type': 'digits'}, size=(4, 4))
    source = _coded_source(24)
    two_hosts = make_train_iterator(config, batch_size=3, seed=2, shard_index=0, shard_count=2, source=source)
    _take(two_hosts, 5)
    state = two_hosts.get_state()
    one_host = make_train_iterator(config, batch_size=6, seed=2, shard_index=0, shard_count=1, source=source)
    reference = _take(make_train_iterator(config, batch_size=6, seed=2, shard_index=0, shard_count=1,
                                          source=source), 7)
    one_host.set_state(state)
    _assert_batches_equal(_take(one_host, 2), reference[5:7])
    host1 = make_train_iterator(config, batch_size=3, seed=2, shard_index=1, shard_count=2, source=source)
    host1.set_state(state)  # only host 0's state was saved
    np.testing.assert_array_equal(next(host1)['index'], reference[5]['index'][3:])


def test_state_from_other_data_settings_starts_the_next_epoch(caplog):
    config = _config({'type': 'digits'}, size=(4, 4))
    source = _coded_source(12)
    it = make_train_iterator(config, batch_size=4, seed=0, shard_index=0, shard_count=1, source=source)
    _take(it, 4)  # epoch 1
    other = make_train_iterator(config, batch_size=2, seed=1, shard_index=0, shard_count=1, source=source)
    with caplog.at_level(logging.WARNING, logger='kdiff_jax.data'):
        other.set_state(it.get_state())
    assert 'seed' in caplog.text
    assert (next(other)['epoch'] == 2).all()
    with pytest.raises(ValueError, match='not a kdiff_jax data iterator state'):
        other.set_state({'next_index': 3})


def test_eval_images_are_unaugmented():
    config = _config({'type': 'digits'}, size=(8, 8), augment=True, a_prob=1.0)
    source = _coded_source(5, size=8)
    images = make_eval_images(config, 7, source=source)
    assert images.shape == (7, 8, 8, 3) and images.dtype == np.float32
    codes = _code_of(images)
    assert sorted(codes[:5]) == list(range(5))  # one epoch, then the next
    for image, code in zip(images, codes):
        np.testing.assert_array_equal(image, source.images[code] / np.float32(255) * 2 - 1)
    assert make_eval_images(_config({'type': 'digits'}, size=(8, 8)), 3).shape == (3, 8, 8, 3)
