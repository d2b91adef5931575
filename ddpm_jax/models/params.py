"""Parameters of a model without training it: fresh params and their abstract shapes.

The training state (`train.create_train_state`) and the checkpoint targets (`checkpoint`) both start here, so
storage never needs the trainer.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections


def image_shape(data: ml_collections.ConfigDict) -> tuple[int, int, int]:
    """(H, W, C) of the images config.data describes (square, image_size on a side)."""
    return (int(data.image_size), int(data.image_size), int(data.channels))


def init_params(model: nn.Module, image_shape: Sequence[int], rng: jax.Array) -> Any:
    """Fresh params of `model` (its own initialisers) for images of `image_shape` (H, W, C).

    The model is initialised on a zero batch [1, H, W, C] with timestep 0 in eval mode, as the official
    run_*.py build the graph once before training (no dropout key is needed).
    """
    x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
    return model.init({'params': rng}, x, jnp.zeros((1,), jnp.int32), train=False)['params']


def abstract_params(model: nn.Module, image_shape: Sequence[int]) -> Any:
    """The params tree of `model` as jax.ShapeDtypeStructs (jax.eval_shape: nothing is computed)."""
    return jax.eval_shape(lambda: init_params(model, image_shape, jax.random.key(0)))
