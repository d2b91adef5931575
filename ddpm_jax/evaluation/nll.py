"""Mode 'eval': the test-set negative log-likelihood in bits/dim, every image counted, resumable per batch:
the variational bound (paper Sec. 4.2, Table 2; official diffusion_utils_2.py calc_bpd_loop) or, with
config.eval.likelihood='ode', the probability-flow ODE likelihood (Song et al. 2021, Sec. 4.3 and App. D.2).
Mode 'rate_distortion': Table 4 / Fig. 5 of the paper from the bound's per-timestep terms (same cached batches).
"""
from __future__ import annotations

import glob
import os
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from ddpm_jax import (
    data,
    diffusion as diffusion_lib,
    likelihood,
    parallel,
    progress as progress_lib,
    rng_streams,
    score,
    xla_cpu,
)
from ddpm_jax.evaluation import common, sample as sample_lib


def _batch_path(out_dir: str, b: int) -> str:
    return os.path.join(out_dir, f'batch_{b:05d}.npz')


def pending_batches(config, out_dir: str, split: str, batch_size: int,
                    source) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(b, this host's images [b_local,H,W,C], mask [b_local]) of the eval batches of `source` (the opened split)
    whose file is not yet in out_dir (data.eval_batches' order: every image once, the last batch padded)."""
    batches = data.eval_batches(config, split, batch_size, process_index=jax.process_index(),
                                process_count=jax.process_count(), num_images=int(config.eval.num_images) or None,
                                source=source)
    for b, (images, mask) in enumerate(batches):
        if not os.path.exists(_batch_path(out_dir, b)):  # the processes share the workdir
            yield b, images, mask


def _bound_batch_fn(config, apply_fn: Callable, sharding, counter) -> Callable:
    """jitted (params, x [B,H,W,C], rng) -> calc_bpd_loop's dict of [B, ...] arrays, split over the mesh."""
    d = diffusion_lib.diffusion_from_config(config)
    clip = bool(config.sampling.clip_denoised)

    @xla_cpu.jit
    def bpd_batch(params, x, rng):
        model_fn = progress_lib.report_from_device(common.constrained_model_fn(apply_fn, params, sharding), counter,
                                                   counter.report_timesteps())
        out = likelihood.calc_bpd_loop(d, model_fn, x, rng, clip_denoised=clip)
        return {k: jax.lax.with_sharding_constraint(v, sharding) for k, v in out.items()}

    return bpd_batch


def nll_batches(config, out_dir: str, apply_fn: Callable, params, split: str, *,
                make_batch_fn: Callable | None = None) -> bool:
    """Runs calc_bpd_loop over `split` batch by batch, writing out_dir/batch_XXXXX.npz with, for the real
    images of the batch only: total_bpd [b], prior_bpd [b], terms_bpd [b,T], mse [b,T] (float32).
    Existing batch files are skipped; batch b uses the key fold_in(EVAL_NLL key of the seed, b). Returns True
    when every batch is written.
    make_batch_fn: another per-image estimate instead of the bound, `make_batch_fn(sharding) -> jitted
    (params, x [B,H,W,C], rng) -> dict of [B, ...] arrays` (the ODE likelihood, `ode_batch_fn`)."""
    batch_size = int(config.eval.batch_size)
    mesh = parallel.make_mesh()
    parallel.check_global_batch(batch_size, mesh)
    sharding = parallel.data_sharding(mesh)
    common.check_diffusion_supported(config, 'nll')
    num_timesteps = int(config.diffusion.num_diffusion_timesteps)
    source = data.load_source(config, split)
    num_images = min(len(source), int(config.eval.num_images) or len(source))
    num_batches = -(-num_images // batch_size)
    counter = progress_lib.TimestepCounter(np.arange(num_timesteps), progress_lib.Progress(
        f'NLL over {num_batches} batches of {batch_size}', num_batches * num_timesteps, unit='steps'))
    batch_fn = _bound_batch_fn(config, apply_fn, sharding, counter) if make_batch_fn is None else make_batch_fn(
        sharding)
    params = common.replicated(params, mesh)
    base_key = common.seed_key(config, rng_streams.EVAL_NLL)
    for b, images, mask in pending_batches(config, out_dir, split, batch_size, source):
        counter.offset = b * num_timesteps
        x = parallel.shard_batch(np.asarray(images, np.float32), mesh)
        global_mask = parallel.to_host(parallel.shard_batch(np.asarray(mask, bool), mesh))
        out = parallel.to_host(batch_fn(params, x, jax.random.fold_in(base_key, b)))
        if jax.process_index() == 0:
            common.write_npz(_batch_path(out_dir, b), **{k: np.asarray(v, np.float32)[global_mask]
                                                         for k, v in out.items()})
        logging.info('NLL batch %d / %d done (%d real images)', b + 1, num_batches, int(global_mask.sum()))
    return all(os.path.exists(_batch_path(out_dir, b)) for b in range(num_batches))


def load_nll_results(out_dir: str) -> dict:
    """Concatenates the batch files of `nll_batches`: total_bpd [N], prior_bpd [N], terms_bpd [N,T], mse [N,T]."""
    paths = sorted(glob.glob(os.path.join(out_dir, 'batch_*.npz')))
    if not paths:
        raise FileNotFoundError(f'no NLL batch files in {out_dir}; run --mode=eval first')
    parts = [dict(np.load(p)) for p in paths]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _mean_and_stderr(values: np.ndarray) -> dict:
    n = values.shape[0]
    return dict(num_images=int(n), nll_bpd=float(values.mean()),
                nll_bpd_stderr=float(values.std(ddof=1) / np.sqrt(n)) if n > 1 else float('nan'))


def summarize_nll(results: dict) -> dict:
    """Mean bound with its standard error and the averaged terms (paper indexing: L_0 = code t=0 decoder,
    L_t = code term t for t >= 1, L_T = prior)."""
    terms = results['terms_bpd'].astype(np.float64)
    prior = results['prior_bpd'].astype(np.float64)
    return dict(
        **_mean_and_stderr(results['total_bpd'].astype(np.float64)),
        distortion_L0_bpd=float(terms[:, 0].mean()),
        rate_L1_to_LT_bpd=float((terms[:, 1:].sum(axis=1) + prior).mean()),
        prior_LT_bpd=float(prior.mean()),
        terms_bpd_mean=terms.mean(axis=0).tolist(),
        mse_mean=results['mse'].astype(np.float64).mean(axis=0).tolist(),
    )


def _nll_dir(config, workdir: str, step: int) -> str:
    split = common.eval_split(config)
    settings = dict(split=split, step=step, seed=int(config.seed), batch_size=int(config.eval.batch_size),
                    num_images=int(config.eval.num_images), clip_denoised=bool(config.sampling.clip_denoised),
                    **common.eval_settings(config))
    return common.output_dir(workdir, f'nll_{split}_step{step}_{common.eval_tag(config)}_seed{config.seed}',
                             settings)


def run_nll(config, workdir: str) -> tuple[dict | None, str]:
    """Computes (or resumes) the NLL bound batches of workdir/nll_<split>_step<S>_<eval_tag>_seed<seed>/ and
    writes nll.json there; returns (summary, or None when not every batch is written, out_dir)."""
    common.check_diffusion_supported(config, 'nll')  # before reading a checkpoint
    apply_fn, params, step = common.load_model(config, workdir)
    out_dir, split = _nll_dir(config, workdir, step), common.eval_split(config)
    if not nll_batches(config, out_dir, apply_fn, params, split):
        return None, out_dir
    summary = summarize_nll(load_nll_results(out_dir))
    summary.update(split=split, step=step)
    if jax.process_index() == 0:
        common.write_json(os.path.join(out_dir, 'nll.json'), summary)
    return summary, out_dir


def ode_batch_fn(config, apply_fn: Callable) -> Callable:
    """make_batch_fn for `nll_batches`: bits/dim under the probability-flow ODE (`score.ode_log_likelihood`) of
    the uniformly dequantised images (score_sde's convention, `score.dequantize` / `score.bits_per_dim`).

    Returns sharding -> jitted (params, x [B,H,W,C] in [-1, 1], rng) -> dict(ode_bpd [B], nfe [B] (the batch's
    NFE, repeated)); rng draws the dequantisation noise and the Hutchinson probes.
    """
    d = diffusion_lib.diffusion_from_config(config)
    sampling, ev = config.sampling, config.eval
    dims = int(np.prod(common.image_shape(config)))
    kwargs = dict(divergence=str(ev.divergence), num_probes=int(ev.num_probes), solver=str(sampling.ode_solver),
                  rtol=float(sampling.ode_rtol), atol=float(sampling.ode_atol),
                  num_steps=int(sampling.num_steps or d.num_timesteps))

    def make(sharding):
        @xla_cpu.jit
        def batch_fn(params, x, rng):
            dequant_key, probe_key = jax.random.split(rng)
            x = jax.lax.with_sharding_constraint(
                score.dequantize(x, jax.random.uniform(dequant_key, x.shape, x.dtype)), sharding)
            out = score.ode_log_likelihood(d, common.constrained_model_fn(apply_fn, params, sharding), x,
                                           probe_key, **kwargs)
            bpd = jax.lax.with_sharding_constraint(score.bits_per_dim(out['logp'], dims), sharding)
            return dict(ode_bpd=bpd, nfe=jnp.full(bpd.shape, out['nfe'], jnp.float32))
        return batch_fn

    return make


def run_ode_nll(config, workdir: str) -> tuple[dict | None, str]:
    """Mode 'eval' with config.eval.likelihood='ode':
    workdir/nll_ode_<split>_step<S>_<divergence><probes>_<solver>_<eval_tag>_seed<seed>/nll_ode.json with nll_bpd
    (mean bits/dim of the dequantised data), its standard error, nfe_mean (per batch of config.eval.batch_size
    images), num_images; per-image values in the batch files. Returns (summary or None when not every batch is
    written, out_dir)."""
    apply_fn, params, step = common.load_model(config, workdir)
    split, ev = common.eval_split(config), config.eval
    probes = '' if ev.divergence == 'exact' else str(int(ev.num_probes))
    tag = (f'{split}_step{step}_{ev.divergence}{probes}_{sample_lib.ode_tag(config)}_{common.eval_tag(config)}'
           f'_seed{config.seed}')
    settings = dict(split=split, step=step, seed=int(config.seed), batch_size=int(ev.batch_size),
                    num_images=int(ev.num_images), divergence=str(ev.divergence), num_probes=int(ev.num_probes),
                    **sample_lib.score_settings(config), **common.eval_settings(config))
    out_dir = common.output_dir(workdir, f'nll_ode_{tag}', settings)
    if not nll_batches(config, out_dir, apply_fn, params, split, make_batch_fn=ode_batch_fn(config, apply_fn)):
        return None, out_dir
    results = load_nll_results(out_dir)
    summary = dict(settings, likelihood='ode', **_mean_and_stderr(results['ode_bpd'].astype(np.float64)),
                   nfe_mean=float(results['nfe'].astype(np.float64).mean()))
    if jax.process_index() == 0:
        common.write_json(os.path.join(out_dir, 'nll_ode.json'), summary)
    return summary, out_dir


def run(config, workdir: str) -> dict | None:
    """Mode 'eval': workdir/nll_<split>_step<S>_<eval_tag>_seed<seed>/nll.json (see summarize_nll), or with
    config.eval.likelihood='ode' the probability-flow ODE's nll_ode.json (see run_ode_nll). None when not every
    batch was written."""
    if config.eval.likelihood not in ('bound', 'ode'):
        raise ValueError(f"config.eval.likelihood={config.eval.likelihood!r}; allowed: 'bound' (the variational "
                         "bound) or 'ode' (the probability-flow ODE)")
    ode = config.eval.likelihood == 'ode'
    summary, out_dir = (run_ode_nll if ode else run_nll)(config, workdir)
    if summary is not None:
        logging.info('%sNLL %s: %.5f +- %.5f bits/dim over %d images%s (%s)', 'ODE ' if ode else '',
                     summary['split'], summary['nll_bpd'], summary['nll_bpd_stderr'], summary['num_images'],
                     f', {summary["nfe_mean"]:.0f} NFE per batch' if ode else '', out_dir)
    return summary


# ----------------------------------------------------------------------------------------------- Table 4, Fig. 5

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


def line_plot(path: str, xs: np.ndarray, ys: np.ndarray, *, title: str, xlabel: str, ylabel: str) -> None:
    """A line plot of ys [n] against xs [n] with linear axes (as the paper's Fig. 5), written atomically."""
    from matplotlib import figure as mpl_figure  # imported when plotting: it adds ~0.3 s to every start-up
    figure = mpl_figure.Figure(figsize=(4.8, 3.6))
    axis = figure.subplots()
    axis.plot(np.asarray(xs, np.float64), np.asarray(ys, np.float64))
    axis.set(title=title, xlabel=xlabel, ylabel=ylabel)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    common.save_figure(path, figure)


def _write_rate_distortion(out_dir: str, curve: dict) -> None:
    """rate_distortion.csv (every reverse step), table4.csv (every T/10 steps, as the paper's Table 4) and the
    three panels of Fig. 5 (rate and distortion against reverse steps, distortion against rate)."""
    header = ['reverse_step', 'timestep', 'rate_bpd', 'distortion_rmse']
    rows = list(zip(*(curve[k].tolist() for k in header)))
    common.write_csv(os.path.join(out_dir, 'rate_distortion.csv'), header, rows)
    every = max(len(rows) // 10, 1)
    common.write_csv(os.path.join(out_dir, 'table4.csv'), header, rows[every - 1::every][::-1])
    steps, rate, distortion = curve['reverse_step'], curve['rate_bpd'], curve['distortion_rmse']
    line_plot(os.path.join(out_dir, 'rate_vs_step.png'), steps, rate, title='Rate',
              xlabel='reverse process steps (T - t)', ylabel='rate (bits/dim)')
    line_plot(os.path.join(out_dir, 'distortion_vs_step.png'), steps, distortion, title='Distortion',
              xlabel='reverse process steps (T - t)', ylabel='distortion (RMSE, [0, 255])')
    line_plot(os.path.join(out_dir, 'distortion_vs_rate.png'), rate, distortion, title='Rate-distortion',
              xlabel='rate (bits/dim)', ylabel='distortion (RMSE, [0, 255])')


def run_rate_distortion(config, workdir: str) -> dict:
    """Mode 'rate_distortion': runs/reuses the eval NLL batches, then writes Table 4 and Fig. 5 (see
    _write_rate_distortion) beside nll.json."""
    summary, out_dir = run_nll(config, workdir)
    results = load_nll_results(out_dir)
    curve = rate_distortion_curve(results['terms_bpd'], results['prior_bpd'], results['mse'])
    if jax.process_index() == 0:
        _write_rate_distortion(out_dir, curve)
    return dict(out_dir=out_dir, nll=summary, **{k: v.tolist() for k, v in curve.items()})


MODES = {'eval': run, 'rate_distortion': run_rate_distortion}
