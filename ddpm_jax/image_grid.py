"""Images in [-1, 1] as uint8 and as PNG grids (training's sample grids and the evaluation figures)."""
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image


def to_uint8(images):
    """[..., C] float in [-1, 1] -> uint8 of the same shape: round((x + 1) * 127.5), clipped to [0, 255].

    The inverse of the data's u / 127.5 - 1. A jax array (or a tracer inside jit) stays on its device and is
    converted in its own dtype; anything else is converted on the host in float64 numpy.
    """
    if isinstance(images, jax.Array):
        return jnp.clip(jnp.round((images + 1.0) * 127.5), 0, 255).astype(jnp.uint8)
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


def save_image_grid(images, path: str, *, num_columns: int = 0, padding: int = 1, scale: int = 1,
                    min_size: int = 0) -> None:
    """Writes images [N, H, W, C] (C = 1 or 3) as one PNG grid (see make_grid), creating the folder.

    images: uint8 in [0, 255], or float in [-1, 1] (converted with to_uint8).
    Each grid pixel becomes a k x k block (nearest), k = max(scale, ceil(min_size / longest grid side)):
    `scale` fixes the factor, `min_size` makes the longer side at least that many pixels.
    """
    images = np.asarray(images)
    grid = make_grid(images if images.dtype == np.uint8 else to_uint8(images), num_columns=num_columns,
                     padding=padding)
    factor = max(scale, -(-min_size // max(grid.shape[:2])), 1)
    if factor > 1:
        grid = grid.repeat(factor, axis=0).repeat(factor, axis=1)
    if grid.shape[-1] == 1:
        picture = Image.fromarray(grid[..., 0], mode='L')
    elif grid.shape[-1] == 3:
        picture = Image.fromarray(grid, mode='RGB')
    else:
        raise ValueError(f'images need 1 or 3 channels, got {grid.shape[-1]}')
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    picture.save(path)
