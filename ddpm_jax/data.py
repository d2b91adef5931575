"""Image sources and deterministic, host-sharded numpy batches for training and evaluation.

Three kinds of source, picked by `config.data.name`, each random-access (`len(source)` and
`source[indices]` -> uint8 [n, H, W, C] with H = W = config.data.image_size, C = config.data.channels):

* `'digits'`: the 1,797 8x8 grayscale handwritten digits bundled with scikit-learn (no download).
  Pixel values 0..16 become uint8 round(v * 255 / 16). With image_size 8 the images are used as
  they are; any other image_size resizes them bicubically (an upsampled digit keeps its shape and
  gives the U-Net room to downsample). C must be 1. Splits, fixed: 'train' = images 0..1499,
  'test' = images 1500..1796 (disjoint), 'all' = all 1,797.
* TFDS (`'cifar10'`, `'celeb_a_hq'`, `'lsun/<anything>'`): `tfds.data_source(config.data.tfds_name)`
  over a prepared array_record dataset in config.data.data_dir (or the TFDS default dir when it is
  ''), decoded with pillow, without TensorFlow. A fixed image shape in the dataset must equal
  (image_size, image_size, channels); variable-size images (LSUN) are center-cropped to a square
  and resized with Lanczos filtering, as StyleGAN's LSUN preparation does.
* `'folder'`: every *.png / *.jpg / *.jpeg under config.data.data_dir/<split>/ (recursively,
  sorted by relative path), converted to RGB (C=3) or L (C=1), center-cropped to a square and
  resized with Lanczos filtering to image_size. The folder is scanned once when the source is made:
  symbolic links are followed, each real directory once (a link loop adds nothing), and every file is
  checked (`check_image_file`), so that an unreadable file is named with its path before training
  starts. 16-bit images are scaled to 8 bits (round(v * 255 / 65535)), not clipped. This source and the
  image decoding shared by the sources are in `ddpm_jax.image_folder`.

Batches are float32 in [-1, 1] (x / 127.5 - 1, no dequantisation noise, as the official code).
The global training batch of step s is a function of (config.seed, s) alone: positions
s*B .. s*B+B-1 of an endless stream that walks each epoch's permutation (seeded by (seed, epoch)),
with a horizontal flip per global example drawn from (seed, s). Every host reads only its own
contiguous slice, so the batches do not depend on the host or device count, and a restart at
step k continues exactly. The random streams come from numpy's SeedSequence/PCG64, which numpy
keeps stable across releases in practice (every host must run the same numpy).
"""
import concurrent.futures
import functools
import importlib.util
import itertools
import os
from typing import Callable, Iterable, Iterator, Optional, Tuple

import jax
import numpy as np
from PIL import Image

from ddpm_jax import image_folder

TFDS_FAMILIES = ('cifar10', 'celeb_a_hq', 'lsun')
SOURCE_NAMES = ('digits', 'folder', 'cifar10', 'celeb_a_hq', 'lsun/<category>')
DIGITS_SPLITS = {'train': slice(0, 1500), 'test': slice(1500, 1797), 'all': slice(0, 1797)}

# Distinct first words of the SeedSequence entropy keep the random streams independent.
_PERMUTATION_STREAM = 0x5045524D   # 'PERM'
_FLIP_STREAM = 0x464C4950          # 'FLIP'


def to_model_range(images_uint8: np.ndarray) -> np.ndarray:
    """uint8 [..., H, W, C] in 0..255 -> float32 in [-1, 1] (x / 127.5 - 1)."""
    return images_uint8.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


# ---------------------------------------------------------------------------------------------
# Sources


def sklearn_digits_csv() -> Optional[str]:
    """Path of the CSV that scikit-learn ships and `sklearn.datasets.load_digits` parses (1,797 rows of 64 pixel
    values 0..16 and the label), found without importing scikit-learn; None where it is not there."""
    spec = importlib.util.find_spec('sklearn')   # locates the package without running its __init__
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(location, 'datasets', 'data', 'digits.csv.gz')
        if os.path.isfile(path):
            return path
    return None


