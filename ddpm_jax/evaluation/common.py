"""What every evaluation mode shares: the loaded model and its sharded model_fn, the output folder with its
settings guard, atomic file writers and the seed keys.

Outputs go under workdir/<mode folder>/ whose name carries the checkpoint step and the settings, and every
folder holds settings.json: a rerun with other settings in the same folder is refused, so results made with
other settings never mix. Only process 0 writes files. Images are stored as uint8 with `round((x + 1) * 127.5)`
clipped to [0, 255] (the inverse of the data's u / 127.5 - 1).
"""
from __future__ import annotations

import csv
import json
import os
from typing import Any, Callable

import jax
import numpy as np
from PIL import Image

from ddpm_jax import checkpoint, parallel, rng_streams, samplers, schedules
from ddpm_jax.models import unet

# ----------------------------------------------------------------------------------------------- files

def atomic_write(path: str, write_fn: Callable[[str], None]) -> None:
    """Calls write_fn(temporary path) and renames the result to `path`, so that readers (and a restarted run)
    never see a half-written file. The temporary name keeps the extension (np.savez and PIL choose by it)."""
    root, ext = os.path.splitext(path)
    temporary = f'{root}.tmp{os.getpid()}{ext}'
    write_fn(temporary)
    os.replace(temporary, path)


def write_json(path: str, obj: Any) -> None:
    def write(tmp):
        with open(tmp, 'w') as f:
            json.dump(obj, f, indent=2)
    atomic_write(path, write)


def write_npz(path: str, **arrays: np.ndarray) -> None:
    atomic_write(path, lambda tmp: np.savez(tmp, **arrays))


def write_csv(path: str, header: list[str], rows) -> None:
    def write(tmp):
        with open(tmp, 'w', newline='') as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)
    atomic_write(path, write)


def write_png(path: str, image: np.ndarray) -> None:
    """image: uint8 [H, W, C] with C = 1 or 3 (lossless, reads back equal)."""
    atomic_write(path, lambda tmp: Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(
        tmp, format='PNG'))


def output_dir(workdir: str, name: str, settings: dict) -> str:
    """workdir/name, created with settings.json; ValueError if it exists with other settings (stale results).

    Every mode picks its folder here; `name` carries the step and the tags, settings everything else that
    changes the results."""
    path = os.path.join(workdir, name)
    meta_path = os.path.join(path, 'settings.json')
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            old = json.load(f)
        if old != settings:
            raise ValueError(f'{path} holds results made with other settings {old}, not {settings}; '
                             'delete it or use another workdir.')
    elif jax.process_index() == 0:
        os.makedirs(path, exist_ok=True)
        write_json(meta_path, settings)
    return path


# ----------------------------------------------------------------------------------------------- settings

def seed_key(config, stream: int) -> jax.Array:
    """The key of an rng_streams.EVAL_* stream for config.seed."""
    return rng_streams.eval_key(config.seed, stream)


def image_shape(config) -> tuple[int, int, int]:
    return (config.data.image_size, config.data.image_size, config.data.channels)


def eval_split(config) -> str:
    return config.eval.split or config.data.eval_split


def split_size(source, limit: int | None) -> int:
    """Images of an opened split (`data.load_source`), at most `limit` when given."""
    return min(len(source), limit) if limit else len(source)


def eval_tag(config) -> str:
    """Names the evaluation-time choices that a checkpoint does not fix: the variance type, the weights ('ema' or
    'raw') and '_noclip' without x0 clipping; e.g. 'fixedlarge_ema'."""
    tag = f'{config.diffusion.model_var_type}_{"ema" if config.eval.use_ema else "raw"}'
    return tag if config.sampling.clip_denoised else tag + '_noclip'


def eval_settings(config) -> dict:
    return dict(model_var_type=config.diffusion.model_var_type, use_ema=bool(config.eval.use_ema))


def check_diffusion_supported(config, use: str = 'nll') -> None:
    """`samplers.check_supported` for the full-T diffusion of config.diffusion, used as the NLL bound ('nll')
    or by the paper's full-T ancestral experiments ('ancestral'); ValueError with the reason and the fix."""
    dcfg = config.diffusion
    samplers.check_supported(dcfg.model_mean_type, dcfg.model_var_type, use, 0, schedules.betas_from_config(dcfg))


# ----------------------------------------------------------------------------------------------- the model

def model_apply_fn(config) -> Callable:
    """apply_fn(params, x [B,H,W,C], t [B] int) -> output of the U-Net config.model describes (eval mode)."""
    model = unet.create_model(config)

    def apply_fn(params, x, t):
        return model.apply({'params': params}, x, t, train=False)

    return apply_fn


def requested_step(config) -> int | None:
    """config.eval.checkpoint_step, or None (the newest intact checkpoint) when it is None or negative."""
    step = config.eval.checkpoint_step
    return None if step is None or step < 0 else int(step)


def load_model(config, workdir: str):
    """(apply_fn(params, x, t) -> output, params, checkpoint step) of the checkpoint config.eval selects: its EMA
    params, or with config.eval.use_ema=False the raw params of a training checkpoint.

    Every evaluation mode picks its checkpoint here: config.eval.checkpoint_step, or (when None or negative) the
    newest one that reads back intact (the restore falls back past damaged ones).
    """
    params, step = checkpoint.restore_eval_params(workdir, config, step=requested_step(config),
                                                  use_ema=bool(config.eval.use_ema))
    return model_apply_fn(config), params, int(step)


def constrained_model_fn(apply_fn: Callable, params, sharding) -> Callable:
    """model_fn whose input batch is split over the mesh (the batch axis of every step is data-parallel)."""
    def model_fn(x, t):
        x = jax.lax.with_sharding_constraint(x, sharding)
        return apply_fn(params, x, t)
    return model_fn


def replicated(params, mesh):
    """params whole on every device of the mesh (a no-op for the output of restore_ema_params)."""
    sharding = parallel.replicated_sharding(mesh)

    def put(x):
        if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
            return x
        return parallel.replicate(x, mesh)

    return jax.tree.map(put, params)


def save_figure(path: str, figure) -> None:
    """Writes a matplotlib Figure (built with matplotlib.figure.Figure, no pyplot state) as a PNG, atomically."""
    atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=100))
