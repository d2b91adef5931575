"""Tests of ddpm_jax.train: optimiser and EMA semantics, exact resume, device/host invariance, errors."""
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import multihost_worker  # pylint: disable=g-import-not-at-top,wrong-import-position
import subprocess_helpers  # pylint: disable=g-import-not-at-top,wrong-import-position
from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=wrong-import-position

from ddpm_jax import checkpoint, data, hooks, optim, parallel, train, workdir_lock  # pylint: disable=wrong-import-position
from ddpm_jax.errors import UserError  # pylint: disable=wrong-import-position
from ddpm_jax.models import params as params_lib  # pylint: disable=wrong-import-position

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'multihost_worker.py')


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(parallel.to_host(tree))]


def test_learning_rate_schedule_matches_official_warmup():
    config = multihost_worker.tiny_config(**{'optim.lr': 2e-4, 'optim.warmup_steps': 5000})
    schedule = optim.learning_rate_schedule(config.optim)
    steps = np.array([0, 1, 2500, 4999, 5000, 10_000])
    expected = 2e-4 * np.minimum(steps / 5000.0, 1.0)  # official utils.py: lr * min(step / warmup, 1)
    got = np.array([float(schedule(s)) for s in steps])
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=0)  # float32 arithmetic
    config.optim.warmup_steps = 0
    assert float(optim.learning_rate_schedule(config.optim)(0)) == np.float32(2e-4)


def test_first_step_has_zero_lr_and_ema_follows_official_decay():
    """Step 0 (lr 0) leaves params unchanged and copies them into the EMA; step 1 decays with ema_decay."""
    config = multihost_worker.tiny_config()
    assert config.optim.warmup_steps == 2 and config.optim.ema_decay == 0.75
    mesh = parallel.make_mesh()
    state = train.create_train_state(config, mesh)
    init_params = _leaves(state.params)
    step = train.make_train_step(config, mesh)
    batches = data.train_batches(config)
    state, metrics0 = step(state, parallel.shard_batch(next(batches)[None], mesh, batch_axis=1))
    after0 = _leaves(state.params)
    for before, after, ema in zip(init_params, after0, _leaves(state.ema_params)):
        np.testing.assert_array_equal(after, before)  # lr(0) = 0
        np.testing.assert_array_equal(ema, after)     # decay 0 at the first step: an exact copy
    assert float(metrics0['lr'][0]) == 0.0
    ema0 = _leaves(state.ema_params)
    state, metrics1 = step(state, parallel.shard_batch(next(batches)[None], mesh, batch_axis=1))
    assert float(metrics1['lr'][0]) == np.float32(config.optim.lr / 2)
    assert int(state.step) == 2
    changed = 0
    for e0, p1, e1 in zip(ema0, _leaves(state.params), _leaves(state.ema_params)):
        expected = 0.75 * e0.astype(np.float64) + 0.25 * p1.astype(np.float64)
        np.testing.assert_allclose(e1, expected, rtol=0, atol=1e-6 * (1 + np.abs(expected).max()))  # float32 rounding
        changed += int(np.any(p1 != e0))
    assert changed > 0
    assert np.isfinite(float(metrics1['loss'][0])) and float(metrics1['grad_norm'][0]) > 0


