"""Tests of ddpm_jax.data: sources (digits, TFDS under mock_data, image folder) and deterministic batching."""
import io
import os

import numpy as np
import pytest
from PIL import Image

from ddpm_jax import config_files, data, image_folder

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')


def _base_config(**data_overrides):
    """configs/default.py, with small digits settings unless overridden."""
    config = config_files.load_config_file(os.path.join(CONFIGS_DIR, 'default.py'))
    config.data.name = 'digits'
    config.data.image_size = 8
    config.data.channels = 1
    config.data.random_flip = True
    config.training.batch_size = 8
    config.data.update(data_overrides)
    return config


class _NumberedSource:
    """Fake source matching _base_config (8x8x1): image k is uint8 [8, 8, 1] with row 0 = k % 256,
    row 1 = k // 256 (flip-invariant rows that identify k) and the other rows 10*h + w + 2
    (asymmetric in w, so flips show)."""

    def __init__(self, num_images, size=8):
        self.num_images, self.size = num_images, size

    def __len__(self):
        return self.num_images

    def image(self, k):
        image = np.zeros((self.size, self.size, 1), np.uint8)
        image[0] = k % 256
        image[1] = k // 256
        h, w = np.meshgrid(np.arange(2, self.size), np.arange(self.size), indexing='ij')
        image[2:] = (10 * h + w + 2)[..., None]
        return image

    def __getitem__(self, indices):
        return np.stack([self.image(int(k)) for k in np.asarray(indices).reshape(-1)])


def _ids(batch):
    """Image ids of a float batch of _NumberedSource images."""
    uint8 = np.round((np.asarray(batch, np.float64) + 1.0) * 127.5).astype(np.int64)
    return uint8[:, 0, 0, 0] + 256 * uint8[:, 1, 0, 0]


def _take(iterator, count):
    return [next(iterator) for _ in range(count)]


# ---------------------------------------------------------------------------------------------
# Sources


def test_digits_source_matches_sklearn_scaled_to_uint8():
    from sklearn.datasets import load_digits
    reference = np.round(load_digits().images.astype(np.float64) * 255.0 / 16.0)  # [1797, 8, 8]
    train = data.load_source(_base_config(), 'train')
    test = data.load_source(_base_config(), 'test')
    everything = data.load_source(_base_config(), 'all')
    assert (len(train), len(test), len(everything)) == (1500, 297, 1797)
    images = everything[np.arange(1797)]
    assert images.shape == (1797, 8, 8, 1) and images.dtype == np.uint8
    assert images.min() == 0 and images.max() == 255
    np.testing.assert_array_equal(images[..., 0], reference)
    np.testing.assert_array_equal(test[np.array([0, 296])][..., 0], reference[[1500, 1796]])
    np.testing.assert_array_equal(train[np.array([3])][..., 0], reference[[3]])


def test_digits_are_read_without_importing_sklearn_and_equal_load_digits(monkeypatch):
    """The CSV read (no scikit-learn import) and the load_digits() fallback give the same array."""
    import subprocess
    import sys

    from sklearn.datasets import load_digits
    assert data.sklearn_digits_csv() is not None     # the file scikit-learn ships
    direct = data._digits_uint8()
    data._digits_uint8.cache_clear()
    monkeypatch.setattr(data, 'sklearn_digits_csv', lambda: None)
    try:
        fallback = data._digits_uint8()
    finally:
        data._digits_uint8.cache_clear()
    np.testing.assert_array_equal(direct, fallback)
    np.testing.assert_array_equal(direct, np.round(load_digits().images * 255.0 / 16.0))
    code = ('import sys; from ddpm_jax import data; data._digits_uint8(); '
            'print(sorted(m for m in sys.modules if m.split(".")[0] in ("sklearn", "scipy")))')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == '[]', out.stdout


