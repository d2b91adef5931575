"""Tests of --mode=watch (ddpm_jax.evaluation.watch), the training loop's periodic test loss, the FID input guard
and the FID repeats, on a tiny random U-Net over the 8x8 digits (T = 10)."""
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from test_evaluate import _random_params, _tiny_config  # the tiny model of the evaluation tests

from ddpm_jax import checkpoint, diffusion, evaluation, fid, schedules
from ddpm_jax.evaluation import fid as fid_mode, sample as sample_mode, watch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------------- test loss

def test_test_loss_matches_numpy_float64():
    """L_simple of fixed batches against a float64 numpy re-derivation of q_sample and the eps MSE, with a
    linear stand-in for the network and padding rows masked out."""
    num_timesteps = 10
    betas = schedules.get_beta_schedule('linear', beta_start=1e-3, beta_end=0.2, num_diffusion_timesteps=num_timesteps)
    d = diffusion.make_diffusion(betas, model_mean_type='eps', model_var_type='fixedlarge', loss_type='mse')
    rng = np.random.default_rng(0)
    x_start = rng.uniform(-1, 1, size=(2, 3, 4, 4, 1)).astype(np.float32)
    mask = np.array([[True, True, True], [True, False, False]])
    t, noise = watch.fixed_t_and_noise(jax.random.PRNGKey(3), num_timesteps, x_start.shape)
    assert t.shape == (2, 3) and noise.shape == x_start.shape and len(np.unique(np.asarray(t))) > 1

    def model_fn(x, tt):
        return 0.3 * x + 0.01 * tt.astype(np.float32)[:, None, None, None]

    got = float(jax.jit(lambda *a: watch.test_loss(d, model_fn, *a))(x_start, mask, t, noise))

    alphas_cumprod = np.cumprod(1.0 - np.asarray(betas, np.float64))
    t64, noise64, x64 = np.asarray(t), np.asarray(noise, np.float64), x_start.astype(np.float64)
    a = alphas_cumprod[t64][..., None, None, None]
    x_t = np.sqrt(a) * x64 + np.sqrt(1 - a) * noise64
    eps_pred = 0.3 * x_t + 0.01 * t64[..., None, None, None]
    per_image = ((noise64 - eps_pred) ** 2).mean(axis=(2, 3, 4))
    want = per_image[mask].mean()
    assert got == pytest.approx(want, rel=2e-6)   # float32 sums of 16 squares per image
    # Same t and noise from the same key: the loss is a fixed function of the params.
    t2, noise2 = watch.fixed_t_and_noise(jax.random.PRNGKey(3), num_timesteps, x_start.shape)
    np.testing.assert_array_equal(np.asarray(t2), t64)
    np.testing.assert_array_equal(np.asarray(noise2), np.asarray(noise))


def test_every_k_selection_and_proxy_label():
    config = _tiny_config()
    config.training.checkpoint_every_steps = 10
    config.watch.every_k = 3
    assert [s for s in range(10, 101, 10) if watch.selected(s, config, 100)] == [30, 60, 90, 100]
    config.watch.every_k = 1
    assert all(watch.selected(s, config, 100) for s in (7, 10, 20))   # also off-cadence (preemption) saves
    config.diffusion.num_diffusion_timesteps = 1000
    config.watch.update(dict(num_samples=50_000, sampler='ancestral', num_steps=0))
    assert watch.fid_label(config) == (False, 'FID (50000 samples, ancestral 1000 steps)')
    for overrides in (dict(num_samples=49_999), dict(num_steps=999)):
        proxy_config = config.copy_and_resolve_references()
        proxy_config.watch.update(overrides)
        proxy, label = watch.fid_label(proxy_config)
        assert proxy and label.startswith('FID proxy (') and 'the paper: 50000 samples, T=1000' in label


# ----------------------------------------------------------------------------------------------- FID guard, repeats

