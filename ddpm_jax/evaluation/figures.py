"""The paper's sample figures, each from the full-T ancestral process (paper Algorithm 2), sharded over all
devices like the other modes:

* 'progressive' (Fig. 6): the predicted x_0 along the reverse process;
* 'shared_xt' (Fig. 7): several samples of p(x_0 | x_t) sharing one x_t, for a few t;
* 'interpolate' (Fig. 8): two test images encoded to x_t with the same noise, mixed, decoded from t.

Each writes <mode>.png and <mode>.csv to workdir/<mode>_step<S>_<eval_tag>_seed<seed>/ (with settings.json,
see common.output_dir); the noise is drawn from the EVAL_EXPERIMENT stream of the seed.
"""
from __future__ import annotations

import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import (
    data,
    diffusion as diffusion_lib,
    image_grid,
    parallel,
    progress as progress_lib,
    rng_streams,
    samplers,
    xla_cpu,
)
from ddpm_jax.evaluation import common


def _setup(config, workdir: str, name: str, settings: dict):
    """(diffusion, model_fn_of(params, counter), replicated params, step, out_dir) of figure `name`.

    model_fn_of(params, counter) is the model with its input batch split over all devices, reporting its calls
    to the progress counter; call it inside the jitted function that takes params."""
    common.check_diffusion_supported(config, 'ancestral')
    apply_fn, params, step = common.load_model(config, workdir)
    settings = dict(step=step, seed=int(config.seed), clip_denoised=bool(config.sampling.clip_denoised),
                    **common.eval_settings(config), **settings)
    out_dir = common.output_dir(workdir, f'{name}_step{step}_{common.eval_tag(config)}_seed{config.seed}', settings)
    mesh = parallel.make_mesh()
    sharding = parallel.data_sharding(mesh)

    def model_fn_of(params, counter) -> Callable:
        return progress_lib.report_from_device(common.constrained_model_fn(apply_fn, params, sharding), counter)

    return diffusion_lib.diffusion_from_config(config), model_fn_of, common.replicated(params, mesh), step, out_dir


def _counter(name: str, num_timesteps: int, total: int) -> progress_lib.TimestepCounter:
    """Progress of a figure mode over `total` reverse steps, fed by the model calls at timesteps 0..T-1."""
    return progress_lib.TimestepCounter(np.arange(num_timesteps), progress_lib.Progress(name, total, unit='steps'))


