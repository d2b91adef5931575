"""Tests of ddpm_jax.checkpoint: round trips, retention, corruption, atomicity, compatibility."""
import errno
import glob
import json
import os
import shutil
import sys

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import multihost_worker

from ddpm_jax import checkpoint, checkpoint_recovery, parallel, train

# Orbax's read of a truncated file fails inside tensorstore's asyncio loop and leaves an
# "Event loop is closed" callback behind at garbage collection: noise, not a test outcome.
pytestmark = pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(parallel.to_host(tree))]


@pytest.fixture(scope='module')
def config():
    return multihost_worker.tiny_config(**{'training.keep_latest': 2, 'training.keep_every': 4})


@pytest.fixture(scope='module')
def mesh():
    return parallel.make_mesh()


def _state_at(config, mesh, step):
    """A state with distinct, step-dependent values in every array (params, EMA, Adam moments)."""
    state = train.create_train_state(config, mesh)
    shift = lambda tree, scale: jax.tree.map(lambda x: x + scale * step if x.dtype == np.float32 else x, tree)
    return state.replace(step=state.step + step, params=shift(state.params, 1.0),
                         ema_params=shift(state.ema_params, 0.5), opt_state=shift(state.opt_state, 0.25))


def _save_steps(workdir, config, mesh, steps):
    manager = checkpoint.make_manager(workdir, config)
    for step in steps:
        checkpoint.save_state(manager, _state_at(config, mesh, step), config)
    manager.wait_until_finished()
    manager.close()


def _restore(workdir, config, mesh):
    manager = checkpoint.make_manager(workdir, config)
    try:
        return checkpoint.restore_state(workdir, manager, train.create_train_state(config, mesh, abstract=True), config)
    finally:
        manager.close()


def _assert_state_equal(a, b):
    for x, y in zip(_leaves(a), _leaves(b)):
        np.testing.assert_array_equal(x, y)