def test_fid_guard_rejects_float_samples_wrong_shapes_and_counts(tmp_path):
    good = np.zeros((6, 8, 8, 1), np.uint8)
    fid_mode.check_fid_samples(good, image_shape=(8, 8, 1), num_samples=6, source='s.npz')
    for samples, message in [(good.astype(np.float32) / 127.5 - 1, r'float32 samples; FID needs uint8'),
                             (good[..., 0], r'shape \(6, 8, 8\); this config needs \[N, 8, 8, 1\]'),
                             (np.zeros((6, 8, 8, 3), np.uint8), r'needs \[N, 8, 8, 1\]'),
                             (good[:5], r'holds 5 samples, not config.sampling.num_samples=6')]:
        with pytest.raises(ValueError, match=message):
            fid_mode.check_fid_samples(samples, image_shape=(8, 8, 1), num_samples=6, source='s.npz')
    # The fid mode refuses a float samples.npz before any Inception work.
    config = _tiny_config()
    config.sampling.num_samples = 6
    config.eval.checkpoint_step = 7
    out_dir = sample_mode.samples_dir(config, str(tmp_path), 7)
    os.makedirs(out_dir)
    np.savez(os.path.join(out_dir, 'samples.npz'), samples=good.astype(np.float32))
    with pytest.raises(ValueError, match='samples.npz holds float32 samples'):
        evaluation.get('fid')(config, str(tmp_path))


def _fake_inception(tmp_path):
    """A stand-in for the Inception network: the 64 pixels in [-1, 1] as features (2048-d Frechet distances take
    minutes on a loaded CPU)."""
    def fn(images):
        images = np.asarray(images)
        x = images.astype(np.float64) / 127.5 - 1 if images.dtype == np.uint8 else images.astype(np.float64)
        return dict(pool=x.reshape(len(x), -1))
    weights = tmp_path / 'fake.pt'
    weights.write_bytes(b'fake')
    return dict(fn=fn, weights=str(weights), sha256='f' * 64, batch_size=4)


def test_fid_repeats_use_disjoint_seeds_and_report_mean_min_std(tmp_path, monkeypatch):
    config = _tiny_config()
    config.seed, config.sampling.num_samples, config.eval.checkpoint_step = 5, 6, 7
    config.eval.fid_repeats, config.eval.fid_num_reference_images = 3, 12
    assert [c.seed for c in fid_mode.fid_repeat_configs(config)] == [5, 6, 7]
    rng = np.random.default_rng(0)
    sets = {}
    for seed in (5, 6, 7):
        repeat_config = config.copy_and_resolve_references()
        repeat_config.seed = seed
        out_dir = sample_mode.samples_dir(repeat_config, str(tmp_path), 7)
        os.makedirs(out_dir)
        sets[seed] = rng.integers(0, 256, size=(6, 8, 8, 1), dtype=np.uint8)
        np.savez(os.path.join(out_dir, 'samples.npz'), samples=sets[seed])
    fake = _fake_inception(tmp_path)
    monkeypatch.setattr(fid_mode, 'load_fid_inception', lambda config: fake)
    result = evaluation.get('fid')(config, str(tmp_path))

    from ddpm_jax import data
    references = {role: data.to_model_range(data.load_source(config, role)[np.arange(12)]).astype(np.float64)
                  for role in ('train', 'test')}

    def stats(x):   # float64 numpy mean and covariance of the fake features
        features = fake['fn'](x)['pool']
        return features.mean(axis=0), np.cov(features, rowvar=False)

    assert result['seeds'] == [5, 6, 7]
    for role in ('train', 'test'):
        runs = [fid.frechet_distance(*stats(sets[seed]), *stats(references[role])) for seed in (5, 6, 7)]
        # 6 and 12 points in 64 dims: rank-deficient covariances, see test_fid (relative error ~1e-8).
        np.testing.assert_allclose(result[f'fid_{role}_runs'], runs, rtol=1e-6)
        assert len(set(runs)) == 3
        assert result[f'fid_{role}'] == pytest.approx(np.mean(runs), rel=1e-6)
        assert result[f'fid_{role}_min'] == pytest.approx(np.min(runs), rel=1e-6)
        assert result[f'fid_{role}_std'] == pytest.approx(np.std(runs), rel=1e-6)
    with open(os.path.join(os.path.dirname(result['samples']), 'fid.json')) as f:
        assert json.load(f)['fid_train_runs'] == result['fid_train_runs']
    # A missing repeat names the seed to sample.
    config.eval.fid_repeats = 4
    with pytest.raises(FileNotFoundError, match='--config.seed=8'):
        evaluation.get('fid')(config, str(tmp_path))


# ----------------------------------------------------------------------------------------------- the watch, in process

