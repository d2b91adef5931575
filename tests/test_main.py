"""End-to-end tests of the CLI: `python -m ddpm_jax.main` on the digits config with 4 fake CPU devices."""
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

import subprocess_helpers

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# configs/digits.py:tiny (a 1-level U-Net on 8x8 digits, T = 20) with the optimiser, batch and cadences of a
# short CLI run: the digits run's EMA and grids, lr 2e-3 over 5 warm-up steps, batch 16.
_TINY = ['--config=configs/digits.py:tiny', '--config.training.batch_size=16', '--config.optim.warmup_steps=5',
         '--config.optim.lr=2e-3', '--config.optim.ema_decay=0.999', '--config.optim.ema_warmup=True',
         '--config.training.num_train_steps=3000', '--config.training.log_every_steps=100',
         '--config.training.sample_every_steps=1500', '--config.training.num_grid_samples=64']


def _cli_command(workdir, *flags, num_devices=4):
    """(argv, env) of `python -m ddpm_jax.main` on the tiny digits config."""
    env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={num_devices}',
               PYTHONPATH=os.pathsep.join([REPO_ROOT, os.environ.get('PYTHONPATH', '')]))
    return [sys.executable, '-m', 'ddpm_jax.main', f'--workdir={workdir}', *_TINY,
            *flags], env


def _run_cli(workdir, *flags, num_devices=4):
    command, env = _cli_command(workdir, *flags, num_devices=num_devices)
    return subprocess_helpers.run(command, cwd=REPO_ROOT, env=env)


@pytest.mark.slow
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


# The values reported as failing late (or not naming their key), each with the key its error must name.
_BAD_VALUES = [
    ('train', ['--config.diffusion.beta_schedule=linaer'], "config.diffusion.beta_schedule='linaer': unknown"),
    ('sample', ['--config.sampling.sampler=euler'], "config.sampling.sampler='euler': unknown"),
    ('sample', ['--config.sampling.num_steps=50'], 'config.sampling.num_steps=50: must be an integer in [1, T=20]'),
    ('train', ['--config.data.image_size=7', '--config.model.ch_mult=(1,2)'], 'config.data.image_size=7: the U-Net'),
    ('train', ['--config.data.image_size=0'], 'config.data.image_size=0: must be a positive integer'),
    ('train', ['--config.data.name=folder', '--data_dir=MISSING'], "config.data.train_split='train': the image folder"),
]


@pytest.mark.slow
@pytest.mark.parametrize('mode,flags,expected', _BAD_VALUES, ids=[' '.join(f) for _, f, _ in _BAD_VALUES])
def test_cli_refuses_bad_config_values_before_creating_anything(tmp_path, mode, flags, expected):
    workdir = tmp_path / 'run'
    flags = [flag.replace('MISSING', str(tmp_path / 'missing')) for flag in flags]
    result = _run_cli(workdir, f'--mode={mode}', *flags, num_devices=1)
    assert result.returncode != 0 and expected in result.stderr, result.stderr[-4000:]
    assert not workdir.exists()


@pytest.mark.slow
def test_user_errors_print_one_line_and_log_the_traceback(tmp_path):
    """A workdir that only holds quarantined checkpoints: the refusal is one line naming --restart_from_scratch
    (no traceback on the console; it goes to workdir/errors.log), exit code 1; --verbose shows the traceback."""
    workdir = tmp_path / 'run'
    (workdir / 'checkpoints_corrupt' / '40').mkdir(parents=True)
    result = _run_cli(workdir, '--config.training.num_train_steps=2', num_devices=1)
    assert result.returncode == 1, result.stderr[-4000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f'Error: {workdir} has held checkpoints but none is readable now'), result.stderr[-4000:]
    assert '--restart_from_scratch' in last and f'traceback in {workdir / "errors.log"}' in last
    assert 'Traceback' not in result.stderr
    assert 'Traceback' in (workdir / 'errors.log').read_text()
    verbose = _run_cli(workdir, '--config.training.num_train_steps=2', '--verbose', num_devices=1)
    assert verbose.returncode == 1 and 'Traceback' in verbose.stderr


@pytest.mark.slow
def test_sigint_saves_and_exits_130(tmp_path):
    """Ctrl-C (SIGINT) during training saves a checkpoint and exits 130, not 0 (it was once swallowed and the
    run went on to the end)."""
    workdir, log_path = tmp_path / 'run', tmp_path / 'stderr.log'
    command, env = _cli_command(workdir, '--config.training.num_train_steps=100000',
                                '--config.training.log_every_steps=5', num_devices=1)
    with open(log_path, 'w') as log:
        proc = subprocess_helpers.start(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        while 'step 5/100000' not in log_path.read_text():
            assert proc.poll() is None, log_path.read_text()[-4000:]
            assert time.monotonic() < deadline, 'training did not start within 600 s'
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=600) == 130, log_path.read_text()[-4000:]
    finally:
        subprocess_helpers.kill_group(proc)
    text = log_path.read_text()
    assert 'SIGINT received: saving a checkpoint and stopping' in text
    assert text.strip().splitlines()[-1].startswith('Interrupted: stopped by SIGINT at step')
    steps = [int(name) for name in os.listdir(workdir / 'checkpoints')]
    assert len(steps) == 1 and 5 <= steps[0] < 100000