@functools.lru_cache(maxsize=1)
def _digits_uint8() -> np.ndarray:
    """The scikit-learn digits as uint8 [1797, 8, 8] in 0..255 (round(v * 255 / 16)).

    Read from scikit-learn's CSV directly: importing sklearn.datasets costs about 1 s of every start-up (scipy and
    more), parsing the file 0.05 s. `load_digits()` where the file is not found."""
    path = sklearn_digits_csv()
    if path is not None:
        images = np.loadtxt(path, delimiter=',')[:, :-1].reshape(-1, 8, 8)   # the last column is the label
    else:
        from sklearn.datasets import load_digits
        images = load_digits().images  # float64 [1797, 8, 8], values 0..16
    return np.round(images * (255.0 / 16.0)).astype(np.uint8)


class DigitsSource:
    """The scikit-learn digits split as uint8 [n, S, S, 1] (S = image_size; bicubic resize when S != 8)."""

    def __init__(self, split: str, image_size: int, channels: int):
        if split not in DIGITS_SPLITS:
            raise ValueError(f'Unknown digits split {split!r}; allowed: {sorted(DIGITS_SPLITS)}.')
        if channels != 1:
            raise ValueError(f'The digits are grayscale: set config.data.channels=1 (got {channels}).')
        images = _digits_uint8()[DIGITS_SPLITS[split]]
        if image_size != images.shape[1]:
            images = np.stack([
                np.asarray(Image.fromarray(image).resize((image_size, image_size), Image.Resampling.BICUBIC))
                for image in images])
        self._images = images[..., None]

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, indices) -> np.ndarray:
        return self._images[image_folder.as_indices(indices)]


def _tfds_open_error(tfds_name: str, data_dir: Optional[str], split: str, error: Exception) -> Exception:
    """The error to raise when tfds.data_source(tfds_name, split) failed with `error`: a ValueError
    naming the splits and format when the dataset is prepared, else a FileNotFoundError that says
    how to prepare it as array_record and where it looked."""
    import tensorflow_datasets as tfds
    builder = tfds.builder(tfds_name, data_dir=data_dir)
    dir_flag = f' --data_dir={data_dir}' if data_dir else ''
    rebuild = f'tfds build {tfds_name} --file_format=array_record{dir_flag}'
    if builder.is_prepared():
        return ValueError(
            f'TFDS dataset {tfds_name!r} in {builder.data_dir} (format {builder.info.file_format}, splits '
            f'{sorted(builder.info.splits)}) cannot be opened as split {split!r}: {error}\n'
            f'Use one of its splits; a dataset prepared as tfrecord cannot be read without TensorFlow: `{rebuild}`.')
    dir_arg = f', data_dir={data_dir!r}' if data_dir else ''
    lines = [
        f'TFDS dataset {tfds_name!r} (split {split!r}) is not prepared in {builder.data_dir}.',
        'Prepare it once as array_record, on a machine with TensorFlow and network access '
        '(pip install tensorflow-cpu tensorflow-datasets), then copy the directory if needed:',
        f'    {rebuild}',
        'or in Python:',
        f'    tfds.builder({tfds_name!r}, file_format="array_record"{dir_arg}).download_and_prepare()',
        'and point config.data.data_dir (or --data_dir) at that data_dir.',
    ]
    if tfds_name.startswith('celeb_a_hq'):
        lines.append('celeb_a_hq needs a manual download: put data256x256.tar (made by progressive_growing_of_gans'
                     "' dataset_tool) in a folder and add --manual_dir=<that folder>.")
    if tfds_name.startswith('lsun'):
        lines.append('lsun downloads the LSUN lmdb zips from dl.yf.io and needs tensorflow-io to read them; '
                     "if they cannot be fetched, convert your images to files and use config.data.name='folder'.")
    lines.append(f'(TFDS said: {error})')
    return FileNotFoundError('\n'.join(lines))


