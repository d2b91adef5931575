"""Tests of ddpm_jax.validation: every bad config value is named with its key before anything touches the disk."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import multihost_worker

from ddpm_jax import config_files, train, validation

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')
MODES = ('train', 'sample', 'eval', 'fid', 'rate_distortion', 'progressive', 'shared_xt', 'interpolate', 'watch')

# (overrides of the tiny digits config (T = 20, ch 32, ch_mult (1,)), mode, the start of the problem line).
BAD_VALUES = [
    ({'diffusion.beta_schedule': 'linaer'}, 'train',
     "config.diffusion.beta_schedule='linaer': unknown; allowed: linear"),
    ({'diffusion.model_mean_type': 'noise'}, 'sample', "config.diffusion.model_mean_type='noise': unknown"),
    ({'diffusion.model_var_type': 'fixed'}, 'train', "config.diffusion.model_var_type='fixed': unknown"),
    ({'diffusion.loss_type': 'l1'}, 'train', "config.diffusion.loss_type='l1': unknown"),
    ({'diffusion.model_var_type': 'learned'}, 'train', "config.diffusion: loss_type='mse'"),
    ({'diffusion.num_diffusion_timesteps': 1}, 'train', 'config.diffusion.num_diffusion_timesteps=1: must be'),
    ({'diffusion.beta_end': 1.5}, 'train', 'config.diffusion.beta_end=1.5: must be a number in (0.0, 1.0]'),
    ({'diffusion.beta_start': 0.0}, 'train', 'config.diffusion.beta_start=0.0: must be a number in (0.0, 1.0]'),
    ({'sampling.sampler': 'euler'}, 'sample', "config.sampling.sampler='euler': unknown; allowed: ancestral, ddim"),
    ({'sampling.num_steps': 21}, 'sample', 'config.sampling.num_steps=21: must be an integer in [1, T=20]'),
    ({'sampling.num_steps': -1}, 'fid', 'config.sampling.num_steps=-1: must be an integer in [1, T=20]'),
    ({'sampling.num_samples': 0}, 'sample', 'config.sampling.num_samples=0: must be a positive integer'),
    ({'sampling.ddim_eta': -0.5}, 'sample', 'config.sampling.ddim_eta=-0.5'),
    ({'data.image_size': 7, 'model.ch_mult': (1, 2, 2)}, 'train',
     ('config.data.image_size=7: the U-Net halves the images 2 times (len(config.model.ch_mult)=3), so the size '
      'must be a multiple of 4')),
    ({'data.image_size': 0}, 'sample', 'config.data.image_size=0: must be a positive integer'),
    ({'data.name': 'imagenet'}, 'train', "config.data.name='imagenet': unknown; allowed: digits, folder"),
    ({'data.channels': 3}, 'train', 'config.data.channels=3: the digits are grayscale'),
    ({'data.channels': 4, 'data.name': 'folder'}, 'sample', 'config.data.channels=4: use 1 (grayscale) or 3'),
    ({'data.train_split': 'validation'}, 'train', "config.data.train_split='validation': not a digits split"),
    ({'eval.split': 'val'}, 'eval', "config.eval.split='val': not a digits split"),
    ({'data.name': 'folder', 'data.data_dir': ''}, 'train', "config.data.data_dir='': the 'folder' source needs"),
    ({'model.ch': 16}, 'train', 'config.model.ch=16: GroupNorm splits the features into 32 groups'),
    ({'model.ch': 0}, 'train', 'config.model.ch=0: must be a positive integer'),
    ({'model.ch_mult': ()}, 'train', 'config.model.ch_mult=(): must be a non-empty tuple of positive integers'),
    ({'model.ch_mult': (1, 0)}, 'sample', 'config.model.ch_mult=(1, 0): must be a non-empty tuple'),
    ({'model.num_res_blocks': -1}, 'train', 'config.model.num_res_blocks=-1: must be an integer >= 0'),
    ({'model.attn_resolutions': (16,)}, 'train', ('config.model.attn_resolutions=(16,): [16] never occur: with '
                                                  'image_size=8 and 1 levels the U-Net works at [8]')),
    ({'model.dropout': 1.0}, 'train', 'config.model.dropout=1.0: must be a number in [0.0, 1.0)'),
    ({'model.dtype': 'float16'}, 'sample', "config.model.dtype='float16': unknown; allowed: float32, bfloat16"),
    ({'model.attention': 'flash'}, 'train', "config.model.attention='flash': unknown"),
    ({'model.upsample': 'nearest'}, 'train', "config.model.upsample='nearest': unknown"),
    ({'model.conv3x3': 'fft'}, 'train', "config.model.conv3x3='fft': unknown; allowed: auto, xla, winograd"),
    ({'training.num_train_steps': 0}, 'train', 'config.training.num_train_steps=0: must be a positive integer'),
    ({'training.checkpoint_every_steps': -5}, 'train', 'config.training.checkpoint_every_steps=-5'),
    ({'training.steps_per_dispatch': 0}, 'train', 'config.training.steps_per_dispatch=0'),
    ({'training.keep_every': -1}, 'train', 'config.training.keep_every=-1: must be an integer >= 0'),
    ({'optim.ema_decay': 1.0}, 'train', 'config.optim.ema_decay=1.0: must be a number in [0.0, 1.0)'),
    ({'optim.lr': 0.0}, 'train', 'config.optim.lr=0.0: must be a number in (0.0, inf)'),
    ({'optim.warmup_steps': -1}, 'train', 'config.optim.warmup_steps=-1'),
    ({'eval.num_images': -1}, 'eval', 'config.eval.num_images=-1: must be an integer >= 0 (0 = the whole split)'),
    ({'eval.batch_size': 0}, 'rate_distortion', 'config.eval.batch_size=0'),
    ({'eval.checkpoint_step': -2}, 'progressive', 'config.eval.checkpoint_step=-2'),
    ({'eval.progressive_freq': 21}, 'progressive', 'config.eval.progressive_freq=21: larger than T=20'),
    # Choices that would sample or evaluate wrongly (samplers.check_supported), refused before any work.
    ({'diffusion.beta_schedule': 'jsd', 'training.num_grid_samples': 4}, 'train',
     "config.diffusion.model_mean_type='eps': the beta schedule ends"),
    ({'diffusion.beta_schedule': 'jsd'}, 'sample', "config.sampling.sampler='ancestral': the beta schedule ends"),
    ({'diffusion.beta_schedule': 'jsd'}, 'eval', "config.diffusion.model_mean_type='eps': the beta schedule ends"),
    ({'diffusion.beta_schedule': 'jsd'}, 'shared_xt', "config.diffusion.model_mean_type='eps': the beta"),
    ({'diffusion.model_var_type': 'learned', 'diffusion.loss_type': 'hybrid', 'sampling.num_steps': 5}, 'sample',
     "config.sampling.sampler='ancestral': model_var_type='learned' predicts the log-variance of one step"),
    ({'sampling.sampler': 'pc', 'sampling.snr': 0.0}, 'sample', 'config.sampling.snr=0.0: must be a number in'),
    ({'sampling.sampler': 'ode', 'sampling.ode_solver': 'rk4'}, 'sample', "config.sampling.ode_solver='rk4'"),
    ({'eval.likelihood': 'exact'}, 'eval', "config.eval.likelihood='exact': unknown"),
    ({'watch.sampler': 'euler', 'watch.num_steps': 10}, 'watch', "config.watch.sampler='euler': unknown"),
    ({'watch.num_steps': 21}, 'watch', 'config.watch.num_steps=21: must be an integer in [1, T=20]'),
    ({'training.eval_every_steps': -1}, 'train', 'config.training.eval_every_steps=-1: must be an integer >= 0'),
    ({'eval.likelihood': 'ode', 'eval.divergence': 'skilling'}, 'eval', "config.eval.divergence='skilling'"),
    ({'eval.shared_xt_timesteps': (5, 20)}, 'shared_xt', 'config.eval.shared_xt_timesteps=(5, 20): timesteps must be'),
    ({'eval.interp_timesteps': (-1,)}, 'interpolate', 'config.eval.interp_timesteps=(-1,)'),
    ({'eval.interp_indices': (0,)}, 'interpolate', 'config.eval.interp_indices=(0,): must be two image indices'),
    ({'eval.num_lambdas': 1}, 'interpolate', 'config.eval.num_lambdas=1'),
    ({'eval.fid_batch_size': 0}, 'fid', 'config.eval.fid_batch_size=0'),
    ({'eval.inception_weights': '/nonexistent/default_1.pt'}, 'fid',
     "config.eval.inception_weights='/nonexistent/default_1.pt': no such file"),
]


@pytest.mark.parametrize('overrides,mode,expected', BAD_VALUES, ids=[str(o) for o, _, _ in BAD_VALUES])
def test_each_bad_value_is_named_with_its_key(overrides, mode, expected):
    config = multihost_worker.tiny_config(**overrides)
    with pytest.raises(validation.ConfigError) as error:
        validation.validate_config(config, mode)
    assert str(error.value) == f'Bad config value: {validation.problems_of(config, mode)[0]}.'
    assert str(error.value).startswith(f'Bad config value: {expected}'), str(error.value)
    # A ValueError too (library callers catch those) and a UserError (main prints it as one line).
    assert isinstance(error.value, ValueError)


def test_every_problem_is_listed_at_once():
    config = multihost_worker.tiny_config(**{'diffusion.beta_schedule': 'linaer', 'sampling.sampler': 'euler',
                                             'sampling.num_steps': 50, 'data.image_size': 0})
    with pytest.raises(validation.ConfigError) as error:
        validation.validate_config(config, 'sample')
    lines = str(error.value).splitlines()
    assert lines[0] == '4 bad config values:'
    assert [line.split('=')[0].strip() for line in lines[1:]] == [
        'config.data.image_size', 'config.diffusion.beta_schedule', 'config.sampling.sampler',
        'config.sampling.num_steps']


def test_checks_follow_the_mode():
    """A bad sampler matters only to the modes that sample with it; a training value only to training."""
    bad_sampler = multihost_worker.tiny_config(**{'sampling.sampler': 'euler'})
    assert validation.problems_of(bad_sampler, 'train') == []
    assert len(validation.problems_of(bad_sampler, 'sample')) == 1
    bad_steps = multihost_worker.tiny_config(**{'training.num_train_steps': 0})
    assert validation.problems_of(bad_steps, 'eval') == []


def test_keys_an_older_config_lacks_are_not_problems():
    config = multihost_worker.tiny_config()
    del config.training['steps_per_dispatch']  # train.py reads it with a default of 1
    assert validation.problems_of(config, 'train') == []


@pytest.mark.parametrize('file_name', sorted(os.listdir(CONFIGS_DIR)))
def test_shipped_configs_pass_in_every_mode(file_name, monkeypatch):
    # Whether a TFDS dataset is prepared depends on the machine, not on the config.
    monkeypatch.setattr(validation, '_check_tfds_prepared', lambda problems: None)
    config = config_files.load_config_file(os.path.join(CONFIGS_DIR, file_name))
    for mode in MODES:
        assert validation.problems_of(config, mode) == [], (file_name, mode)


def test_missing_image_folder_and_tfds_dataset_are_named(tmp_path):
    config = multihost_worker.tiny_config(**{'data.name': 'folder', 'data.data_dir': str(tmp_path)})
    (tmp_path / 'train').mkdir()
    assert validation.problems_of(config, 'train') == []
    lines = validation.problems_of(config, 'fid')  # also reads the eval split, 'test'
    assert lines == [(f"config.data.eval_split='test': the image folder {tmp_path / 'test'} does not exist; put the "
                      'images there or set config.data.data_dir (--data_dir) to the folder that holds it')]
    config = multihost_worker.tiny_config(**{'data.name': 'cifar10', 'data.tfds_name': 'cifar10',
                                             'data.channels': 3, 'data.data_dir': str(tmp_path)})
    assert validation.problems_of(config, 'sample') == []  # sampling reads no data
    [line] = validation.problems_of(config, 'eval')
    assert line.startswith("config.data.tfds_name='cifar10': not prepared in " + str(tmp_path / 'cifar10'))
    assert f'tfds build cifar10 --file_format=array_record --data_dir={tmp_path}' in line


@pytest.mark.parametrize('overrides', [{'diffusion.beta_schedule': 'linaer'}, {'data.image_size': 0},
                                       {'data.name': 'folder', 'data.data_dir': 'MISSING'}])
def test_train_refuses_before_creating_the_workdir(tmp_path, overrides):
    overrides = {key: str(tmp_path / 'missing') if value == 'MISSING' else value for key, value in overrides.items()}
    workdir = tmp_path / 'run'
    with pytest.raises(validation.ConfigError):
        train.train(multihost_worker.tiny_config(**overrides), str(workdir))
    assert not workdir.exists()