def _watch_config():
    config = _tiny_config()
    config.training.checkpoint_every_steps = 2
    config.training.num_train_steps = 6
    config.watch.update(dict(num_samples=8, sampler='ddim', num_steps=5, nll_images=6, loss_batches=2,
                             poll_seconds=0.05, timeout=1.0, last_step=2))
    config.eval.fid_num_reference_images = 12
    return config


@pytest.mark.slow
def test_watch_scores_skips_scored_and_removed_checkpoints_and_equals_the_modes(tmp_path, monkeypatch, caplog):
    config = _watch_config()
    workdir = str(tmp_path / 'run')
    # One point here (every scoring compiles its loops, tens of seconds on a loaded CPU); the two-process test
    # below scores several.
    checkpoint.save_params_only(workdir, _random_params(config), config, 2)
    fake = _fake_inception(tmp_path)
    monkeypatch.setattr(fid_mode, 'load_fid_inception', lambda config: fake)
    points = watch.run(config, workdir)
    assert [p['step'] for p in points] == [2]
    assert points[0]['fid_proxy'] and points[0]['fid_note'].startswith('FID proxy (8 samples, ddim 5 steps')
    assert all(np.isfinite(points[0][k]) for k in ('test_loss', 'nll_bpd', 'fid_train', 'fid_test'))

    # The curve's values are those of the standalone modes on the same checkpoint and settings.
    for point in points:
        mode_config = watch.nll_config(config)
        assert mode_config.eval.num_images == 6 and mode_config.eval.batch_size == 4
        mode_config.eval.checkpoint_step = point['step']
        assert evaluation.get('eval')(mode_config, workdir)['nll_bpd'] == point['nll_bpd']
        mode_config = watch.sample_config(mode_config)
        evaluation.get('sample')(mode_config, workdir)
        fid_result = evaluation.get('fid')(mode_config, workdir)
        assert fid_result['fid_train'] == point['fid_train'] and fid_result['fid_test'] == point['fid_test']
    with open(tmp_path / 'run' / 'watch' / 'curve.csv') as f:
        rows = f.read().splitlines()
    assert rows[0].split(',')[:3] == ['step', 'test_loss', 'nll_bpd'] and len(rows) == 2
    assert os.path.getsize(tmp_path / 'run' / 'watch' / 'curve.png') > 0
    assert os.listdir(tmp_path / 'run' / 'tensorboard' / 'watch')
    assert os.path.isfile(tmp_path / 'run' / 'watch' / 'samples' / 'step2_seed0' / 'samples_grid.png')

    # Restart: step 2 is skipped (scored); step 4 is new, but retention removes it while it is being read.
    def failing_score(self, step, params):
        raise AssertionError(f'step {step} scored again')
    monkeypatch.setattr(watch.Scorer, 'score', failing_score)
    checkpoint.save_params_only(workdir, _random_params(config), config, 4)
    restore = checkpoint.restore_ema_params

    def retention_deletes(workdir_, config_, step=None):
        shutil.rmtree(os.path.join(checkpoint.checkpoint_dir(workdir_), str(step)))
        return restore(workdir_, config_, step=step)
    monkeypatch.setattr(checkpoint, 'restore_ema_params', retention_deletes)
    config.watch.last_step = 4
    with caplog.at_level(logging.WARNING):
        again = watch.run(config, workdir)
    assert 'Checkpoint step 4 was removed (checkpoint retention) while it was being read: skipped' in caplog.text
    assert [p['step'] for p in again] == [2]
    assert _same(watch.read_curve(str(tmp_path / 'run' / 'watch')), points)


