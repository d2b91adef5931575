"""End-to-end tests of the CLI: `python -m ddpm_jax.main` on the digits config with 4 fake CPU devices."""
import os
import re
import subprocess
import sys

import numpy as np
from PIL import Image

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# configs/digits.py shrunk to a few seconds of compute: a 1-level U-Net on 8x8 digits, T = 20.
_TINY = ['--config.model.ch=32', '--config.model.ch_mult=(1,)', '--config.model.num_res_blocks=1',
         '--config.diffusion.num_diffusion_timesteps=20', '--config.training.batch_size=16',
         '--config.optim.warmup_steps=5', '--config.optim.lr=2e-3']


def _run_cli(workdir, *flags, num_devices=4):
    env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={num_devices}',
               PYTHONPATH=os.pathsep.join([REPO_ROOT, os.environ.get('PYTHONPATH', '')]))
    return subprocess.run([sys.executable, '-m', 'ddpm_jax.main', '--config=configs/digits.py', f'--workdir={workdir}',
                           *_TINY, *flags], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
                          check=False)


def test_digits_trains_end_to_end_on_four_devices(tmp_path):
    workdir = tmp_path / 'run'
    result = _run_cli(workdir, '--config.training.num_train_steps=80', '--config.training.log_every_steps=10',
                      '--config.training.checkpoint_every_steps=40', '--config.training.sample_every_steps=80',
                      '--config.training.num_grid_samples=8', '--config.training.steps_per_dispatch=2')
    assert result.returncode == 0, result.stderr[-4000:]
    lines = re.findall(r'step (\d+)/80 \| loss ([0-9.]+) .* steps/s \| .* img/s \| ETA', result.stderr)
    assert [int(step) for step, _ in lines] == list(range(10, 81, 10))
    # The ETA's rate starts at the first log point (compilation excluded): no ETA there, then h:mm:ss.
    etas = re.findall(r'step \d+/80 \|.* ETA (\S+)', result.stderr)
    assert etas[0] == '?' and all(re.fullmatch(r'\d+:\d\d:\d\d', eta) for eta in etas[1:]), etas
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