def test_round_trip_is_exact_and_keeps_optimizer_types(tmp_path, config, mesh):
    workdir = str(tmp_path)
    assert _restore(workdir, config, mesh) is None
    _save_steps(workdir, config, mesh, [3])
    restored = _restore(workdir, config, mesh)
    _assert_state_equal(restored, _state_at(config, mesh, 3))
    assert int(restored.step) == 3
    adam_states = [s for s in jax.tree.leaves(restored.opt_state,
                                              is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
                   if isinstance(s, optax.ScaleByAdamState)]
    assert len(adam_states) == 1
    assert restored.params['conv_in']['kernel'].sharding.is_equivalent_to(parallel.replicated_sharding(mesh), 4)
    meta = json.load(open(os.path.join(workdir, 'checkpoints', '3', 'meta', 'metadata')))
    assert meta['kind'] == 'train' and meta['step'] == 3 and meta['config']['model']['ch'] == 32
    assert set(meta['checksums']) == {'train_state', 'ema_params'} and 'package_version' in meta


def test_retention_keeps_latest_and_every_nth(tmp_path, config, mesh):
    _save_steps(str(tmp_path), config, mesh, range(1, 10))
    steps = sorted(int(os.path.basename(p)) for p in glob.glob(str(tmp_path / 'checkpoints' / '[0-9]*')))
    assert steps == [4, 8, 9]  # latest 2 (8, 9) plus multiples of keep_every=4


def _corrupt_latest_array_data(workdir, step):
    """Truncates every data file of the train_state item (a save cut short by a full disk)."""
    files = [f for f in glob.glob(os.path.join(workdir, 'checkpoints', str(step), 'train_state', '**'), recursive=True)
             if os.path.isfile(f) and '/d/' in f]
    assert files
    for name in files:
        with open(name, 'r+b') as f:
            f.truncate(os.path.getsize(name) // 2)


@pytest.mark.parametrize('damage', ['truncated_data', 'garbage_meta', 'checksum_mismatch'])
def test_corrupt_latest_falls_back_to_previous(tmp_path, config, mesh, damage, caplog):
    workdir = str(tmp_path)
    _save_steps(workdir, config, mesh, [1, 2])
    if damage == 'truncated_data':
        _corrupt_latest_array_data(workdir, 2)
    elif damage == 'garbage_meta':
        with open(os.path.join(workdir, 'checkpoints', '2', 'meta', 'metadata'), 'w') as f:
            f.write('{"kind": "train", "conf')
    else:  # bits that decode fine but are not what was saved: the recorded digest no longer matches
        path = os.path.join(workdir, 'checkpoints', '2', 'meta', 'metadata')
        meta = json.load(open(path))
        meta['checksums']['ema_params'] = '0' * 32
        json.dump(meta, open(path, 'w'))
    restored = _restore(workdir, config, mesh)
    assert int(restored.step) == 1
    _assert_state_equal(restored, _state_at(config, mesh, 1))
    assert 'corrupt' in caplog.text
    assert 'tensorstore_spec' not in caplog.text  # TensorStore's JSON specs (kilobytes each) are summarised away
    assert os.path.isdir(os.path.join(workdir, 'checkpoints_corrupt', '2'))
    assert checkpoint.latest_step(workdir) == 1


def test_all_checkpoints_corrupt_is_a_clear_error(tmp_path, config, mesh):
    workdir = str(tmp_path)
    _save_steps(workdir, config, mesh, [1])
    _corrupt_latest_array_data(workdir, 1)
    with pytest.raises(checkpoint.CorruptCheckpointError, match='no readable checkpoint'):
        _restore(workdir, config, mesh)


def _failing_restores(monkeypatch, failures, error):
    """Makes the next `failures` manager.restore calls raise `error` (then restores work again); returns the
    list of steps each failed call asked for."""
    real_restore = checkpoint._CheckpointManager.restore
    failed = []

    def restore(self, step, *args, **kwargs):
        if len(failed) < failures:
            failed.append(step)
            raise error(step)
        return real_restore(self, step, *args, **kwargs)

    monkeypatch.setattr(checkpoint._CheckpointManager, 'restore', restore)
    monkeypatch.setattr(checkpoint_recovery, 'RETRY_WAITS_S', (0.0, 0.0))
    return failed


def _eio(step):
    return OSError(errno.EIO, os.strerror(errno.EIO), f'checkpoints/{step}')


def test_transient_read_error_is_retried_and_never_quarantines(tmp_path, config, mesh, monkeypatch):
    workdir = str(tmp_path)
    _save_steps(workdir, config, mesh, [1, 2])
    # One EIO, then success: step 2 restores (before: quarantined as corrupt, and step 1 was used).
    failed = _failing_restores(monkeypatch, 1, _eio)
    restored = _restore(workdir, config, mesh)
    assert failed == [2] and int(restored.step) == 2
    _assert_state_equal(restored, _state_at(config, mesh, 2))
    # EIO on every try (the first read and the two retries): a clear error, the checkpoint stays in place.
    monkeypatch.undo()
    failed = _failing_restores(monkeypatch, 100, _eio)
    with pytest.raises(checkpoint_recovery.CheckpointIOError,
                       match='step 2 .* failed 3 times .*Input/output error.*left in place'):
        _restore(workdir, config, mesh)
    assert failed == [2, 2, 2]
    assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['1', '2']
    assert not os.path.exists(os.path.join(workdir, 'checkpoints_corrupt'))


def test_is_transient_tells_io_trouble_from_damage():
    assert (checkpoint_recovery.is_transient(_eio(1))
            and checkpoint_recovery.is_transient(TimeoutError('read timed out')))
    assert checkpoint_recovery.is_transient(PermissionError(errno.EACCES, 'Permission denied'))
    assert checkpoint_recovery.is_transient(ValueError('UNAVAILABLE: Error reading local file: Input/output error'))
    assert not checkpoint_recovery.is_transient(FileNotFoundError(errno.ENOENT, 'No such file or directory'))
    assert not checkpoint_recovery.is_transient(ValueError('OUT_OF_RANGE: Requested byte range [0, 2145) is not valid'))
    wrapped = ValueError('restore failed')
    wrapped.__cause__ = _eio(1)
    assert checkpoint_recovery.is_transient(wrapped)


def test_checkpoint_deleted_while_an_evaluation_reads_it_is_skipped(tmp_path, config, mesh, monkeypatch, caplog):
    """Retention of a trainer running beside an evaluation mode deletes the step it is reading: the reader
    falls back to the next newest checkpoint with a warning, and quarantines nothing."""
    workdir = str(tmp_path)
    _save_steps(workdir, config, mesh, [1, 2])

    def deleted(step):
        shutil.rmtree(os.path.join(workdir, 'checkpoints', str(step)))
        return FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), f'checkpoints/{step}/meta')

    _failing_restores(monkeypatch, 1, deleted)
    params, step = checkpoint.restore_ema_params(workdir, config)
    assert step == 1
    for a, b in zip(_leaves(params), _leaves(_state_at(config, mesh, 1).ema_params)):
        np.testing.assert_array_equal(a, b)
    assert 'deleted while being read' in caplog.text
    assert not os.path.exists(os.path.join(workdir, 'checkpoints_corrupt'))