def test_digits_source_resizes_to_image_size():
    source = data.load_source(_base_config(image_size=16), 'train')
    images = source[np.arange(5)]
    assert images.shape == (5, 16, 16, 1) and images.dtype == np.uint8
    # The bicubic upsampling keeps each digit's mean brightness (up to filter overshoot and rounding).
    original = data.load_source(_base_config(), 'train')[np.arange(5)].astype(np.float64)
    np.testing.assert_allclose(images.mean(axis=(1, 2, 3)), original.mean(axis=(1, 2, 3)), atol=6.0)


def test_digits_source_rejects_bad_split_and_channels():
    with pytest.raises(ValueError, match=r"'validation'.*allowed"):
        data.load_source(_base_config(), 'validation')
    with pytest.raises(ValueError, match='channels=1'):
        data.load_source(_base_config(channels=3), 'train')


def test_unknown_source_name_lists_allowed_names():
    with pytest.raises(ValueError, match=r"'mnist'.*digits.*folder.*cifar10.*celeb_a_hq.*lsun"):
        data.load_source(_base_config(name='mnist'), 'train')


def test_to_model_range_is_x_over_127_5_minus_1():
    x = np.arange(256, dtype=np.uint8)
    reference = x.astype(np.float64) / 127.5 - 1.0
    result = data.to_model_range(x)
    assert result.dtype == np.float32
    np.testing.assert_allclose(result, reference, rtol=0, atol=1.2e-7)  # float32 rounding of values in [-1, 1]
    assert result[0] == -1.0 and result[255] == 1.0


def _write_image(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def test_folder_source_sorted_recursive_cropped_and_resized(tmp_path):
    root = tmp_path / 'images'
    # 12 x 20 RGB: the central 12 x 12 square is (200, 100, 50), the side bands are black.
    wide = np.zeros((12, 20, 3), np.uint8)
    wide[:, 4:16] = (200, 100, 50)
    _write_image(str(root / 'train' / 'b' / 'wide.png'), wide)
    # 24 x 24 constant gray, saved as JPEG (a constant image survives JPEG and resizing exactly).
    _write_image(str(root / 'train' / 'a.jpg'), np.full((24, 24, 3), 90, np.uint8))
    # Already 12 x 12: read as is.
    exact = np.random.default_rng(0).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    _write_image(str(root / 'train' / 'c' / 'd' / 'exact.PNG'), exact)
    (root / 'train' / 'notes.txt').write_text('not an image')

    config = _base_config(name='folder', data_dir=str(root), image_size=12, channels=3)
    source = data.load_source(config, 'train')
    assert [os.path.relpath(p, root / 'train') for p in source.paths] == [
        'a.jpg', os.path.join('b', 'wide.png'), os.path.join('c', 'd', 'exact.PNG')]
    images = source[np.array([2, 0, 1])]
    assert images.shape == (3, 12, 12, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[0], exact)
    np.testing.assert_array_equal(images[1], np.full((12, 12, 3), 90))
    np.testing.assert_array_equal(images[2], np.broadcast_to(np.array([200, 100, 50]), (12, 12, 3)))

    gray = data.load_source(_base_config(name='folder', data_dir=str(root), image_size=6, channels=1), 'train')
    images = gray[np.array([0])]
    assert images.shape == (1, 6, 6, 1)
    np.testing.assert_array_equal(images, 90)  # L of an R = G = B image is that value


def test_folder_source_errors(tmp_path):
    with pytest.raises(ValueError, match='data_dir'):
        data.load_source(_base_config(name='folder', data_dir=''), 'train')
    with pytest.raises(FileNotFoundError, match='does not exist'):
        data.load_source(_base_config(name='folder', data_dir=str(tmp_path)), 'train')
    (tmp_path / 'train').mkdir()
    with pytest.raises(FileNotFoundError, match='No .png/.jpg/.jpeg files'):
        data.load_source(_base_config(name='folder', data_dir=str(tmp_path)), 'train')
    _write_image(str(tmp_path / 'train' / 'x.png'), np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match='channels=4'):
        data.load_source(_base_config(name='folder', data_dir=str(tmp_path), channels=4), 'train')


def _png_bytes(pixels: np.ndarray, color_type: int, size=None) -> bytes:
    """A PNG written here without PIL: uint8 or big-endian uint16 pixels [H, W] (color_type 0, gray) or
    [H, W, 3] (color_type 2, RGB), filter 0 on every row. `size` (width, height) overrides the IHDR size."""
    import struct
    import zlib
    height, width = pixels.shape[:2]
    width, height = size or (width, height)
    bit_depth = 8 * pixels.dtype.itemsize
    rows = pixels.astype(pixels.dtype.newbyteorder('>')).reshape(pixels.shape[0], -1)
    raw = b''.join(b'\x00' + row.tobytes() for row in rows)

    def chunk(kind, body):
        return struct.pack('>I', len(body)) + kind + body + struct.pack('>I', zlib.crc32(kind + body))

    header = struct.pack('>IIBBBBB', width, height, bit_depth, color_type, 0, 0, 0)
    return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', zlib.compress(raw))
            + chunk(b'IEND', b''))