@pytest.mark.slow
def test_resume_is_bitwise_identical(tmp_path):
    """2N steps in one run == N steps, a restart from the checkpoint, and N more (params, EMA, Adam)."""
    overrides = {'training.checkpoint_every_steps': 2}
    straight = train.train(multihost_worker.tiny_config(**overrides, **{'training.num_train_steps': 4}),
                           str(tmp_path / 'straight'))
    train.train(multihost_worker.tiny_config(**overrides, **{'training.num_train_steps': 2}), str(tmp_path / 'split'))
    assert checkpoint.latest_step(str(tmp_path / 'split')) == 2
    resumed = train.train(multihost_worker.tiny_config(**overrides, **{'training.num_train_steps': 4}),
                          str(tmp_path / 'split'))
    assert int(resumed.step) == int(straight.step) == 4
    for name in ('params', 'ema_params', 'opt_state'):
        for a, b in zip(_leaves(getattr(straight, name)), _leaves(getattr(resumed, name))):
            np.testing.assert_array_equal(a, b)
    # The straight run saved step 2 asynchronously and then donated the state to step 3: the
    # checkpoint still holds step 2's values.
    config = multihost_worker.tiny_config()
    saved, _ = checkpoint.restore_ema_params(str(tmp_path / 'straight'), config, step=2)
    reference, _ = checkpoint.restore_ema_params(str(tmp_path / 'split'), config, step=2)
    for a, b in zip(_leaves(saved), _leaves(reference)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_steps_per_dispatch_matches_single_steps(tmp_path):
    """Three steps in one dispatch (lax.scan) equal three dispatched steps."""
    single = train.train(multihost_worker.tiny_config(**{'training.num_train_steps': 3}), str(tmp_path / 'a'))
    scanned = train.train(multihost_worker.tiny_config(**{'training.num_train_steps': 3,
                                                          'training.log_every_steps': 3,
                                                          'training.steps_per_dispatch': 3}), str(tmp_path / 'b'))
    assert int(scanned.step) == 3
    for a, b in zip(_leaves(single.params), _leaves(scanned.params)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-7)  # scan may fuse differently: float32 rounding
    # On CPU the K steps are written out: a loop around a train step ran ~30x slower per step on XLA:CPU (and the
    # unrolled threefry leaves no other loop in the step).
    config = multihost_worker.tiny_config()
    mesh = parallel.make_mesh()
    state = train.create_train_state(config, mesh, abstract=True)
    batches = jax.ShapeDtypeStruct((3, config.training.batch_size) + params_lib.image_shape(config.data), jnp.float32,
                                   sharding=NamedSharding(mesh, P(None, parallel.DATA_AXIS)))
    assert 'while' not in train.make_train_step(config, mesh).lower(state, batches).as_text()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    real_batches = data.train_batches

    def poisoned(config, *, start_step=0, **kwargs):
        for step, batch in enumerate(real_batches(config, start_step=start_step, **kwargs), start=start_step):
            yield np.full_like(batch, np.nan) if step == 3 else batch

    monkeypatch.setattr(data, 'train_batches', poisoned)
    config = multihost_worker.tiny_config(**{'training.num_train_steps': 8, 'training.checkpoint_every_steps': 2,
                                             'training.log_every_steps': 4})
    with pytest.raises(FloatingPointError, match='loss is nan at step 3'):
        train.train(config, str(tmp_path))
    assert checkpoint.latest_step(str(tmp_path)) == 2
    params, step = checkpoint.restore_ema_params(str(tmp_path), config)
    assert step == 2 and all(np.isfinite(leaf).all() for leaf in _leaves(params))


@pytest.mark.slow
def test_sigterm_saves_and_stops_cleanly(tmp_path, monkeypatch):
    real_batches = data.train_batches

    def signalling(config, *, start_step=0, **kwargs):
        for step, batch in enumerate(real_batches(config, start_step=start_step, **kwargs), start=start_step):
            if step == 3:
                os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler's preemption notice would
            yield batch

    monkeypatch.setattr(data, 'train_batches', signalling)
    handler_before = signal.getsignal(signal.SIGTERM)
    config = multihost_worker.tiny_config(**{'training.num_train_steps': 50, 'training.log_every_steps': 10})
    state = train.train(config, str(tmp_path))
    assert int(state.step) == 4  # the step in flight finishes, then the state is saved
    assert checkpoint.latest_step(str(tmp_path)) == 4
    assert signal.getsignal(signal.SIGTERM) is handler_before


def test_workdir_whose_checkpoints_were_all_quarantined_is_not_restarted_silently(tmp_path):
    """A rerun after every checkpoint went to checkpoints_corrupt refuses to start from step 0 (it did, silently,
    before) and names --restart_from_scratch; with the flag it trains from step 0, and once a readable
    checkpoint exists again the flag resumes instead of discarding it."""
    workdir = str(tmp_path)
    config = multihost_worker.tiny_config()
    train.train(config, workdir)
    os.makedirs(os.path.join(workdir, 'checkpoints_corrupt'))
    os.rename(os.path.join(workdir, 'checkpoints', '2'), os.path.join(workdir, 'checkpoints_corrupt', '2'))
    with pytest.raises(UserError, match=r'has held checkpoints but none is readable now \(found .*checkpoints_corrupt/2'
                                        r'.*--restart_from_scratch'):
        train.train(config, workdir)
    assert checkpoint.latest_step(workdir) is None
    state = train.train(config, workdir, restart_from_scratch=True)
    assert int(state.step) == 2 and checkpoint.latest_step(workdir) == 2
    resumed = train.train(multihost_worker.tiny_config(**{'training.num_train_steps': 3}), workdir,
                          restart_from_scratch=True)
    assert int(resumed.step) == 3


@pytest.mark.slow
def test_second_trainer_exits_at_once_and_a_stale_lock_is_taken_over(tmp_path, caplog):
    """A live holder of the workdir lock (another process) makes train() fail at once, naming its pid and host;
    after that holder is SIGKILLed, train() takes the lock over with a warning naming the dead holder."""
    workdir = str(tmp_path)
    holder = subprocess.Popen(
        [sys.executable, '-c', 'import sys, time\nfrom ddpm_jax import workdir_lock\n'
         'lock = workdir_lock._hold(sys.argv[1])\nlock.__enter__()\nprint("locked", flush=True)\ntime.sleep(600)', workdir],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'locked'
        started = time.monotonic()
        with pytest.raises(workdir_lock.WorkdirLockedError,
                           match=rf'in use by another training run \(pid {holder.pid} on host {socket.gethostname()}'):
            train.train(multihost_worker.tiny_config(), workdir)
        assert time.monotonic() - started < 60  # at once: no training step, no waiting for the lock
        assert not os.path.exists(checkpoint.checkpoint_dir(workdir))
    finally:
        holder.kill()
        holder.wait()
    state = train.train(multihost_worker.tiny_config(), workdir)
    assert int(state.step) == 2
    assert 'Taking over the stale lock' in caplog.text and f'pid {holder.pid} on host' in caplog.text
    # Released at the end: the file is emptied, so the next run sees no stale holder.
    assert open(os.path.join(workdir, workdir_lock.LOCK_FILE)).read() == ''


def test_failed_save_stops_training_in_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """A full disk during the save of step 4 (injected ENOSPC in orbax's asynchronous write): training stops
    with the cause, the unfinished directory is removed, and step 2 stays restorable."""
    from orbax.checkpoint._src.handlers import json_checkpoint_handler  # pylint: disable=g-import-not-at-top
    real_save = json_checkpoint_handler.JsonCheckpointHandler._save_fn

    async def full_disk(self, item, directory):
        if item.get('step') == 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
        return await real_save(self, item, directory)

    monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, '_save_fn', full_disk)
    workdir = str(tmp_path)
    config = multihost_worker.tiny_config(**{'training.num_train_steps': 12, 'training.checkpoint_every_steps': 2})
    with pytest.raises(train.SaveFailedError) as raised:
        train.train(config, workdir)
    message = str(raised.value)
    assert message.startswith(f'No space left on device while saving step 4 to {checkpoint.checkpoint_dir(workdir)}')
    assert '\n' not in message and 'rerun the same command' in message
    assert os.listdir(checkpoint.checkpoint_dir(workdir)) == ['2']  # no unfinished directory, nothing after it
    params, step = checkpoint.restore_ema_params(workdir, config)
    assert step == 2


def test_bad_configs_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="config.data.name='imagenet': unknown; allowed: digits"):
        train.train(multihost_worker.tiny_config(**{'data.name': 'imagenet'}), str(tmp_path / 'a'))
    with pytest.raises(ValueError, match=str(tmp_path / 'none' / 'train')):
        train.train(multihost_worker.tiny_config(**{'data.name': 'folder', 'data.data_dir': str(tmp_path / 'none'),
                                                    'data.channels': 1}), str(tmp_path / 'b'))
    with pytest.raises(ValueError, match='batch size 0 must be a positive multiple'):
        train.train(multihost_worker.tiny_config(**{'training.batch_size': 0}), str(tmp_path / 'c'))
    with pytest.raises(ValueError, match='steps_per_dispatch'):
        train.train(multihost_worker.tiny_config(**{'training.steps_per_dispatch': 0}), str(tmp_path / 'd'))


