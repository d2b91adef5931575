"""Tests of ddpm_jax.progress: the line's count, rate and ETA, and device-side reporting."""
import logging as python_logging

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from ddpm_jax import progress


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_rate_and_eta_ignore_what_ran_before_the_first_update(monkeypatch):
    lines = []
    monkeypatch.setattr(logging, 'info', lambda fmt, *args: lines.append(fmt % args))
    clock = _Clock()
    p = progress.Progress('train', 1000, every_seconds=0.0, clock=clock)
    clock.now += 500.0           # compilation and the first 100 steps: not part of the rate
    p.update(100)
    assert lines[-1] == 'train: 100/1000 steps (10.0%) | ? steps/s | ETA ?'
    clock.now += 10.0
    p.update(200)                # 100 steps in 10 s: 10 steps/s, 800 left: 80 s
    assert lines[-1] == 'train: 200/1000 steps (20.0%) | 10 steps/s | ETA 0:01:20'
    clock.now += 60.0
    p.exclude(50.0)              # 50 s spent elsewhere (a sample grid)
    p.update(300)                # 200 steps in 20 s of training
    assert p.rate() == 10.0 and p.eta_seconds() == 70.0
    p.update(300)                # no growth: nothing logged
    assert len(lines) == 3
    quiet = progress.Progress('x', 10, every_seconds=30.0, clock=clock)
    quiet.update(1)
    clock.now += 1.0
    quiet.update(2)              # not due
    quiet.update(10)             # the total is always logged
    assert [line.split(':')[1].split('/')[0].strip() for line in lines[3:]] == ['1', '10']


def test_report_from_device_counts_steps_and_keeps_results():
    clock = _Clock()
    p = progress.Progress('loop', 5, every_seconds=1e9, clock=clock)
    counter = progress.TimestepCounter(np.array([0, 3, 6, 9, 12]), p)
    seen = []
    p_update = p.update
    p.update = lambda count, **kw: (seen.append(count), p_update(count, **kw))

    def model_fn(x, t):
        return x * 0.5 + t[:, None].astype(x.dtype)

    def loop(fn, x):  # a lax loop, as the samplers' (unordered callbacks keep the order of its iterations)
        return jax.lax.fori_loop(0, 5, lambda i, x: fn(x, jnp.full((2,), 12 - 3 * i, jnp.int32)), x)

    x = jnp.ones((2, 3))
    want = jax.jit(lambda x: loop(model_fn, x))(x)
    got = jax.jit(lambda x: loop(progress.report_from_device(model_fn, counter), x))(x)
    jax.effects_barrier()
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert seen == [1, 2, 3, 4, 5] and p.count == 5


def test_report_at_limits_the_callbacks_and_keeps_the_last_step():
    clock = _Clock()
    p = progress.Progress('loop', 1000, every_seconds=1e9, clock=clock)
    counter = progress.TimestepCounter(np.arange(1000), p)
    report_at = counter.report_timesteps(100)
    assert len(report_at) == 100 and report_at[0] == 0
    calls = []
    wrapped = progress.report_from_device(lambda x, t: x + 1.0, lambda t: (calls.append(t), counter(t)), report_at)
    run = jax.jit(lambda x: jax.lax.fori_loop(0, 1000, lambda i, x: wrapped(x, jnp.full((2,), 999 - i)), x))
    np.testing.assert_array_equal(np.asarray(run(jnp.zeros(2))), np.full(2, 1000.0))
    jax.effects_barrier()
    assert sorted(calls) == sorted(report_at.tolist()) and p.count == 1000


def test_library_filter_drops_orbax_chatter_and_read_only_notes_but_keeps_real_warnings():
    def record(level, message, path='/site-packages/orbax/checkpoint/checkpoint_manager.py'):
        return python_logging.LogRecord('absl', level, path, 1, message, (), None)

    keep = progress._QuietLibraries().filter  # pylint: disable=protected-access
    assert not keep(record(python_logging.INFO, 'Finished saving checkpoint'))
    assert not keep(record(python_logging.WARNING, 'CheckpointManagerOptions.read_only=True, setting '
                                                   'save_interval_steps=0.'))
    assert not keep(record(python_logging.WARNING, 'Given directory is read only=/w/checkpoints'))
    assert keep(record(python_logging.WARNING, 'Could not restore step 4'))
    assert keep(record(python_logging.ERROR, 'Given directory is read only=/w/checkpoints'))
    assert keep(record(python_logging.INFO, 'step 100/3000', path='/ddpm_jax/train.py'))
