"""PNG grids of images."""
import math
import os

import numpy as np
from PIL import Image


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[N, H, W, C] float in [-1, 1] -> uint8 [N, H, W, C] (round((x + 1) * 127.5), clipped)."""
    return np.clip(np.round((np.asarray(images, np.float64) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, *, num_columns: int = 0, padding: int = 1) -> np.ndarray:
    """Tiles uint8 [N, H, W, C] into one uint8 image [rows*(H+p)+p, cols*(W+p)+p, C] on black.

    num_columns: 0 picks ceil(sqrt(N)).
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f'images must be uint8 [N, H, W, C], got {images.dtype} {images.shape}')
    count, height, width, channels = images.shape
    columns = num_columns or max(1, math.ceil(math.sqrt(count)))
    rows = max(1, math.ceil(count / columns))
    grid = np.zeros((rows * (height + padding) + padding, columns * (width + padding) + padding, channels),
                    np.uint8)
    for index, image in enumerate(images):
        top = padding + (index // columns) * (height + padding)
        left = padding + (index % columns) * (width + padding)
        grid[top:top + height, left:left + width] = image
    return grid


def save_image_grid(images: np.ndarray, path: str, *, num_columns: int = 0, padding: int = 1,
                    scale: int = 1) -> None:
    """Writes float images [N, H, W, C] in [-1, 1] (C = 1 or 3) as one PNG grid, each pixel `scale`x`scale`."""
    grid = make_grid(to_uint8(images), num_columns=num_columns, padding=padding)
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    if grid.shape[-1] == 1:
        picture = Image.fromarray(grid[..., 0], mode='L')
    elif grid.shape[-1] == 3:
        picture = Image.fromarray(grid, mode='RGB')
    else:
        raise ValueError(f'images need 1 or 3 channels, got {grid.shape[-1]}')
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    picture.save(path)
