"""Mode 'sample': config.sampling.num_samples samples of the sampler config.sampling names (paper Algorithm 2,
or a fewer-step sampler of `samplers.make_sampler`), written as uint8 batches, one samples.npz and a PNG grid
under workdir/samples_step<S>_<sampler_tag>_<eval_tag>_seed<seed>/.

Sharded over every device of every host, batch by batch, resumable: batch b uses the key
fold_in(EVAL_SAMPLE key of the seed, b), so a restarted run produces the same samples.
"""
from __future__ import annotations

import os
from typing import Callable

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from ddpm_jax import image_grid, parallel, progress as progress_lib, rng_streams, samplers, xla_cpu
from ddpm_jax.evaluation import common


def sampler_tag(config) -> str:
    """Names the sampler settings: e.g. 'ancestral1000', 'ddim50_eta0.0'."""
    sampling = config.sampling
    steps = sampling.num_steps or config.diffusion.num_diffusion_timesteps
    tag = f'{sampling.sampler}{steps}'
    if sampling.sampler == 'ddim':
        tag += f'_eta{float(sampling.ddim_eta)}'
    if sampling.sampler in ('pc', 'langevin'):
        tag += f'_snr{float(sampling.snr)}_corr{int(sampling.n_corrector_steps)}'
    if sampling.sampler == 'ode':
        tag = 'ode_' + ode_tag(config)
    return tag


def ode_tag(config) -> str:
    """Names the ODE solver settings: 'adaptive_rtol1e-05_atol1e-05' or 'heun100'."""
    sampling = config.sampling
    if sampling.ode_solver == 'heun':
        return f'heun{sampling.num_steps or config.diffusion.num_diffusion_timesteps}'
    return f'{sampling.ode_solver}_rtol{float(sampling.ode_rtol):g}_atol{float(sampling.ode_atol):g}'


def score_settings(config) -> dict:
    """The config.sampling values of the score samplers and the ODE (part of the sample and ODE-NLL settings)."""
    sampling = config.sampling
    return dict(snr=float(sampling.snr), n_corrector_steps=int(sampling.n_corrector_steps),
                ode_solver=str(sampling.ode_solver), ode_rtol=float(sampling.ode_rtol),
                ode_atol=float(sampling.ode_atol))


def make_sample_batch_fn(config, apply_fn: Callable, mesh, *, quantize: bool = True, with_nfe: bool = False,
                         on_call: Callable[[int], None] | None = None, report_at=None) -> Callable:
    """The jitted sampler of sample mode: (params, rng) -> one global batch [B, H, W, C], split over the mesh.

    B = config.sampling.batch_size (a multiple of the mesh size); the sampler is samplers.make_sampler(config)
    and every network call sees its input batch constrained to the mesh's data sharding.
    quantize: True returns uint8 (image_grid.to_uint8, on device; what sample mode stores), False the float32
    x_0 in [-1, 1] (e.g. to check it for non-finite values). with_nfe: return (batch, NFE int32 scalar), the
    network evaluations of the sampler (data-dependent for the adaptive ODE solver). on_call: a host function
    called with the timestep of the network calls at the timesteps report_at (None: every call; see
    `progress.report_from_device`; the samples are unchanged).
    """
    batch_size = int(config.sampling.batch_size)
    parallel.check_global_batch(batch_size, mesh)
    sharding = parallel.data_sharding(mesh)
    sample_fn = samplers.make_sampler(config, return_nfe=True)
    shape = (batch_size,) + common.image_shape(config)

    def sample_batch(params, rng):
        model_fn = common.constrained_model_fn(apply_fn, params, sharding)
        if on_call is not None:
            model_fn = progress_lib.report_from_device(model_fn, on_call, report_at)
        x, nfe = sample_fn(model_fn, shape, rng)
        x = jax.lax.with_sharding_constraint(image_grid.to_uint8(x) if quantize else x, sharding)
        return (x, nfe) if with_nfe else x

    return xla_cpu.jit(sample_batch)


def _batch_path(out_dir: str, b: int) -> str:
    return os.path.join(out_dir, f'batch_{b:05d}.npz')


def pending_batches(out_dir: str, num_batches: int) -> list[int]:
    """The batch indices whose file is not yet in out_dir, the same on every process (a collective decides,
    since every process must run the same batches)."""
    todo = [b for b in range(num_batches) if not os.path.exists(_batch_path(out_dir, b))]
    if jax.process_count() > 1:
        mask = np.zeros(num_batches, np.int32)
        mask[todo] = 1
        mask = multihost_utils.broadcast_one_to_all(mask)
        todo = [b for b in range(num_batches) if mask[b]]
    return todo


def _write_batches(config, out_dir: str, apply_fn: Callable, params, todo: list[int]) -> None:
    """Samples and writes the batches `todo` (batch_XXXXX.npz: samples uint8 [B,H,W,C], nfe int64)."""
    mesh = parallel.make_mesh()
    params = common.replicated(params, mesh)
    base_key = common.seed_key(config, rng_streams.EVAL_SAMPLE)
    timesteps = samplers.sampler_timesteps(config)
    counter = progress_lib.TimestepCounter(timesteps, progress_lib.Progress(
        f'sampling {len(todo)} batches of {int(config.sampling.batch_size)}', len(todo) * len(timesteps),
        unit='steps'))
    sample_batch = make_sample_batch_fn(config, apply_fn, mesh, with_nfe=True, on_call=counter,
                                        report_at=counter.report_timesteps())
    for i, b in enumerate(todo):
        counter.offset = i * len(timesteps)
        images, nfe = parallel.to_host(sample_batch(params, jax.random.fold_in(base_key, b)))
        if jax.process_index() == 0:
            common.write_npz(_batch_path(out_dir, b), samples=images, nfe=np.asarray(nfe, np.int64))
        logging.info('sample batch %d written (%d of %d this run)', b + 1, i + 1, len(todo))