def default_timesteps(num_timesteps: int) -> list[int]:
    """Code timesteps at 1/4, 1/2, 3/4 and all of T: e.g. 249, 499, 749, 999 for T = 1000."""
    return sorted({max(num_timesteps * k // 4 - 1, 0) for k in (1, 2, 3, 4)})


def _write(out_dir: str, name: str, images: np.ndarray, num_columns: int, header: list[str], rows) -> str:
    """out_dir/<name>.png (a grid of uint8 images [N,H,W,C]) and out_dir/<name>.csv, by process 0."""
    path = os.path.join(out_dir, f'{name}.png')
    if jax.process_index() == 0:
        image_grid.save_image_grid(images, path, num_columns=num_columns, min_size=512)
        common.write_csv(os.path.join(out_dir, f'{name}.csv'), header, rows)
    return path


def run_progressive(config, workdir: str) -> dict:
    """Mode 'progressive' (Fig. 6): pred_x0 every `freq` steps of the reverse process for a few samples.

    config.eval.num_progressive rows; columns: pred_x0 at t = T - freq, ..., 0 (slot n of
    p_sample_loop_progressive holds t = n*freq), then the sample. freq = config.eval.progressive_freq, or T/10
    when 0. Writes progressive.png and .csv."""
    num_timesteps = int(config.diffusion.num_diffusion_timesteps)
    freq = int(config.eval.progressive_freq) or max(num_timesteps // 10, 1)
    num = int(config.eval.num_progressive)
    d, model_fn_of, params, step, out_dir = _setup(config, workdir, 'progressive', dict(num_progressive=num,
                                                                                         freq=freq))
    counter = _counter('progressive', num_timesteps, num_timesteps)
    run = xla_cpu.jit(lambda params, rng: diffusion_lib.p_sample_loop_progressive(
        d, model_fn_of(params, counter), (num,) + common.image_shape(config), rng, freq=freq,
        clip_denoised=bool(config.sampling.clip_denoised)))
    final, pred_xstart = run(params, common.seed_key(config, rng_streams.EVAL_EXPERIMENT))
    slots = pred_xstart.shape[1]
    order = list(range(slots - 1, -1, -1))
    frames = jnp.concatenate([pred_xstart[:, order], final[:, None]], axis=1)  # [num, slots + 1, H, W, C]
    images = np.asarray(image_grid.to_uint8(frames))
    path = _write(out_dir, 'progressive', images.reshape((-1,) + images.shape[2:]), slots + 1,
                  ['column', 'timestep', 'what'],
                  [(c, n * freq, 'pred_x0') for c, n in enumerate(order)] + [(slots, 0, 'sample')])
    return dict(png=path, timesteps=[n * freq for n in order], step=step)


def run_shared_xt(config, workdir: str) -> dict:
    """Mode 'shared_xt' (Fig. 7): per row a t (config.eval.shared_xt_timesteps, code indexing; default
    T/4-1, T/2-1, 3T/4-1, T-1): x_t (clipped to [-1,1] for display), then config.eval.num_shared samples of
    p(x_0 | x_t) (`samplers.shared_xt_samples`). Writes shared_xt.png and shared_xt.csv."""
    num_timesteps = int(config.diffusion.num_diffusion_timesteps)
    timesteps = [int(t) for t in config.eval.shared_xt_timesteps or default_timesteps(num_timesteps)]
    num_shared = int(config.eval.num_shared)
    d, model_fn_of, params, step, out_dir = _setup(config, workdir, 'shared_xt', dict(timesteps=timesteps,
                                                                                       num_shared=num_shared))
    counter = _counter('shared_xt', num_timesteps, len(timesteps) * num_timesteps)
    run = xla_cpu.jit(lambda params, rng, t: samplers.shared_xt_samples(
        d, model_fn_of(params, counter), common.image_shape(config), rng, t, num_shared,
        clip_denoised=bool(config.sampling.clip_denoised)))
    rows = []
    for i, t in enumerate(timesteps):
        counter.offset = i * num_timesteps  # a row calls the model once at every t (shared chain, then branches)
        x_t, samples = run(params, jax.random.fold_in(common.seed_key(config, rng_streams.EVAL_EXPERIMENT), i),
                           jnp.int32(t))
        rows.append(np.asarray(image_grid.to_uint8(jnp.concatenate([x_t, samples]))))
    path = _write(out_dir, 'shared_xt', np.concatenate(rows), num_shared + 1, ['row', 'timestep', 'num_shared'],
                  [(i, t, num_shared) for i, t in enumerate(timesteps)])
    return dict(png=path, timesteps=timesteps, step=step)


def run_interpolate(config, workdir: str) -> dict:
    """Mode 'interpolate' (Fig. 8): test images config.eval.interp_indices of the eval split, lam in
    linspace(0, 1, config.eval.num_lambdas), for each t of config.eval.interp_timesteps (default as shared_xt)
    (`samplers.interpolate_images`). Each row: source a, decoded mixes, source b. Writes interpolate.png and .csv
    (per t and lam: RMSE on the 0-255 scale of the decoded image to each source)."""
    num_timesteps = int(config.diffusion.num_diffusion_timesteps)
    indices = [int(i) for i in config.eval.interp_indices]
    lambdas = np.linspace(0.0, 1.0, int(config.eval.num_lambdas))
    timesteps = [int(t) for t in config.eval.interp_timesteps or default_timesteps(num_timesteps)]
    split = common.eval_split(config)
    d, model_fn_of, params, step, out_dir = _setup(config, workdir, 'interpolate', dict(
        split=split, indices=indices, num_lambdas=len(lambdas), timesteps=timesteps))
    pair = data.load_source(config, split)[np.array(indices)].astype(np.float32) / 127.5 - 1.0
    x_a, x_b = jnp.asarray(pair[:1]), jnp.asarray(pair[1:])
    counter = _counter('interpolate', num_timesteps, sum(t + 1 for t in timesteps))
    run = xla_cpu.jit(lambda params, x_a, x_b, t, rng: samplers.interpolate_images(
        d, model_fn_of(params, counter), x_a, x_b, t, lambdas, rng, clip_denoised=bool(config.sampling.clip_denoised)))
    rows, table = [], []
    for i, t in enumerate(timesteps):
        # A row decodes from t down to 0; the model call at s is step T - s of the T-step count.
        counter.offset = sum(s + 1 for s in timesteps[:i]) - (num_timesteps - 1 - t)
        _, decoded = run(params, x_a, x_b, jnp.int32(t),
                         jax.random.fold_in(common.seed_key(config, rng_streams.EVAL_EXPERIMENT), i))
        rows.append(np.asarray(image_grid.to_uint8(jnp.concatenate([x_a, decoded, x_b]))))
        for lam, image in zip(lambdas, np.asarray(decoded, np.float64)):
            table.append((t, float(lam), float(np.sqrt(np.mean((image - pair[0]) ** 2)) * 127.5),
                          float(np.sqrt(np.mean((image - pair[1]) ** 2)) * 127.5)))
    path = _write(out_dir, 'interpolate', np.concatenate(rows), len(lambdas) + 2,
                  ['timestep', 'lambda', 'rmse_to_a', 'rmse_to_b'], table)
    return dict(png=path, timesteps=timesteps, lambdas=lambdas.tolist(), step=step)


MODES = {'progressive': run_progressive, 'shared_xt': run_shared_xt, 'interpolate': run_interpolate}