def test_folder_source_scales_16_bit_images_to_8_bits(tmp_path):
    """16-bit gray (PIL mode I;16) and 16-bit RGB PNGs against round(v * 255 / 65535) in float64."""
    rng = np.random.default_rng(3)
    gray = rng.integers(0, 65536, (6, 6), dtype=np.uint16)
    gray.flat[:4] = (0, 65535, 128, 257 * 100 + 128)  # the ends and values just around a rounding boundary
    rgb = rng.integers(0, 65536, (6, 6, 3), dtype=np.uint16)
    (tmp_path / 'train').mkdir()
    (tmp_path / 'train' / 'a_gray16.png').write_bytes(_png_bytes(gray, color_type=0))
    (tmp_path / 'train' / 'b_rgb16.png').write_bytes(_png_bytes(rgb, color_type=2))
    with Image.open(tmp_path / 'train' / 'a_gray16.png') as image:
        assert image.mode.startswith('I')  # what PIL's convert('L') used to clip at 255
    expected_gray = np.round(gray.astype(np.float64) * 255 / 65535)
    expected_rgb = np.round(rgb.astype(np.float64) * 255 / 65535)

    gray_source = data.load_source(_base_config(name='folder', data_dir=str(tmp_path), image_size=6), 'train')
    np.testing.assert_array_equal(gray_source[[0]][0, ..., 0], expected_gray)
    rgb_source = data.load_source(_base_config(name='folder', data_dir=str(tmp_path), image_size=6, channels=3),
                                  'train')
    images = rgb_source[[0, 1]].astype(np.float64)
    np.testing.assert_array_equal(images[0], np.repeat(expected_gray[..., None], 3, axis=-1))
    # PIL decodes 16-bit RGB PNGs itself, keeping the high byte: floor(v / 256), at most 1 from the rounded scale.
    np.testing.assert_array_equal(images[1], rgb >> 8)
    assert np.abs(images[1] - expected_rgb).max() <= 1


def test_folder_source_follows_each_real_directory_once(tmp_path):
    root, outside = tmp_path / 'root', tmp_path / 'outside'
    _write_image(str(root / 'train' / 'a.png'), np.zeros((4, 4, 3), np.uint8))
    _write_image(str(root / 'train' / 'sub' / 'b.png'), np.zeros((4, 4, 3), np.uint8))
    _write_image(str(outside / 'c.png'), np.zeros((4, 4, 3), np.uint8))
    # A loop into itself (a second loop, e.g. sub/parent -> .., would make the old unguarded walk exponential).
    os.symlink('.', root / 'train' / 'loop')
    os.symlink(outside, root / 'train' / 'linked')       # a linked folder elsewhere: read
    os.symlink(root / 'train' / 'sub', root / 'train' / 'sub_again')  # a second name of sub: not read again
    source = data.load_source(_base_config(name='folder', data_dir=str(root), image_size=4, channels=3), 'train')
    assert [os.path.relpath(p, root / 'train') for p in source.paths] == [
        'a.png', os.path.join('linked', 'c.png'), os.path.join('sub', 'b.png')]