class TfdsSource:
    """A prepared array_record TFDS split, decoded without TensorFlow, as uint8 [n, S, S, C]."""

    def __init__(self, tfds_name: str, split: str, data_dir: Optional[str], image_size: int, channels: int):
        import tensorflow_datasets as tfds
        if not tfds_name:
            raise ValueError('config.data.tfds_name is empty: set the TFDS builder name, e.g. '
                             "'cifar10', 'celeb_a_hq/256' or 'lsun/church_outdoor'.")
        try:
            self._source = tfds.data_source(tfds_name, split=split, data_dir=data_dir, download=False)
        except (NotImplementedError, FileNotFoundError, KeyError) as error:  # what TFDS raises when unprepared
            raise _tfds_open_error(tfds_name, data_dir, split, error) from error
        height, width, dataset_channels = self._source.dataset_info.features['image'].shape
        if dataset_channels is not None and dataset_channels != channels:
            raise ValueError(f'TFDS {tfds_name!r} images have {dataset_channels} channels but '
                             f'config.data.channels={channels}: set config.data.channels={dataset_channels}.')
        self._fixed_size = height is not None and width is not None
        if self._fixed_size and (height, width) != (image_size, image_size):
            raise ValueError(f'TFDS {tfds_name!r} images are {height}x{width} but config.data.image_size='
                             f'{image_size}: set config.data.image_size={height} or pick the TFDS config '
                             f'of that resolution (e.g. celeb_a_hq/{image_size}).')
        self._image_size = image_size
        self._mode = image_folder.pil_mode(channels)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=image_folder.DECODE_THREADS)

    def __len__(self) -> int:
        return len(self._source)

    def _read(self, index: int) -> np.ndarray:
        """Record `index` decoded to uint8 [S, S, C]. One record at a time: the batched
        __getitems__ of TFDS data sources does not work under tfds.testing.mock_data."""
        image = np.asarray(self._source[index]['image'], dtype=np.uint8)
        if self._fixed_size:
            return image
        return image_folder.fit_image(Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image),
                                      self._image_size, self._mode)

    def __getitem__(self, indices) -> np.ndarray:
        return np.stack(list(self._pool.map(self._read, image_folder.as_indices(indices).tolist())))


def load_source(config, split: str):
    """The random-access source of `split` for config.data.

    Returns an object with `len(source)` and `source[indices int [n]] -> uint8 [n, S, S, C]`
    (S = config.data.image_size, C = config.data.channels). Raises ValueError for an unknown
    config.data.name (listing the allowed ones) and FileNotFoundError, saying how to prepare the
    data, when a TFDS dataset or image folder is missing.
    """
    data = config.data
    name = data.name
    if name == 'digits':
        return DigitsSource(split, data.image_size, data.channels)
    if name == 'folder':
        return image_folder.FolderSource(data.data_dir, split, data.image_size, data.channels)
    if name.split('/')[0] in TFDS_FAMILIES:
        data_dir = os.path.expanduser(data.data_dir) if data.data_dir else None
        return TfdsSource(data.tfds_name, split, data_dir, data.image_size, data.channels)
    raise ValueError(f'Unknown config.data.name={name!r}; allowed: {", ".join(SOURCE_NAMES)}.')


# ---------------------------------------------------------------------------------------------
# Batching


def _process_slice(batch_size: int, process_index: Optional[int], process_count: Optional[int],
                   what: str) -> Tuple[int, int]:
    """(start, size) of this host's contiguous slice of a global batch of `batch_size`."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f'process_index={process_index} must lie in [0, process_count={process_count}).')
    if batch_size < 1 or batch_size % process_count:
        raise ValueError(f'{what}={batch_size} must be a positive multiple of the process count '
                         f'{process_count}, so that every host gets the same number of images.')
    size = batch_size // process_count
    return process_index * size, size


def _seed_word(seed: int) -> int:
    """Any Python int seed -> a non-negative 64-bit word for SeedSequence."""
    return int(seed) & 0xFFFFFFFFFFFFFFFF


def epoch_permutation(seed: int, epoch: int, num_images: int) -> np.ndarray:
    """The order of epoch `epoch`: a permutation int64 [num_images] from (seed, epoch) alone."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([_PERMUTATION_STREAM, _seed_word(seed), epoch])))
    return rng.permutation(num_images)