# ------------------------------------------------------------------------------------------------
# Several devices and hosts (subprocesses with fake CPU devices).

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def _worker_command(num_devices, workdir, out, overrides, *extra):
    return [sys.executable, WORKER, f'--num_devices={num_devices}', f'--workdir={workdir}', f'--out={out}',
            f'--overrides={json.dumps(overrides)}', *extra]


def _run_worker(tmp_path, name, num_devices, overrides):
    out = tmp_path / f'{name}.npz'
    result = subprocess_helpers.run(_worker_command(num_devices, tmp_path / name, out, overrides))
    assert result.returncode == 0, result.stderr[-4000:]
    return dict(np.load(out))


def _start_two_processes(tmp_path, name, workdir, overrides, *extra):
    """Starts the worker as processes 0 and 1 of a job; returns [(Popen, log path)]."""
    port = _free_port()
    started = []
    for i in range(2):
        log_path = tmp_path / f'{name}.{i}.log'
        with open(log_path, 'w') as log:
            proc = subprocess_helpers.start(_worker_command(2, workdir, tmp_path / f'{name}.npz', overrides,
                                                            f'--coordinator_address=127.0.0.1:{port}',
                                                            '--num_processes=2', f'--process_id={i}', *extra),
                                            stdout=log, stderr=subprocess.STDOUT)
        started.append((proc, log_path))
    return started