def test_folder_source_names_every_unreadable_file_at_start(tmp_path):
    rng = np.random.default_rng(4)
    train = tmp_path / 'train'
    _write_image(str(train / 'good.jpg'), rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    _write_image(str(train / 'good.png'), rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    jpeg, png = (train / 'good.jpg').read_bytes(), (train / 'good.png').read_bytes()
    (train / 'truncated.jpg').write_bytes(jpeg[:len(jpeg) // 2])
    (train / 'truncated.png').write_bytes(png[:len(png) // 2])
    (train / 'text.png').write_text('not an image')
    bmp = io.BytesIO()  # another format under a .png name: decoded in full
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(bmp, 'BMP')
    (train / 'bmp.png').write_bytes(bmp.getvalue()[:len(bmp.getvalue()) // 2])
    # 100000 x 100000 pixels declared in 70 bytes: PIL's decompression-bomb limit refuses it.
    (train / 'bomb.png').write_bytes(_png_bytes(np.zeros((1, 1), np.uint8), color_type=0, size=(100_000, 100_000)))
    with pytest.raises(image_folder.DataError) as error:
        data.load_source(_base_config(name='folder', data_dir=str(tmp_path), image_size=8, channels=3), 'train')
    message = str(error.value)
    assert message.startswith(f'5 of the 7 image files under {train} cannot be read')
    for name in ('truncated.jpg', 'truncated.png', 'text.png', 'bmp.png', 'bomb.png'):
        assert f'  {train / name}: ' in message, name
    assert 'good' not in message
    assert 'DecompressionBombError' in message


def test_folder_source_names_a_file_broken_during_training(tmp_path):
    _write_image(str(tmp_path / 'train' / 'a.png'), np.full((4, 4, 3), 7, np.uint8))
    _write_image(str(tmp_path / 'train' / 'b.png'), np.full((4, 4, 3), 9, np.uint8))
    config = _base_config(name='folder', data_dir=str(tmp_path), image_size=4, channels=3, random_flip=False)
    config.training.batch_size = 2
    source = data.load_source(config, 'train')
    (tmp_path / 'train' / 'b.png').write_bytes(b'overwritten after the scan')
    with pytest.raises(image_folder.DataError, match=f'Image file {tmp_path / "train" / "b.png"} cannot be read'):
        next(data.train_batches(config, source=source, process_index=0, process_count=1))


def test_tfds_sources_offline_under_mock_data(tmp_path):
    tfds = pytest.importorskip('tensorflow_datasets')
    cifar = _base_config(name='cifar10', tfds_name='cifar10', image_size=32, channels=3, data_dir=str(tmp_path))
    cifar.training.batch_size = 4
    with tfds.testing.mock_data(num_examples=6):
        source = data.load_source(cifar, 'train')
        assert len(source) == 6
        images = source[np.array([5, 0])]
        assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
        reference = tfds.data_source('cifar10', split='train')
        np.testing.assert_array_equal(images[1], reference[0]['image'])

        batch = next(data.train_batches(cifar, process_index=0, process_count=1))
        assert batch.shape == (4, 32, 32, 3) and batch.dtype == np.float32
        assert -1.0 <= batch.min() and batch.max() <= 1.0
        eval_images, mask = next(data.eval_batches(cifar, 'test', 4, process_index=0, process_count=1))
        assert eval_images.shape == (4, 32, 32, 3) and mask.all()

        # LSUN images have variable sizes: center-cropped and resized to image_size.
        lsun = _base_config(name='lsun/church', tfds_name='lsun/church_outdoor', image_size=16, channels=3)
        lsun_images = data.load_source(lsun, 'train')[np.arange(3)]
        assert lsun_images.shape == (3, 16, 16, 3) and lsun_images.dtype == np.uint8

        celeba = _base_config(name='celeb_a_hq', tfds_name='celeb_a_hq/256', image_size=32, channels=3)
        with pytest.raises(ValueError, match=r'256x256.*image_size=32'):
            data.load_source(celeba, 'train')
        with pytest.raises(ValueError, match='channels=1'):
            data.load_source(_base_config(name='cifar10', tfds_name='cifar10', image_size=32, channels=1), 'train')


def test_missing_tfds_dataset_says_how_to_prepare(tmp_path):
    pytest.importorskip('tensorflow_datasets')
    config = _base_config(name='cifar10', tfds_name='cifar10', image_size=32, channels=3, data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError) as error:
        data.load_source(config, 'train')
    message = str(error.value)
    assert f'tfds build cifar10 --file_format=array_record --data_dir={tmp_path}' in message
    assert str(tmp_path / 'cifar10') in message
    assert os.listdir(tmp_path) == []  # nothing was downloaded or created


def _write_tfds_array_record(root, images_by_split: dict, shards_by_split: dict) -> None:
    """A prepared TFDS 'cifar10' 3.0.2 dataset in array_record format under root, written without TensorFlow
    in the layout TFDS writes: dataset_info.json (splits, shard lengths, file format), features.json, and
    per split `cifar10-<split>.array_record-0000i-of-0000n` shards of serialized tf.train.Example records
    (TFDS's own proto; id text, PNG image bytes, int64 label; writer option group_size:1 as TFDS uses).
    Checked once against a fake CIFAR-10 written by TFDS 4.9 + TensorFlow 2 (download_and_prepare with
    file_format='array_record'): the same files and fields, and load_source read its images bit-exactly."""
    import io
    import json

    from array_record.python import array_record_module
    from tensorflow_datasets.proto import tf_example_pb2

    version_dir = root / 'cifar10' / '3.0.2'
    version_dir.mkdir(parents=True)
    splits = []
    for split, images in images_by_split.items():
        num_shards = shards_by_split[split]
        shards = np.array_split(np.arange(len(images)), num_shards)
        for shard_index, indices in enumerate(shards):
            path = version_dir / f'cifar10-{split}.array_record-{shard_index:05d}-of-{num_shards:05d}'
            writer = array_record_module.ArrayRecordWriter(str(path), 'group_size:1')
            for i in indices:
                png = io.BytesIO()
                Image.fromarray(images[i]).save(png, format='PNG')
                example = tf_example_pb2.Example()
                features = example.features.feature
                features['id'].bytes_list.value.append(f'{split}_{i:05d}'.encode())
                features['image'].bytes_list.value.append(png.getvalue())
                features['label'].int64_list.value.append(int(i % 10))
                writer.write(example.SerializeToString())
            writer.close()
        splits.append({'filepathTemplate': '{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}', 'name': split,
                       'shardLengths': [str(len(indices)) for indices in shards]})
    info = {'fileFormat': 'array_record', 'moduleName': 'tensorflow_datasets.image_classification.cifar',
            'name': 'cifar10', 'splits': splits, 'version': '3.0.2'}
    (version_dir / 'dataset_info.json').write_text(json.dumps(info))
    feature_classes = 'tensorflow_datasets.core.features.'
    features = {'featuresDict': {'features': {
        'id': {'pythonClassName': feature_classes + 'text_feature.Text', 'text': {}},
        'image': {'pythonClassName': feature_classes + 'image_feature.Image',
                  'image': {'dtype': 'uint8', 'shape': {'dimensions': ['32', '32', '3']}}},
        'label': {'pythonClassName': feature_classes + 'class_label_feature.ClassLabel',
                  'classLabel': {'numClasses': '10'}}}},
        'pythonClassName': feature_classes + 'features_dict.FeaturesDict'}
    (version_dir / 'features.json').write_text(json.dumps(features))


def test_tfds_array_record_dataset_read_without_tensorflow(tmp_path):
    # The real on-disk format (not mock_data, which bypasses files and PNG decoding): sharded array_record
    # files of PNG-encoded tf.train.Examples, opened by tfds.data_source and decoded without TensorFlow.
    rng = np.random.default_rng(3)
    train_images = rng.integers(0, 256, (11, 32, 32, 3), dtype=np.uint8)
    test_images = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    _write_tfds_array_record(tmp_path, {'train': train_images, 'test': test_images}, {'train': 3, 'test': 1})
    config = _base_config(name='cifar10', tfds_name='cifar10', image_size=32, channels=3, data_dir=str(tmp_path),
                          random_flip=False)

    train = data.load_source(config, 'train')
    assert len(train) == 11
    # Record order is shard order; PNG is lossless, so the pixels come back bit-exactly, across shard borders.
    np.testing.assert_array_equal(train[np.array([10, 0, 4, 3])], train_images[[10, 0, 4, 3]])
    np.testing.assert_array_equal(train[np.arange(11)], train_images)
    test = data.load_source(config, 'test')
    np.testing.assert_array_equal(test[np.arange(4)], test_images)

    # The training pipeline over it: every batch is a set of the stored images scaled to [-1, 1] (x/127.5 - 1).
    config.training.batch_size = 4
    batches = data.train_batches(config, process_index=0, process_count=1)
    reference = train_images.astype(np.float64) / 127.5 - 1.0
    for _ in range(3):
        batch = next(batches)
        assert batch.shape == (4, 32, 32, 3) and batch.dtype == np.float32
        for image in batch:
            distances = np.abs(reference - image).reshape(11, -1).max(axis=1)
            assert distances.min() < 1e-6, 'a batch image is none of the stored images'


# ---------------------------------------------------------------------------------------------
# Training batches


def test_train_batches_digits_shape_range_and_determinism():
    config = _base_config()
    first = _take(data.train_batches(config, process_index=0, process_count=1), 3)
    again = _take(data.train_batches(config, process_index=0, process_count=1), 3)
    assert first[0].shape == (8, 8, 8, 1) and first[0].dtype == np.float32
    assert all(-1.0 <= b.min() and b.max() <= 1.0 for b in first)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    config.seed = 1
    other = next(data.train_batches(config, process_index=0, process_count=1))
    assert not np.array_equal(first[0], other)


def test_train_batches_resume_and_host_slices_match_global_batch(monkeypatch):
    source = _NumberedSource(num_images=13)
    monkeypatch.setattr(data, 'load_source', lambda config, split: source)
    config = _base_config()
    config.training.batch_size = 6
    global_batches = _take(data.train_batches(config, process_index=0, process_count=1), 8)

    resumed = _take(data.train_batches(config, start_step=5, process_index=0, process_count=1), 3)
    for a, b in zip(resumed, global_batches[5:]):
        np.testing.assert_array_equal(a, b)

    hosts = [_take(data.train_batches(config, start_step=2, process_index=i, process_count=2), 6) for i in range(2)]
    for step in range(6):
        assert hosts[0][step].shape == (3, 8, 8, 1)
        np.testing.assert_array_equal(np.concatenate([hosts[0][step], hosts[1][step]]), global_batches[2 + step])
    three = [next(data.train_batches(config, start_step=7, process_index=i, process_count=3)) for i in range(3)]
    np.testing.assert_array_equal(np.concatenate(three), global_batches[7])


def test_train_batches_cover_each_epoch_exactly_once(monkeypatch):
    num_images, batch_size = 10, 4  # batches straddle epoch boundaries (steps 2 and 7)
    monkeypatch.setattr(data, 'load_source', lambda config, split: _NumberedSource(num_images))
    config = _base_config(random_flip=False)
    config.training.batch_size = batch_size
    ids = np.concatenate([_ids(b) for b in _take(data.train_batches(config, process_index=0, process_count=1), 10)])
    epochs = ids.reshape(4, num_images)
    for epoch in epochs:
        np.testing.assert_array_equal(np.sort(epoch), np.arange(num_images))
    assert len({tuple(epoch) for epoch in epochs}) == 4  # a fresh order each epoch
    assert not all(np.array_equal(epoch, np.arange(num_images)) for epoch in epochs)


def test_train_batches_flip_about_half_only_horizontally(monkeypatch):
    source = _NumberedSource(num_images=50)
    monkeypatch.setattr(data, 'load_source', lambda config, split: source)
    config = _base_config()
    config.training.batch_size = 40
    flipped = []
    for batch in _take(data.train_batches(config, process_index=0, process_count=1), 25):
        originals = data.to_model_range(source[_ids(batch)])
        is_flipped = np.array([np.array_equal(b, o[:, ::-1]) for b, o in zip(batch, originals)])
        is_same = np.array([np.array_equal(b, o) for b, o in zip(batch, originals)])
        assert np.all(is_flipped ^ is_same)  # each image is either untouched or mirrored left-right
        flipped.append(is_flipped)
    fraction = np.mean(flipped)
    # 1000 fair coin flips: standard deviation 0.0158; +-0.06 is about 4 sigma.
    assert abs(fraction - 0.5) < 0.06

    config.data.random_flip = False
    batch = next(data.train_batches(config, process_index=0, process_count=1))
    np.testing.assert_array_equal(batch, data.to_model_range(source[_ids(batch)]))


def test_train_batches_bad_batch_size_or_process_raises():
    config = _base_config()
    config.training.batch_size = 5
    with pytest.raises(ValueError, match=r'batch_size=5.*process count 2'):
        data.train_batches(config, process_index=0, process_count=2)
    config.training.batch_size = 4
    with pytest.raises(ValueError, match='process_index=2'):
        data.train_batches(config, process_index=2, process_count=2)
    with pytest.raises(ValueError, match='start_step=-1'):
        data.train_batches(config, start_step=-1, process_index=0, process_count=1)


def test_train_batches_default_to_this_jax_process():
    config = _base_config()
    np.testing.assert_array_equal(next(data.train_batches(config)),
                                  next(data.train_batches(config, process_index=0, process_count=1)))


# ---------------------------------------------------------------------------------------------
# Evaluation batches


def test_eval_batches_every_image_once_with_mask(monkeypatch):
    source = _NumberedSource(num_images=11)
    monkeypatch.setattr(data, 'load_source', lambda config, split: source)
    config = _base_config()
    per_host = [list(data.eval_batches(config, 'test', 4, process_index=i, process_count=2)) for i in range(2)]
    assert [len(batches) for batches in per_host] == [3, 3]
    ids = []
    for k in range(3):
        images = np.concatenate([per_host[0][k][0], per_host[1][k][0]])
        mask = np.concatenate([per_host[0][k][1], per_host[1][k][1]])
        assert images.shape == (4, 8, 8, 1) and images.dtype == np.float32 and mask.dtype == bool
        np.testing.assert_array_equal(mask, np.arange(4 * k, 4 * k + 4) < 11)
        np.testing.assert_array_equal(images[~mask], 0.0)
        np.testing.assert_array_equal(images[mask], data.to_model_range(source[np.arange(4 * k, 4 * k + 4)[mask]]))
        ids += list(_ids(images[mask]))
    assert ids == list(range(11))

    limited = list(data.eval_batches(config, 'test', 4, process_index=0, process_count=1, num_images=5))
    assert len(limited) == 2 and limited[1][1].tolist() == [True, False, False, False]
    with pytest.raises(ValueError, match=r'batch_size=6.*process count 4'):
        data.eval_batches(config, 'test', 6, process_index=0, process_count=4)