def flip_mask(seed: int, step: int, global_batch_size: int) -> np.ndarray:
    """bool [global_batch_size]: which examples of the global batch of `step` are flipped (p = 1/2)."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([_FLIP_STREAM, _seed_word(seed), step])))
    return rng.random(global_batch_size) < 0.5


def _prefetched(make_batch: Callable[[int], object], steps: Iterable[int]) -> Iterator:
    """Yields make_batch(step) for each step, computing the next one in a background thread."""
    steps = iter(steps)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for step in steps:
            upcoming = pool.submit(make_batch, step)
            if pending is not None:
                yield pending.result()
            pending = upcoming
        if pending is not None:
            yield pending.result()


def train_batches(config, *, start_step: int = 0, process_index: Optional[int] = None,
                  process_count: Optional[int] = None, source=None) -> Iterator[np.ndarray]:
    """Endless per-host training batches, float32 [B // process_count, S, S, C] in [-1, 1].

    The global batch of step s holds the examples at positions s*B .. s*B+B-1 of the stream
    epoch_permutation(seed, 0), epoch_permutation(seed, 1), ... over config.data.train_split
    (B = config.training.batch_size), each flipped horizontally where flip_mask(seed, s, B) is set
    (when config.data.random_flip). This host yields rows [process_index * b, (process_index + 1) * b)
    of it, b = B // process_count, starting at step `start_step`. Defaults: jax.process_index() and
    jax.process_count(). `source`: the source of the training split when already made (a folder
    source checks every file when made), else load_source(config, config.data.train_split). Raises
    ValueError when B is not divisible by process_count.
    """
    global_batch_size = config.training.batch_size
    row_start, local_batch_size = _process_slice(global_batch_size, process_index, process_count,
                                                 'config.training.batch_size')
    if start_step < 0:
        raise ValueError(f'start_step={start_step} must be >= 0.')
    if source is None:
        source = load_source(config, config.data.train_split)
    num_images = len(source)
    seed = config.seed
    random_flip = config.data.random_flip
    permutations = {}  # epoch -> permutation; only the epochs of the current batch are kept

    def make_batch(step: int) -> np.ndarray:
        positions = step * global_batch_size + row_start + np.arange(local_batch_size)
        epochs, offsets = np.divmod(positions, num_images)
        for epoch in list(permutations):
            if epoch not in epochs:
                del permutations[epoch]
        indices = np.empty(local_batch_size, dtype=np.int64)
        for epoch in np.unique(epochs):
            if epoch not in permutations:
                permutations[epoch] = epoch_permutation(seed, int(epoch), num_images)
            in_epoch = epochs == epoch
            indices[in_epoch] = permutations[epoch][offsets[in_epoch]]
        images = source[indices]
        if random_flip:
            flipped = flip_mask(seed, step, global_batch_size)[row_start:row_start + local_batch_size]
            images[flipped] = images[flipped, :, ::-1]
        return to_model_range(images)

    return _prefetched(make_batch, itertools.count(start_step))


def eval_batches(config, split: str, batch_size: int, *, process_index: Optional[int] = None,
                 process_count: Optional[int] = None,
                 num_images: Optional[int] = None, source=None) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """Every image of `split` once, in order: (images float32 [b, S, S, C] in [-1, 1], mask bool [b]).

    `batch_size` is global: global batch k holds images k*batch_size .. (k+1)*batch_size - 1 and this
    host yields its rows [process_index * b, (process_index + 1) * b), b = batch_size // process_count.
    Every host yields ceil(n / batch_size) batches; positions past the end are zero images with
    mask False. num_images (None: the whole split) limits the split to its first images. No flips.
    source: `load_source(config, split)` when the caller already opened it (an image folder is scanned and
    checked once per opening).
    """
    row_start, local_batch_size = _process_slice(batch_size, process_index, process_count, 'batch_size')
    if source is None:
        source = load_source(config, split)
    total = len(source) if num_images is None else min(num_images, len(source))
    if total < 1:
        raise ValueError(f'num_images={num_images} must be >= 1 (split {split!r} has {len(source)} images).')
    image_shape = (config.data.image_size, config.data.image_size, config.data.channels)

    def make_batch(batch_index: int) -> Tuple[np.ndarray, np.ndarray]:
        positions = batch_index * batch_size + row_start + np.arange(local_batch_size)
        mask = positions < total
        images = np.zeros((local_batch_size,) + image_shape, dtype=np.float32)
        if mask.any():
            images[mask] = to_model_range(source[positions[mask]])
        return images, mask

    return _prefetched(make_batch, range(-(-total // batch_size)))