def _log_tails(started):
    return '\n'.join(f'--- process {i} (return code {proc.poll()}):\n{log_path.read_text()[-3000:]}'
                     for i, (proc, log_path) in enumerate(started))


def _wait_for_exit(started, timeout, what):
    deadline = time.monotonic() + timeout
    for proc, _ in started:
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            pytest.fail(f'{what}: still running after {timeout} s (a hang?):\n{_log_tails(started)}')
    for proc, _ in started:
        assert proc.returncode == 0, f'{what}: a process failed:\n{_log_tails(started)}'


def _kill(started):
    """SIGKILL to each process group: with jax.distributed initialised, SIGTERM only starts the preemption
    protocol."""
    subprocess_helpers.kill_groups([proc for proc, _ in started])


# Under pytest-xdist the tests of this section share one worker (xdist_group 'multihost'): the module fixture
# runs once, and the two-process jobs never race each other for the coordinator port that _free_port picked.
# Three steps (lr 0, lr / 2, lr) with clipping; dropout 0, because dropout masks are drawn per device
# (t and noise are drawn per global example, so they do not depend on the device count).
_EQUIVALENCE = {'training.num_train_steps': 3, 'optim.grad_clip': 1.0}


@pytest.fixture(scope='module')
def four_device_run(tmp_path_factory):
    return _run_worker(tmp_path_factory.mktemp('four'), 'four', 4, _EQUIVALENCE)


def _assert_close(reference, other, atol):
    assert sorted(reference) == sorted(other)
    for key in reference:
        if key in ('device_count', 'process_count'):
            continue
        np.testing.assert_allclose(other[key], reference[key], rtol=0, atol=atol, err_msg=key)


@pytest.mark.slow
@pytest.mark.xdist_group('multihost')
def test_one_device_equals_four_devices(tmp_path, four_device_run):
    assert int(four_device_run['device_count']) == 4 and jax.device_count() == 1
    state = train.train(multihost_worker.tiny_config(**_EQUIVALENCE), str(tmp_path))
    host = parallel.to_host({'params': state.params, 'ema': state.ema_params})
    one = {**multihost_worker.flat_params(host['params'], 'params'), **multihost_worker.flat_params(host['ema'], 'ema'),
           'device_count': 1, 'process_count': 1}
    # Only the order of float32 sums differs (per-device means, then pmean).
    _assert_close(one, four_device_run, atol=1e-6)


@pytest.mark.slow
@pytest.mark.xdist_group('multihost')
def test_two_processes_equal_one_process(tmp_path, four_device_run):
    started = _start_two_processes(tmp_path, 'multi', tmp_path / 'multi', _EQUIVALENCE)
    try:
        _wait_for_exit(started, timeout=subprocess_helpers.TIMEOUT_S, what='the two-process run')
    finally:
        _kill(started)
    multi = dict(np.load(tmp_path / 'multi.npz'))
    assert int(multi['process_count']) == 2 and int(multi['device_count']) == 4
    # Same mesh and arithmetic; the cross-process all-reduce (gloo) may sum in another order.
    _assert_close(four_device_run, multi, atol=1e-6)
    assert checkpoint.latest_step(str(tmp_path / 'multi')) == 3