def generate_samples(config, out_dir: str, apply_fn: Callable, params) -> dict:
    """Writes out_dir/batch_XXXXX.npz (uint8 [B,H,W,C]) for every batch not yet written, then samples.npz,
    metadata.json (sampler, NFE per batch), samples_grid.png (and png/ with config.sampling.export_png).

    Batch b is `make_sample_batch_fn(config, apply_fn, mesh)(params, fold_in(seed key, b))`, B =
    config.sampling.batch_size (global, split over all devices). Returns dict(path, num_samples, complete) (and
    nfe_mean, nfe_per_batch, png_dir when complete).
    """
    sampling = config.sampling
    num_samples, batch_size = int(sampling.num_samples), int(sampling.batch_size)
    if num_samples <= 0:
        raise ValueError(f'config.sampling.num_samples={num_samples} must be positive')
    num_batches = -(-num_samples // batch_size)
    _write_batches(config, out_dir, apply_fn, params, pending_batches(out_dir, num_batches))
    complete = all(os.path.exists(_batch_path(out_dir, b)) for b in range(num_batches))
    result = dict(path=os.path.join(out_dir, 'samples.npz'), num_samples=num_samples, complete=complete)
    if complete and jax.process_index() == 0:
        result.update(_merge_batches(config, out_dir, num_batches, result['path']))
    return result


def _merge_batches(config, out_dir: str, num_batches: int, path: str) -> dict:
    """Writes samples.npz, metadata.json, the grid (and the PNGs) from the batch files; returns the NFE entries."""
    num_samples = int(config.sampling.num_samples)
    batches = [np.load(_batch_path(out_dir, b)) for b in range(num_batches)]
    samples = np.concatenate([batch['samples'] for batch in batches])[:num_samples]
    common.write_npz(path, samples=samples)
    # network evaluations per batch (older batch files, written before NFE was recorded, count as -1)
    nfe = [int(batch.get('nfe', -1)) for batch in batches]
    result = dict(nfe_mean=float(np.mean(nfe)), nfe_per_batch=nfe)
    common.write_json(os.path.join(out_dir, 'metadata.json'),
                      dict(sampler=sampler_tag(config), num_samples=num_samples, nfe_mean=result['nfe_mean'],
                           nfe_per_batch=nfe))
    if config.sampling.export_png:
        result['png_dir'] = export_pngs(samples, os.path.join(out_dir, 'png'))
    grid_n = min(num_samples, 100)
    image_grid.save_image_grid(samples[:grid_n], os.path.join(out_dir, 'samples_grid.png'),
                               num_columns=int(np.ceil(grid_n ** 0.5)), min_size=256)
    return result


def export_pngs(samples: np.ndarray, folder: str) -> str:
    """Writes samples (uint8 [N, H, W, C], C = 1 or 3) as folder/000000.png, 000001.png, ... (lossless, so each
    reads back as samples[i]); files already there are kept (resumable), each is written atomically.
    Returns folder."""
    os.makedirs(folder, exist_ok=True)
    digits = max(6, len(str(len(samples) - 1)))
    progress = progress_lib.Progress('PNG export', len(samples), unit='images')
    for i, image in enumerate(samples):
        path = os.path.join(folder, f'{i:0{digits}d}.png')
        if not os.path.exists(path):
            common.write_png(path, image)
        progress.update(i + 1)
    return folder


def samples_dir_name(config, step: int) -> str:
    """samples_step<S>_<sampler_tag>_<eval_tag>_seed<seed>: the folder of the samples of checkpoint S."""
    return f'samples_step{step}_{sampler_tag(config)}_{common.eval_tag(config)}_seed{config.seed}'


def samples_dir(config, workdir: str, step: int) -> str:
    """workdir/samples_dir_name(config, step): where sample mode writes the samples of checkpoint `step`."""
    return os.path.join(workdir, samples_dir_name(config, step))


def run(config, workdir: str) -> dict:
    """Mode 'sample': workdir/samples_step<S>_<sampler>_<eval_tag>_seed<seed>/{batch_*.npz, samples.npz,
    samples_grid.png}; returns generate_samples' dict with the step."""
    apply_fn, params, step = common.load_model(config, workdir)
    sampling = config.sampling
    settings = dict(step=step, sampler=sampling.sampler, num_steps=int(sampling.num_steps),
                    ddim_eta=float(sampling.ddim_eta), clip_denoised=bool(sampling.clip_denoised),
                    batch_size=int(sampling.batch_size), seed=int(config.seed), **common.eval_settings(config))
    if sampling.sampler in ('pc', 'langevin', 'ode'):
        settings.update(score_settings(config))
    out_dir = common.output_dir(workdir, samples_dir_name(config, step), settings)
    result = generate_samples(config, out_dir, apply_fn, params)
    result['step'] = step
    return result


MODES = {'sample': run}
