"""End-to-end tests of the CLI: `python -m ddpm_jax.main` on the digits config with 4 fake CPU devices."""
import os
import re
import sys

import numpy as np
import pytest
from PIL import Image

import subprocess_helpers

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# configs/digits.py shrunk to a few seconds of compute: a 1-level U-Net on 8x8 digits, T = 20.
_TINY = ['--config.model.ch=32', '--config.model.ch_mult=(1,)', '--config.model.num_res_blocks=1',
         '--config.diffusion.num_diffusion_timesteps=20', '--config.training.batch_size=16',
         '--config.optim.warmup_steps=5', '--config.optim.lr=2e-3']


def _run_cli(workdir, *flags, num_devices=4):
    env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={num_devices}',
               PYTHONPATH=os.pathsep.join([REPO_ROOT, os.environ.get('PYTHONPATH', '')]))
    return subprocess_helpers.run([sys.executable, '-m', 'ddpm_jax.main', '--config=configs/digits.py',
                                   f'--workdir={workdir}', *_TINY, *flags], cwd=REPO_ROOT, env=env)


def test_digits_trains_end_to_end_on_four_devices(tmp_path):
    workdir = tmp_path / 'run'
    result = _run_cli(workdir, '--config.training.num_train_steps=80', '--config.training.log_every_steps=10',
                      '--config.training.checkpoint_every_steps=40', '--config.training.sample_every_steps=80',
                      '--config.training.num_grid_samples=8', '--config.training.steps_per_dispatch=2')
    assert result.returncode == 0, result.stderr[-4000:]
    lines = re.findall(r'step (\d+)/80 \| loss ([0-9.]+) .* steps/s \| .* img/s \| ETA', result.stderr)
    assert [int(step) for step, _ in lines] == list(range(10, 81, 10))
    losses = [float(loss) for _, loss in lines]
    # eps-prediction MSE starts near 1 (the output layer is zero-initialised) and must fall clearly.
    assert losses[0] > 0.5 and min(losses[-3:]) < 0.6 * losses[0], losses
    assert sorted(os.listdir(workdir / 'checkpoints')) == ['40', '80']
    grid = np.asarray(Image.open(workdir / 'samples' / 'step_0000080.png'))
    assert grid.ndim == 2 and grid.shape[0] > 8 and grid.std() > 0
    assert any(name.startswith('events.out.tfevents') for name in os.listdir(workdir / 'tensorboard'))

    # Rerunning the finished command resumes at step 80 and stops at once.
    again = _run_cli(workdir, '--config.training.num_train_steps=80', '--config.training.num_grid_samples=0')
    assert again.returncode == 0, again.stderr[-4000:]
    assert 'Resumed from the checkpoint of step 80' in again.stderr


def test_cli_reports_bad_settings(tmp_path):
    result = _run_cli(tmp_path / 'a', '--config.training.batch_size=6')
    assert result.returncode != 0
    assert 'batch size 6 must be a positive multiple of the device count 4' in result.stderr
    result = _run_cli(tmp_path / 'b', '--data_dir=' + str(tmp_path / 'missing'), '--config.data.name=folder',
                      num_devices=1)
    assert result.returncode != 0 and str(tmp_path / 'missing') in result.stderr
    result = _run_cli(tmp_path / 'c', '--mode=dance', num_devices=1)
    assert result.returncode != 0 and "--mode='dance'; allowed:" in result.stderr


# The values reported as failing late (or not naming their key), each with the key its error must name.
_BAD_VALUES = [
    ('train', ['--config.diffusion.beta_schedule=linaer'], "config.diffusion.beta_schedule='linaer': unknown"),
    ('sample', ['--config.sampling.sampler=euler'], "config.sampling.sampler='euler': unknown"),
    ('sample', ['--config.sampling.num_steps=50'], 'config.sampling.num_steps=50: must be an integer in [1, T=20]'),
    ('train', ['--config.data.image_size=7', '--config.model.ch_mult=(1,2)'], 'config.data.image_size=7: the U-Net'),
    ('train', ['--config.data.image_size=0'], 'config.data.image_size=0: must be a positive integer'),
    ('train', ['--config.data.name=folder', '--data_dir=MISSING'], "config.data.train_split='train': the image folder"),
]


@pytest.mark.parametrize('mode,flags,expected', _BAD_VALUES, ids=[' '.join(f) for _, f, _ in _BAD_VALUES])
def test_cli_refuses_bad_config_values_before_creating_anything(tmp_path, mode, flags, expected):
    workdir = tmp_path / 'run'
    flags = [flag.replace('MISSING', str(tmp_path / 'missing')) for flag in flags]
    result = _run_cli(workdir, f'--mode={mode}', *flags, num_devices=1)
    assert result.returncode != 0 and expected in result.stderr, result.stderr[-4000:]
    assert not workdir.exists()