# ------------------------------------------------------------------------------------------------
# Preemption of one host of two (SIGTERM, as a scheduler sends it to the VM it reclaims first).

def _wait_for_file(path, started, timeout):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if any(proc.poll() is not None for proc, _ in started):
            pytest.fail(f'a process ended before {path} appeared:\n{_log_tails(started)}')
        if time.monotonic() > deadline:
            pytest.fail(f'{path} did not appear within {timeout} s:\n{_log_tails(started)}')
        time.sleep(0.05)


def _restore_verified(workdir, config):
    """The newest checkpoint of `workdir`, restored in this process with its checksums verified."""
    manager = checkpoint.make_manager(str(workdir), config)
    try:
        return checkpoint.restore_state(str(workdir), manager,
                                        train.create_train_state(config, parallel.make_mesh(), abstract=True), config)
    finally:
        manager.close()


# Two steps per dispatch: JAX's sync step can fall inside a dispatch (and did, unnoticed, before train.py
# reported every step of a dispatch to the sync protocol).
_PREEMPTION = {'training.steps_per_dispatch': 2, 'training.log_every_steps': 2}
_READY_STEP = 4


def _read_steps(path):
    """{process index: {'start_step', 'final_step'}} as written by the workers' --steps_file."""
    return {i: json.loads(open(f'{path}.{i}').read()) for i in range(2)}


@pytest.mark.slow
@pytest.mark.xdist_group('multihost')
def test_sigterm_to_one_of_two_processes_stops_both_at_one_step_and_resumes_exactly(tmp_path):
    """SIGTERM to process 1 only: JAX's preemption notifier (installed by jax.distributed.initialize)
    tells process 0 through the coordination service; both stop at the same sync step, write one complete
    checkpoint and exit 0; two processes resuming from it end bitwise equal to an uninterrupted run."""
    workdir, ready, steps_file = tmp_path / 'preempted', tmp_path / 'ready', tmp_path / 'steps'
    num_steps = 40  # not reached: the notice takes about a second to act, and each step waits 0.25 s after it
    config = multihost_worker.tiny_config(**_PREEMPTION)
    started = []
    try:
        started = _start_two_processes(
            tmp_path, 'preempted', workdir, {**_PREEMPTION, 'training.num_train_steps': num_steps},
            f'--ready_file={ready}', f'--ready_step={_READY_STEP}', '--step_delay=0.25', f'--steps_file={steps_file}')
        _wait_for_file(f'{ready}.1', started, timeout=subprocess_helpers.TIMEOUT_S)
        started[1][0].send_signal(signal.SIGTERM)
        _wait_for_exit(started, timeout=subprocess_helpers.TIMEOUT_S, what='the preempted run')
        stop_steps = [steps['final_step'] for steps in _read_steps(steps_file).values()]
        assert stop_steps[0] == stop_steps[1], f'the processes stopped at different steps {stop_steps}'
        stop_step = stop_steps[0]
        assert _READY_STEP < stop_step < num_steps, _log_tails(started)
        # One complete checkpoint, at the stop step; no half-written (temporary) step directory.
        assert sorted(os.listdir(checkpoint.checkpoint_dir(str(workdir)))) == [str(stop_step)]
        assert int(_restore_verified(workdir, config).step) == stop_step

        total = {**_PREEMPTION, 'training.num_train_steps': stop_step + 4}
        started = _start_two_processes(tmp_path, 'resumed', workdir, total, f'--steps_file={steps_file}')
        _wait_for_exit(started, timeout=subprocess_helpers.TIMEOUT_S, what='the resumed run')
        for steps in _read_steps(steps_file).values():
            assert steps == {'start_step': stop_step, 'final_step': stop_step + 4}
        started = _start_two_processes(tmp_path, 'straight', tmp_path / 'straight', total)
        _wait_for_exit(started, timeout=subprocess_helpers.TIMEOUT_S, what='the uninterrupted run')
    finally:
        _kill(started)
    resumed, straight = _restore_verified(workdir, config), _restore_verified(tmp_path / 'straight', config)
    assert int(resumed.step) == int(straight.step) == stop_step + 4
    for name in ('params', 'ema_params', 'opt_state'):
        for a, b in zip(_leaves(getattr(straight, name)), _leaves(getattr(resumed, name)), strict=True):
            np.testing.assert_array_equal(a, b, err_msg=name)