def test_interrupted_save_never_replaces_the_last_good_one(tmp_path, config, mesh):
    """Orbax writes `<step>.orbax-checkpoint-tmp*` and renames it when complete; a half-written one is ignored."""
    workdir = str(tmp_path)
    _save_steps(workdir, config, mesh, [1])
    partial = os.path.join(workdir, 'checkpoints', '2.orbax-checkpoint-tmp-1234')
    shutil.copytree(os.path.join(workdir, 'checkpoints', '1'), partial)
    shutil.rmtree(os.path.join(partial, 'train_state'))
    assert checkpoint.latest_step(workdir) == 1
    assert int(_restore(workdir, config, mesh).step) == 1


def test_incompatible_config_is_refused_naming_the_keys(tmp_path, config, mesh):
    workdir = str(tmp_path)
    _save_steps(workdir, config, mesh, [1])
    changed = multihost_worker.tiny_config(**{'model.ch': 64, 'diffusion.num_diffusion_timesteps': 30})
    with pytest.raises(ValueError, match=r'model\.ch: checkpoint 32 vs config 64.*diffusion\.num_diffusion_timesteps'):
        checkpoint.restore_ema_params(workdir, changed)
    # Settings that do not change the params' meaning (batch, lr, steps) may change on resume.
    longer = multihost_worker.tiny_config(**{'training.batch_size': 16, 'optim.lr': 1e-3})
    _, step = checkpoint.restore_ema_params(workdir, longer)
    assert step == 1
    # Nor do the compute switches: a float32 run's checkpoint is sampled in bfloat16, with other attention
    # code, remat, one-pass GroupNorm variance or Winograd convolutions; also when the saved config predates a
    # switch.
    switched = multihost_worker.tiny_config(**{'model.dtype': 'bfloat16', 'model.attention': 'dot_product',
                                               'model.remat': True, 'model.fast_variance': True,
                                               'model.upsample': 'repeat', 'model.conv3x3': 'winograd'})
    params, step = checkpoint.restore_ema_params(workdir, switched)
    assert step == 1
    _assert_state_equal(params, _state_at(config, mesh, 1).ema_params)
    saved = multihost_worker.tiny_config().to_dict()
    del saved['model']['fast_variance'], saved['model']['upsample'], saved['model']['conv3x3']
    checkpoint.check_compatible(saved, switched)
    # Evaluation-time choices: another fixed variance, loss or dropout; a learned variance changes the params.
    saved = multihost_worker.tiny_config().to_dict()
    assert saved['diffusion']['model_var_type'] == 'fixedlarge'
    checkpoint.check_compatible(saved, multihost_worker.tiny_config(**{
        'diffusion.model_var_type': 'fixedsmall', 'diffusion.loss_type': 'kl', 'model.dropout': 0.3,
        'diffusion.hybrid_lambda': 0.5}))
    for key, value in (('diffusion.model_var_type', 'learned_range'), ('diffusion.model_mean_type', 'xstart'),
                       ('diffusion.beta_end', 0.03), ('data.channels', 3)):
        with pytest.raises(ValueError, match=key.replace('.', r'\.')):
            checkpoint.check_compatible(saved, multihost_worker.tiny_config(**{key: value}))


