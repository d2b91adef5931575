"""The image-folder source (`config.data.name='folder'`) and the image decoding the sources share.

`FolderSource` reads every *.png / *.jpg / *.jpeg under <root>/<split>/ (`find_image_files`: recursive, sorted
by relative path, symbolic links followed, each real directory once) and checks every file when made
(`check_image_file`), raising one `DataError` that names the unreadable files. `fit_image` converts a PIL
image to uint8 [S, S, C] (16-bit grayscale scaled to 8 bits, center crop, Lanczos resize); `ddpm_jax.data`
uses it for variable-size TFDS images too, and picks the source in `load_source`.
"""
import concurrent.futures
import os
from typing import List, Optional

import numpy as np
from PIL import Image, JpegImagePlugin

from ddpm_jax.errors import UserError

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')

# Threads that decode (and resize) the images of one batch; PIL releases the GIL while decoding.
DECODE_THREADS = min(8, os.cpu_count() or 1)

# Most unreadable files listed in one error.
MAX_LISTED_BAD_FILES = 20


class DataError(UserError, ValueError):
    """Data that cannot be used: unreadable image files (named with their paths), or data settings that
    cannot work."""


class MissingDataError(UserError, FileNotFoundError):
    """A data folder that does not exist or holds no images; says where the files should be."""


# PIL modes of 16-bit single-channel images (PNG reads 16-bit grayscale as 'I;16', older Pillow as 'I').
_SIXTEEN_BIT_MODES = ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I')


def _to_8_bit(image):
    """A PIL image with 8-bit channels: 16-bit grayscale (modes 'I;16*', 'I') scaled by round(v * 255 / 65535),
    where PIL's convert('L') would clip every value above 255; other images unchanged (PIL itself keeps
    the high byte of 16-bit RGB(A) PNGs)."""
    if image.mode not in _SIXTEEN_BIT_MODES:
        return image
    values = np.asarray(image).astype(np.int64)
    if values.min(initial=0) < 0 or values.max(initial=0) > 65535:
        raise ValueError(f'{image.mode} image has values in [{values.min()}, {values.max()}], outside 0..65535.')
    # v * 255 / 65535 = v / 257; never exactly halfway (257 is odd), so rounding has no ties.
    return Image.fromarray(np.round(values / 257.0).astype(np.uint8), 'L')