def test_ema_warmup_matches_numpy_loop():
    """optim.ema_warmup: decay 0 at step 0, then min(ema_decay, (1 + n) / (10 + n)); off: the official rule."""
    n = np.arange(3000)
    for warmup in (False, True):
        expected = np.where(n == 0, 0.0, np.minimum(0.999, (1.0 + n) / (10.0 + n)) if warmup else 0.999)
        got = np.asarray(jax.vmap(lambda s: optim.ema_decay_at(s, 0.999, warmup))(jnp.asarray(n, jnp.int32)))
        np.testing.assert_allclose(got, expected, rtol=2e-7, atol=0)  # float32
    # Through the train step: the EMA equals a float64 numpy loop over the raw params of every step.
    config = multihost_worker.tiny_config(**{'optim.ema_warmup': True, 'optim.ema_decay': 0.99})
    mesh = parallel.make_mesh()
    state = train.create_train_state(config, mesh)
    step = train.make_train_step(config, mesh)
    batches = data.train_batches(config)
    ema = None
    for k in range(5):
        state, _ = step(state, parallel.shard_batch(next(batches)[None], mesh, batch_axis=1))
        params = [p.astype(np.float64) for p in _leaves(state.params)]
        decay = 0.0 if k == 0 else min(0.99, (1.0 + k) / (10.0 + k))
        ema = params if ema is None else [decay * e + (1.0 - decay) * p for e, p in zip(ema, params)]
    for want, got in zip(ema, _leaves(state.ema_params)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * (1 + np.abs(want).max()))  # float32 rounding


def test_tensorboard_steps_are_the_console_step_counts():
    recorded = []

    class Writer:
        def add_scalar(self, name, value, step):
            recorded.append((name, step))

        def flush(self):
            pass

    values = dict(step=np.arange(0, 50), loss=np.ones(50), grad_norm=np.ones(50), lr=np.ones(50))
    hooks.write_scalars(Writer(), values)  # steps 0..49 done: the console says "step 50"
    assert recorded == [('train/loss', 50), ('train/grad_norm', 50), ('train/lr', 50)]


def test_sample_grid_is_one_batch_of_the_evaluation_sampler_of_config_sampling(tmp_path):
    """The grid written while training is `evaluation.sample.make_sample_batch_fn` (sample mode's sampler, here DDIM with 5
    steps from config.sampling) applied to the EMA params with the fixed key fold_in(fold_in(key(seed), 3), 0)."""
    from PIL import Image  # pylint: disable=g-import-not-at-top

    from ddpm_jax import image_grid  # pylint: disable=g-import-not-at-top
    from ddpm_jax.evaluation import common, sample  # pylint: disable=g-import-not-at-top
    config = multihost_worker.tiny_config(**{'training.num_grid_samples': 3, 'training.sample_every_steps': 2,
                                             'sampling.sampler': 'ddim', 'sampling.num_steps': 5})
    state = train.train(config, str(tmp_path))
    grid = np.asarray(Image.open(tmp_path / 'samples' / 'step_0000002.png'))
    rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), 3), 0)
    expected = {}
    for sampler in ('ddim', 'ancestral'):
        sample_config = multihost_worker.tiny_config(**{'sampling.sampler': sampler, 'sampling.num_steps': 5,
                                                        'sampling.batch_size': 3})
        batch = sample.make_sample_batch_fn(sample_config, common.model_apply_fn(sample_config),
                                            parallel.make_mesh(), quantize=False)(state.ema_params, rng)
        path = str(tmp_path / f'{sampler}.png')
        image_grid.save_image_grid(parallel.to_host(batch), path, scale=8)  # 64 // image_size 8
        expected[sampler] = np.asarray(Image.open(path))
    np.testing.assert_array_equal(grid, expected['ddim'])
    assert np.any(grid != expected['ancestral'])  # the sampler setting reaches the grid