def _same(a, b):
    """Equal point lists (NaN equal to NaN)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


# ----------------------------------------------------------------------------------------------- two processes

# configs/digits.py:tiny (1-level U-Net (ch 32), T = 20) run on one device with the digits run's EMA: a checkpoint
# and a test loss every 10 steps.
_TINY_RUN = ['--config=configs/digits.py:tiny', '--config.training.batch_size=16', '--config.optim.warmup_steps=5',
             '--config.optim.lr=2e-3', '--config.optim.ema_decay=0.999', '--config.optim.ema_warmup=True',
             '--config.training.num_train_steps=20', '--config.training.checkpoint_every_steps=10',
             '--config.training.eval_every_steps=10', '--config.training.log_every_steps=10',
             '--config.training.sample_every_steps=1500', '--config.training.num_grid_samples=0',
             '--config.training.keep_latest=5', '--config.eval.batch_size=16', '--config.watch.loss_batches=1',
             '--config.watch.nll_images=8', '--config.watch.num_samples=0', '--config.watch.poll_seconds=0.5',
             '--config.watch.timeout=600', '--config.watch.num_steps=5']   # the default 100 is refused for T = 20


def _start_cli(workdir, mode, log_path):
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1',
               PYTHONPATH=os.pathsep.join([REPO_ROOT, os.environ.get('PYTHONPATH', '')]))
    with open(log_path, 'w') as log:
        return subprocess.Popen([sys.executable, '-m', 'ddpm_jax.main', f'--workdir={workdir}', f'--mode={mode}',
                                 *_TINY_RUN], cwd=REPO_ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_watch_follows_a_concurrent_training_run_and_matches_its_test_loss(tmp_path):
    workdir = tmp_path / 'run'
    logs = {name: tmp_path / f'{name}.log' for name in ('watch', 'train')}
    started = {}
    try:
        started['watch'] = _start_cli(workdir, 'watch', logs['watch'])   # first: it waits for checkpoints
        started['train'] = _start_cli(workdir, 'train', logs['train'])
        for name in ('train', 'watch'):
            try:
                started[name].wait(timeout=600)
            except subprocess.TimeoutExpired:
                pytest.fail(f'{name} still running after 600 s:\n{logs[name].read_text()[-3000:]}')
            assert started[name].returncode == 0, f'{name} failed:\n{logs[name].read_text()[-4000:]}'
    finally:
        for proc in started.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
    points = watch.read_curve(str(workdir / 'watch'))
    assert [p['step'] for p in points] == [10, 20]
    logged = {int(step): float(value) for step, value in
              re.findall(r'step (\d+)/20 \|.* test_loss ([0-9.]+) \(EMA\)', logs['train'].read_text())}
    assert sorted(logged) == [10, 20], logs['train'].read_text()[-3000:]
    for point in points:
        # The same function on the same EMA params (in memory vs restored): equal up to the 6 printed decimals.
        assert abs(point['test_loss'] - logged[point['step']]) <= 5e-7
        assert np.isfinite(point['nll_bpd']) and point['fid_note'] == 'FID skipped: config.watch.num_samples=0'
    assert 'FID skipped: config.watch.num_samples=0' in logs['watch'].read_text()


@pytest.mark.slow
def test_quality_per_compute_smoke_and_summarize(tmp_path):
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1',
               PYTHONPATH=os.pathsep.join([REPO_ROOT, os.environ.get('PYTHONPATH', '')]))
    script = os.path.join(REPO_ROOT, 'experiments', 'quality_per_compute.py')
    out = tmp_path / 'row.json'
    started = time.monotonic()
    result = subprocess.run([sys.executable, script, '--smoke', '--steps=10', f'--workdir={tmp_path / "run"}',
                             f'--out={out}', f'--config.eval.inception_weights={tmp_path / "missing.pt"}'],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    row = json.loads(out.read_text())
    assert row['steps'] == 10 and row['images_seen'] == 160 and row['devices'] == 1 and row['smoke']
    assert row['train_device_minutes'] == pytest.approx(row['train_wall_minutes'])
    assert 0 < row['train_wall_minutes'] < (time.monotonic() - started) / 60
    assert np.isfinite(row['nll_bpd']) and np.isfinite(row['test_loss'])
    assert row['fid_proxy'] and row['fid_note'].startswith('FID skipped: FID Inception weights')
    assert row['fid_train'] is None and row['fid_test'] is None   # not computed: null, not NaN
    assert row['sampler'] == 'ddim5' and row['num_samples'] == 8
    assert row['config'] == os.path.join('configs', 'digits.py')
    table = subprocess.run([sys.executable, script, '--summarize', str(out), str(out)], cwd=REPO_ROOT, env=env,
                           capture_output=True, text=True, timeout=300, check=True).stdout
    lines = table.strip().splitlines()
    assert lines[0].startswith('| config | device | devices | steps | images seen') and len(lines) == 4
    assert '| 10 | 160 |' in lines[2]