def fit_image(image, image_size: int, mode: str) -> np.ndarray:
    """A PIL image -> uint8 [image_size, image_size, C]: convert to `mode` ('RGB' or 'L'),
    center-crop to a square, resize with Lanczos filtering (skipped when already the size)."""
    image = _to_8_bit(image).convert(mode)
    width, height = image.size
    side = min(width, height)
    if width != height:
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    if side != image_size:
        image = image.resize((image_size, image_size), Image.Resampling.LANCZOS)
    array = np.asarray(image, dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


def pil_mode(channels: int) -> str:
    if channels not in (1, 3):
        raise ValueError(f'config.data.channels={channels} is not supported; use 1 (grayscale) or 3 (RGB).')
    return 'L' if channels == 1 else 'RGB'


def as_indices(indices) -> np.ndarray:
    """Any integer index array-like -> int64 [n]."""
    return np.asarray(indices, dtype=np.int64).reshape(-1)

def find_image_files(split_dir: str) -> List[str]:
    """Paths of the *.png / *.jpg / *.jpeg files under split_dir (recursive), sorted by relative path.

    Symbolic links to directories are followed, but each real directory is entered once: the first link
    in sorted order wins, so a link loop (`loop -> .`) or a second link to a folder adds no files twice.
    """
    paths = []
    visited = set()  # (st_dev, st_ino) of the real directories entered
    for directory, subdirectories, names in os.walk(split_dir, followlinks=True):
        stat = os.stat(directory)
        if (stat.st_dev, stat.st_ino) in visited:
            subdirectories[:] = []
            continue
        visited.add((stat.st_dev, stat.st_ino))
        subdirectories.sort()  # a deterministic walk, so the same link of a directory always wins
        paths += [os.path.join(directory, name) for name in names
                  if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS]
    return sorted(paths, key=lambda path: os.path.relpath(path, split_dir))


def check_image_file(path: str) -> None:
    """Raises if `path` cannot be decoded, cheaply: PNGs are verified without decompressing (every chunk's
    CRC, up to the end chunk); JPEGs are decoded at 1/8 scale (PIL's draft mode skips most of the inverse
    DCT but still reads every byte, so a truncated file fails); anything else is decoded. Images of more
    than PIL.Image.MAX_IMAGE_PIXELS pixels (PIL's decompression-bomb limit) are refused from their header."""
    with Image.open(path) as image:
        width, height = image.size
        if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
            raise Image.DecompressionBombError(
                f'{width}x{height} = {width * height} pixels, more than PIL.Image.MAX_IMAGE_PIXELS = '
                f'{Image.MAX_IMAGE_PIXELS} (a possible decompression bomb)')
        if image.format == 'PNG':
            image.verify()
        else:
            if isinstance(image, JpegImagePlugin.JpegImageFile):  # also MPO, the JPEG variant of cameras
                image.draft(image.mode, (max(1, width // 8), max(1, height // 8)))
            image.load()


def _file_problem(path: str) -> Optional[str]:
    """None when check_image_file(path) passes, else its error as text."""
    try:
        check_image_file(path)
    except Exception as error:  # PIL raises many types for bad files
        return f'{type(error).__name__}: {error}'
    return None


class FolderSource:
    """Image files under root/<split>/ (recursive, sorted) as uint8 [n, S, S, C], read on demand.

    Making one scans the folder (find_image_files) and checks every file (check_image_file) in
    DECODE_THREADS threads, raising one DataError that lists the unreadable files.
    """

    def __init__(self, root: str, split: str, image_size: int, channels: int):
        if not root:
            raise DataError("The 'folder' source needs config.data.data_dir (or --data_dir) set to the folder "
                            'that holds one subfolder per split, e.g. <root>/train/**/*.png.')
        split_dir = os.path.join(os.path.expanduser(root), split)
        if not os.path.isdir(split_dir):
            raise MissingDataError(f'Image folder {split_dir!r} does not exist: the folder source reads '
                                   f'<config.data.data_dir>/<split>/**/*.png|jpg|jpeg.')
        self._image_size = image_size
        self._mode = pil_mode(channels)
        self.paths = find_image_files(split_dir)
        if not self.paths:
            raise MissingDataError(f'No {"/".join(IMAGE_EXTENSIONS)} files found under {split_dir!r}.')
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=DECODE_THREADS)
        bad = [(path, problem) for path, problem in zip(self.paths, self._pool.map(_file_problem, self.paths))
               if problem is not None]
        if bad:
            listed = '\n'.join(f'  {path}: {problem}' for path, problem in bad[:MAX_LISTED_BAD_FILES])
            more = f'\n  ... and {len(bad) - MAX_LISTED_BAD_FILES} more' if len(bad) > MAX_LISTED_BAD_FILES else ''
            raise DataError(f'{len(bad)} of the {len(self.paths)} image files under {split_dir} cannot be '
                                 f'read; delete, move or re-encode them:\n{listed}{more}')

    def __len__(self) -> int:
        return len(self.paths)

    def _read(self, index: int) -> np.ndarray:
        path = self.paths[index]
        try:
            with Image.open(path) as image:
                return fit_image(image, self._image_size, self._mode)
        except Exception as error:  # the file changed after the scan
            raise DataError(f'Image file {path} cannot be read ({type(error).__name__}: {error}); '
                                 'delete, move or re-encode it.') from error

    def __getitem__(self, indices) -> np.ndarray:
        return np.stack(list(self._pool.map(self._read, as_indices(indices).tolist())))
