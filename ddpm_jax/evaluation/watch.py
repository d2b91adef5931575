"""Mode 'watch': scores every new checkpoint of a run while it trains (the official code ran such an
evaluation worker beside its TPU trainer), and the fixed test loss that training also logs.

    python -m ddpm_jax.main --mode=watch --config=<the run's config> --workdir=<the run's workdir>

Run it beside training (another device or host with the same workdir) or after it. Each poll lists the steps
through orbax's manager (read-only: it never writes, locks or deletes, so the trainer's saves are never held
up), skips the steps already in the curve file and those not selected by config.watch.every_k, and for each
new one, with fixed seeds so that points are comparable:
  * test_loss: L_simple (paper Eq. 14) of the EMA params on the first config.watch.loss_batches eval batches,
    with t and noise fixed by the seed (`test_loss`; training logs the same number every
    training.eval_every_steps);
  * nll_bpd: the variational bound in bits/dim (paper Sec. 4.2) over the first config.watch.nll_images eval
    images, exactly as `--mode=eval` with the `nll_config` overrides (eval.num_images = nll_images, eval.batch_size
    at most nll_images): same batches and keys;
  * fid_train, fid_test (and the Inception Score where the weights have logits): config.watch.num_samples
    samples of config.watch.sampler / num_steps, exactly those of `--mode=sample` with these settings, against
    the cached reference statistics of `--mode=fid`; labelled a proxy when N < 50,000 or steps < T (paper
    Sec. 4: 50,000 samples, T = 1000 ancestral steps). Without Inception weights FID is skipped, with the reason.
Outputs (workdir/watch/): curve.csv and curve.json (rewritten atomically after each point), curve.png (FID,
bits/dim and test loss against step), samples/step<S>_seed<seed>/samples_grid.png; TensorBoard scalars under
workdir/tensorboard/watch. A restart skips scored steps. A checkpoint that retention deletes while it is read
is skipped with a warning. The watch stops after config.watch.last_step (default training.num_train_steps), or
after config.watch.timeout seconds without a new checkpoint.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import textwrap
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from ddpm_jax import checkpoint, data, diffusion as diffusion_lib, losses, parallel, rng_streams, xla_cpu
from ddpm_jax.evaluation import common, fid as fid_mode, nll, sample as sample_lib

PAPER_FID_SAMPLES = 50_000
CURVE_COLUMNS = ('step', 'test_loss', 'nll_bpd', 'nll_bpd_stderr', 'fid_train', 'fid_test', 'inception_score',
                 'fid_proxy', 'fid_note', 'num_samples', 'sampler', 'seconds')


# ----------------------------------------------------------------------------------------------- test loss

def fixed_t_and_noise(key: jax.Array, num_timesteps: int, shape: tuple) -> tuple[jax.Array, jax.Array]:
    """t int32 [L, B] uniform in {0..T-1} from fold_in(key, 0), noise float32 shape = [L, B, H, W, C] from
    fold_in(key, 1). The values do not depend on how the arrays are sharded (threefry is partitionable)."""
    t = jax.random.randint(jax.random.fold_in(key, 0), tuple(shape[:2]), 0, num_timesteps)
    return t, jax.random.normal(jax.random.fold_in(key, 1), tuple(shape), jnp.float32)


def test_loss(d, model_fn: Callable, x_start: jax.Array, mask: jax.Array, t: jax.Array,
              noise: jax.Array) -> jax.Array:
    """Mean L_simple over the real images of fixed batches (pure).

    x_start, noise: [L, B, H, W, C] in [-1, 1] / N(0, I); mask bool [L, B] (False: padding); t int [L, B].
    Per image: training_losses at x_t = q_sample(x_start, t, noise) (for eps/mse: mean (eps - eps_theta)^2);
    returns sum(mask * loss) / sum(mask), a float32 scalar."""
    def batch_loss(inputs):
        x, t_batch, eps = inputs
        x_t = diffusion_lib.q_sample(d, x, t_batch, eps)
        return losses.training_losses(d, model_fn(x_t, t_batch), x, x_t, t_batch, eps)

    batch_losses = jax.lax.map(batch_loss, (x_start, t, noise))   # [L, B]
    weights = mask.astype(jnp.float32)
    return jnp.sum(batch_losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def make_test_loss_fn(config, apply_fn: Callable, mesh) -> Callable:
    """params (replicated over mesh) -> float: `test_loss` on the first config.watch.loss_batches global batches
    of config.eval.batch_size images of the eval split (data.eval_batches, this host's rows), t and noise
    `fixed_t_and_noise(fold_in(PRNGKey(seed), EVAL_TEST_LOSS))`. Used by training and by the watch."""
    num_batches, batch_size = int(config.watch.loss_batches), int(config.eval.batch_size)
    if num_batches < 1:
        raise ValueError(f'config.watch.loss_batches={num_batches} must be >= 1.')
    parallel.check_global_batch(batch_size, mesh)
    split = common.eval_split(config)
    images, masks = [], []
    for batch_images, batch_mask in data.eval_batches(config, split, batch_size,
                                                      num_images=num_batches * batch_size):
        images.append(batch_images)
        masks.append(batch_mask)
    x = parallel.shard_batch(np.stack(images), mesh, batch_axis=1)
    mask = parallel.shard_batch(np.stack(masks), mesh, batch_axis=1)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, parallel.DATA_AXIS))
    d = diffusion_lib.diffusion_from_config(config)
    key = common.seed_key(config, rng_streams.EVAL_TEST_LOSS)
    global_shape = (len(images), batch_size) + tuple(images[0].shape[1:])

    @xla_cpu.jit
    def loss(params, x, mask):
        t, noise = fixed_t_and_noise(key, d.num_timesteps, global_shape)
        t = jax.lax.with_sharding_constraint(t, sharding)
        noise = jax.lax.with_sharding_constraint(noise, sharding)
        model_fn = common.constrained_model_fn(apply_fn, params, parallel.data_sharding(mesh))
        return test_loss(d, model_fn, x, mask, t, noise)

    return lambda params: float(parallel.to_host(loss(params, x, mask)))


# ----------------------------------------------------------------------------------------------- one point

def fid_label(config) -> tuple[bool, str]:
    """(is_proxy, label) of the watch's FID settings: a proxy when N < 50,000 or the sampler runs < T steps."""
    watch, num_timesteps = config.watch, int(config.diffusion.num_diffusion_timesteps)
    steps = int(watch.num_steps) or num_timesteps
    proxy = int(watch.num_samples) < PAPER_FID_SAMPLES or steps < num_timesteps
    what = f'{int(watch.num_samples)} samples, {watch.sampler} {steps} steps'
    return proxy, (f'FID proxy ({what}; the paper: {PAPER_FID_SAMPLES} samples, T={num_timesteps})' if proxy
                   else f'FID ({what})')


def sample_config(config):
    """config with config.sampling set from config.watch (num_samples, sampler, num_steps)."""
    config = config.copy_and_resolve_references()
    config.sampling.num_samples = int(config.watch.num_samples)
    config.sampling.sampler = config.watch.sampler
    config.sampling.num_steps = int(config.watch.num_steps)
    return config


def nll_config(config):
    """config for the watch's NLL bound: eval.num_images = watch.nll_images, and eval.batch_size no larger than
    needed (nll_images rounded up to the device count), so that a small subset is not padded to a large batch."""
    config = config.copy_and_resolve_references()
    num_images, num_devices = int(config.watch.nll_images), jax.device_count()
    config.eval.num_images = num_images
    config.eval.batch_size = min(int(config.eval.batch_size), -(-max(num_images, 1) // num_devices) * num_devices)
    return config


class Scorer:
    """Scores checkpoints of one run: holds the compiled test loss, the NLL and sampling settings and the
    Inception network (or why FID is skipped)."""

    def __init__(self, config, workdir: str, out_dir: str):
        self.config, self.workdir, self.out_dir = config, workdir, out_dir
        self.mesh = parallel.make_mesh()
        self.apply_fn = common.model_apply_fn(config)
        self.loss_fn = make_test_loss_fn(config, self.apply_fn, self.mesh)
        self.nll_config = nll_config(config)
        self.fid_proxy, self.fid_label = fid_label(config)
        self.inception, self.fid_skipped = None, ''
        if int(config.watch.num_samples) <= 0:
            self.fid_skipped = 'FID skipped: config.watch.num_samples=0'
        else:
            try:
                self.inception = fid_mode.load_fid_inception(config)
            except FileNotFoundError as error:
                self.fid_skipped = f'FID skipped: {error}'
        if self.fid_skipped:
            logging.warning('%s', self.fid_skipped)

    def score(self, step: int, params) -> dict:
        """One curve point for the EMA params of checkpoint `step` (see the module docstring)."""
        started = time.time()
        config = self.config
        point = dict(step=int(step), test_loss=self.loss_fn(params), sampler=f'{config.watch.sampler}'
                     f'{int(config.watch.num_steps) or config.diffusion.num_diffusion_timesteps}',
                     num_samples=int(config.watch.num_samples), fid_proxy=self.fid_proxy,
                     fid_note=self.fid_skipped or self.fid_label)
        point.update(nll_bpd=math.nan, nll_bpd_stderr=math.nan, fid_train=math.nan, fid_test=math.nan,
                     inception_score=math.nan)
        if int(config.watch.nll_images) > 0:
            nll_dir = os.path.join(self.out_dir, 'nll', f'step{step}')
            os.makedirs(nll_dir, exist_ok=True)
            split = common.eval_split(config)
            nll.nll_batches(self.nll_config, nll_dir, self.apply_fn, params, split)
            summary = nll.summarize_nll(nll.load_nll_results(nll_dir))
            point.update(nll_bpd=summary['nll_bpd'], nll_bpd_stderr=summary['nll_bpd_stderr'])
            shutil.rmtree(nll_dir, ignore_errors=True)
        if self.inception is not None:
            results = []
            for repeat_config in fid_mode.fid_repeat_configs(sample_config(config)):
                samples_dir = os.path.join(self.out_dir, 'samples', f'step{step}_seed{repeat_config.seed}')
                os.makedirs(samples_dir, exist_ok=True)
                written = sample_lib.generate_samples(repeat_config, samples_dir, self.apply_fn, params)
                with np.load(written['path']) as archive:
                    samples = archive['samples']
                fid_mode.check_fid_samples(samples, image_shape=common.image_shape(config),
                                           num_samples=int(config.watch.num_samples), source=written['path'])
                result = fid_mode.fid_of_samples(repeat_config, self.workdir, samples, self.inception)
                results.append(dict(result, seed=int(repeat_config.seed)))
                for name in os.listdir(samples_dir):   # the grid stays; the arrays are large
                    if name.endswith('.npz'):
                        os.remove(os.path.join(samples_dir, name))
            fid = fid_mode.summarize_fid_repeats(results)
            point.update(fid_train=fid['fid_train'], fid_test=fid['fid_test'],
                         inception_score=fid.get('inception_score', math.nan))
        point['seconds'] = time.time() - started
        return point


# ----------------------------------------------------------------------------------------------- the curve

def read_curve(out_dir: str) -> list[dict]:
    """The points of out_dir/curve.json (sorted by step), or [] when there is none."""
    path = os.path.join(out_dir, 'curve.json')
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        points = json.load(f)['points']
    return sorted(({k: math.nan if v is None else v for k, v in p.items()} for p in points), key=lambda p: p['step'])


def write_curve(out_dir: str, points: list[dict], settings: dict) -> None:
    """Rewrites curve.json ({settings, points}; values not computed are null) and curve.csv (CURVE_COLUMNS; 'nan')
    atomically, then curve.png."""
    strict = [{k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in p.items()} for p in points]
    common.write_json(os.path.join(out_dir, 'curve.json'), dict(settings=settings, points=strict))
    common.write_csv(os.path.join(out_dir, 'curve.csv'), list(CURVE_COLUMNS),
                     [[p.get(c, '') for c in CURVE_COLUMNS] for p in points])
    plot_curve(os.path.join(out_dir, 'curve.png'), points, title=settings['fid_label'])


def plot_curve(path: str, points: list[dict], *, title: str = '') -> None:
    """PNG with FID (train, test), bits/dim and test loss against training step (matplotlib), atomically."""
    from matplotlib import figure as mpl_figure  # imported when plotting: it adds ~0.3 s to every start-up
    steps = np.array([p['step'] for p in points], np.float64)
    panels = [('FID', [('fid_train', 'vs train'), ('fid_test', 'vs test')]),
              ('NLL bound (bits/dim)', [('nll_bpd', 'eval subset')]),
              ('test L_simple', [('test_loss', 'fixed t, noise')])]
    figure = mpl_figure.Figure(figsize=(5 * len(panels), 4))
    axes = figure.subplots(1, len(panels))
    for axis, (ylabel, series) in zip(axes, panels):
        for key, label in series:
            values = np.array([p.get(key, math.nan) for p in points], np.float64)
            if np.isfinite(values).any():
                axis.plot(steps, values, marker='o', label=label)
        if not axis.lines:
            note = points[-1].get('fid_note', '') if points and series[0][0] == 'fid_train' else ''
            axis.text(0.5, 0.5, textwrap.fill(note or 'not computed', 40), ha='center', va='center', fontsize=8,
                      transform=axis.transAxes)
        axis.set_xlabel('training step')
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
        if len(axis.lines) > 1:
            axis.legend()
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    common.save_figure(path, figure)


def _write_scalars(writer, point: dict) -> None:
    """The point's numbers under eval/* (the training writer logs eval/test_loss too: the runs overlay)."""
    fid_suffix = '_proxy' if point['fid_proxy'] else ''
    for key, tag in (('test_loss', 'eval/test_loss'), ('nll_bpd', 'eval/nll_bpd'),
                     ('fid_train', f'eval/fid_train{fid_suffix}'), ('fid_test', f'eval/fid_test{fid_suffix}'),
                     ('inception_score', 'eval/inception_score')):
        if math.isfinite(point[key]):
            writer.add_scalar(tag, point[key], point['step'])
    writer.flush()


# ----------------------------------------------------------------------------------------------- the loop

def selected(step: int, config, last_step: int) -> bool:
    """Whether the watch scores `step`: every checkpoint when every_k = 1, else the multiples of
    every_k * training.checkpoint_every_steps, and always the last step."""
    every = int(config.watch.every_k) * int(config.training.checkpoint_every_steps)
    return int(config.watch.every_k) <= 1 or step % every == 0 or step >= last_step


def list_steps(workdir: str) -> list[int]:
    """The finished checkpoint steps in workdir/checkpoints (orbax's manager, read-only), [] when none."""
    if not os.path.isdir(checkpoint.checkpoint_dir(workdir)):
        return []
    manager = checkpoint.make_manager(workdir, read_only=True)
    try:
        return sorted(int(s) for s in manager.all_steps())
    finally:
        manager.close()


def _read_params(config, workdir: str, step: int):
    """The EMA params of `step`, or None (with a warning) when the checkpoint vanished (retention) or is
    unreadable while being read."""
    try:
        params, _ = checkpoint.restore_ema_params(workdir, config, step=step)
        return params
    except (FileNotFoundError, checkpoint.CorruptCheckpointError, OSError) as error:
        if os.path.isdir(os.path.join(checkpoint.checkpoint_dir(workdir), str(step))):
            logging.warning('Checkpoint step %d could not be read (%s): skipped.', step, error)
        else:
            logging.warning('Checkpoint step %d was removed (checkpoint retention) while it was being read: '
                            'skipped. Raise training.keep_latest or watch.every_k to score every point.', step)
        return None


def settings_of(config) -> dict:
    """What makes points comparable; a curve file written with other settings is refused."""
    watch = config.watch
    return dict(seed=int(config.seed), num_samples=int(watch.num_samples), sampler=watch.sampler,
                num_steps=int(watch.num_steps), ddim_eta=float(config.sampling.ddim_eta),
                nll_images=int(watch.nll_images), loss_batches=int(watch.loss_batches),
                eval_batch_size=int(config.eval.batch_size), nll_batch_size=int(nll_config(config).eval.batch_size),
                fid_repeats=int(config.eval.fid_repeats),
                split=common.eval_split(config), fid_label=fid_label(config)[1])


def run(config, workdir: str) -> list[dict]:
    """Mode 'watch': scores new checkpoints until config.watch.last_step is done (see the module docstring).
    Returns the curve's points."""
    watch = config.watch
    last_step = int(watch.last_step) if int(watch.last_step) >= 0 else int(config.training.num_train_steps)
    out_dir = os.path.join(workdir, 'watch')
    settings = settings_of(config)
    common.output_dir(workdir, 'watch', settings)
    points = read_curve(out_dir)
    done = {p['step'] for p in points}
    if done:
        logging.info('Resuming the watch of %s: %d points already scored (last step %d).', workdir, len(done),
                     max(done))
    primary = jax.process_index() == 0
    scorer, writer = None, None
    skipped: set[int] = set()
    last_news = time.monotonic()
    try:
        while True:
            todo = [s for s in list_steps(workdir) if s not in done | skipped and selected(s, config, last_step)]
            for step in todo:
                last_news = time.monotonic()
                if scorer is None:
                    scorer = Scorer(config, workdir, out_dir)
                params = _read_params(config, workdir, step)
                if params is None:
                    skipped.add(step)
                    continue
                point = scorer.score(step, params)
                points = sorted(points + [point], key=lambda p: p['step'])
                done.add(step)
                logging.info('watch step %d | test_loss %.5f | NLL %.4f bits/dim | FID train %.3f test %.3f | '
                             '%s | %.0f s', step, point['test_loss'], point['nll_bpd'], point['fid_train'],
                             point['fid_test'], point['fid_note'], point['seconds'])
                if primary:
                    write_curve(out_dir, points, settings)
                    if writer is None:
                        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
                        writer = SummaryWriter(os.path.join(workdir, 'tensorboard', 'watch'))
                    _write_scalars(writer, point)
            if any(step >= last_step for step in done | skipped):
                break
            if time.monotonic() - last_news > float(watch.timeout):
                logging.warning('No new checkpoint in %s for %.0f s (config.watch.timeout): stopping before step %d.',
                                checkpoint.checkpoint_dir(workdir), float(watch.timeout), last_step)
                break
            time.sleep(float(watch.poll_seconds))
    finally:
        if writer is not None:
            writer.close()
    logging.info('watch done: %d points in %s', len(points), os.path.join(out_dir, 'curve.csv'))
    return points


MODES = {'watch': run}