def test_params_only_checkpoint_and_restore_ema_params(tmp_path, config, mesh):
    state = _state_at(config, mesh, 5)
    checkpoint.save_params_only(str(tmp_path / 'converted'), parallel.to_host(state.ema_params), config, 790_000)
    params, step = checkpoint.restore_ema_params(str(tmp_path / 'converted'), config)
    assert step == 790_000
    _assert_state_equal(params, state.ema_params)
    with pytest.raises(ValueError, match='params-only checkpoint'):
        _restore(str(tmp_path / 'converted'), config, mesh)
    # From a full training checkpoint: only the EMA item is read; a given step is honoured.
    _save_steps(str(tmp_path / 'full'), config, mesh, [1, 2])
    params, step = checkpoint.restore_ema_params(str(tmp_path / 'full'), config, step=1)
    assert step == 1
    _assert_state_equal(params, _state_at(config, mesh, 1).ema_params)
    with pytest.raises(FileNotFoundError, match='no checkpoint for step 7'):
        checkpoint.restore_ema_params(str(tmp_path / 'full'), config, step=7)
    with pytest.raises(FileNotFoundError, match='no checkpoints directory'):
        checkpoint.restore_ema_params(str(tmp_path / 'nothing'), config)


def test_params_only_rejects_misfit_params_and_stores_model_dtypes(tmp_path, config, mesh):
    params = parallel.to_host(_state_at(config, mesh, 1).ema_params)
    leaves, treedef = jax.tree.flatten(params)
    wrong_shape = jax.tree.unflatten(treedef, [leaves[0][..., :1]] + leaves[1:])
    with pytest.raises(ValueError, match='has shape'):
        checkpoint.save_params_only(str(tmp_path / 'a'), wrong_shape, config, 1)
    with pytest.raises(ValueError, match='missing'):
        checkpoint.save_params_only(str(tmp_path / 'b'), {'conv_in': params['conv_in']}, config, 1)
    # float64 weights (e.g. from a numpy conversion) are stored as the model's float32 and read back intact.
    as_float64 = jax.tree.map(lambda leaf: np.asarray(leaf, np.float64), params)
    checkpoint.save_params_only(str(tmp_path / 'c'), as_float64, config, 3)
    restored, _ = checkpoint.restore_ema_params(str(tmp_path / 'c'), config)
    _assert_state_equal(restored, params)


def test_preemption_reports_never_go_back_in_step(tmp_path, monkeypatch):
    # orbax's finalize thread reports the step it just saved, possibly older than the loop's last report; JAX's
    # sync point would take that older step as this host's position. Only non-decreasing steps reach JAX.
    reported = []

    def fake_sync_point(step):
        reported.append(step)
        return step == 7
    monkeypatch.setattr(ocp.utils, 'reached_preemption', fake_sync_point)
    manager = checkpoint.make_manager(str(tmp_path), multihost_worker.tiny_config())
    try:
        answers = [manager.reached_preemption(step) for step in (4, 5, 3, 5, 6, 2, 7)]
    finally:
        manager.close()
    assert reported == [4, 5, 5, 6, 7]
    assert answers == [False, False, False, False, False, False, True]
