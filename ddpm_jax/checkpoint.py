"""Checkpoints: an orbax CheckpointManager in `workdir/checkpoints`.

Each step directory holds three items, so evaluation can read the EMA params alone:
  ema_params   the EMA params (what sampling and evaluation use)
  train_state  {step, params, opt_state} (absent in params-only checkpoints from the converter)
  meta         JSON: package version, kind ('train' | 'params_only'), step, the config, and an
               integer checksum of every saved item, checked on restore.

Orbax writes each step to a temporary directory and renames it when complete, so a save that
is interrupted never replaces the last good checkpoint. A checkpoint with evidence of damage (a checksum
mismatch, missing or truncated files, undecodable metadata) is moved to `workdir/checkpoints_corrupt/` with
a warning and the previous one is used; when none is good, restoring raises an error instead of starting
over. A read that fails with an I/O error (EIO, a timeout, a permission error) says nothing about the bytes:
it is retried after `RETRY_WAITS_S` and then stops with `CheckpointIOError`, the checkpoint left in place.
The retries, the quarantine and the other failure handling are in `ddpm_jax.checkpoint_recovery`.
"""
import hashlib
import json
import os
import threading
from importlib import metadata
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import traverse_util

from ddpm_jax import checkpoint_recovery, optim, parallel
from ddpm_jax.errors import UserError
from ddpm_jax.models import params as params_lib, unet

ITEM_EMA = 'ema_params'
ITEM_STATE = 'train_state'
ITEM_META = 'meta'
KIND_TRAIN = 'train'
KIND_PARAMS_ONLY = 'params_only'

# Config entries a checkpoint is tied to: the params' shapes and meaning depend on them.
_COMPATIBILITY_KEYS = ('model', 'diffusion', 'data.image_size', 'data.channels')
# Entries under those keys that may differ between the run that wrote a checkpoint and the one that reads it:
# how the model computes (e.g. train in float32, sample in bfloat16 with cuDNN attention), and choices that
# change neither the params nor what the network predicts (the loss trains the same output; dropout is off at
# evaluation). model_var_type may change among the fixed variances (paper Table 2 samples one model with both).
_COMPUTE_SWITCHES = ('model.dtype', 'model.attention', 'model.remat', 'model.fast_variance', 'model.upsample',
                     'model.conv3x3', 'model.dropout', 'diffusion.loss_type', 'diffusion.hybrid_lambda')
_FIXED_VAR_TYPES = ('fixedsmall', 'fixedlarge')



class CorruptCheckpointError(UserError, RuntimeError):
    """A checkpoint with evidence of damage: files missing, truncated or undecodable, or a checksum mismatch."""



class CheckpointNotFoundError(UserError, FileNotFoundError):
    """No checkpoint (or not the requested step) where one is needed."""


class IncompatibleCheckpointError(UserError, ValueError):
    """A checkpoint written for another model/diffusion/data shape, or of a kind that cannot be resumed."""


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), 'checkpoints')


def package_version() -> str:
    try:
        return metadata.version('ddpm_jax')
    except Exception:
        return 'unknown'


class _CheckpointManager(ocp.CheckpointManager):
    """orbax's CheckpointManager whose preemption reports never go back in step.

    JAX's preemption sync point takes the step of the latest `reached_preemption(step)` call as this
    host's position. orbax also calls it from its asynchronous finalize thread with the step just saved,
    which may be older than the step the training loop has reported since; a preemption notice arriving
    then would set the sync step behind this host (it would never stop while the others stop and save).
    Older steps are therefore answered False without being reported.
    """

    def __init__(self, *args, **kwargs):
        self._report_lock = threading.Lock()
        self._last_reported_step = -1
        super().__init__(*args, **kwargs)

    def reached_preemption(self, step: int) -> bool:
        with self._report_lock:
            if step < self._last_reported_step:
                return False
            self._last_reported_step = step
        return super().reached_preemption(step)


def make_manager(workdir: str, config: Optional[ml_collections.ConfigDict] = None, *,
                 read_only: bool = False) -> ocp.CheckpointManager:
    """The manager of `workdir/checkpoints`.

    Keeps the latest `config.training.keep_latest` steps plus every multiple of
    `config.training.keep_every` (0: none). Saves are asynchronous; the loop decides when to save.
    """
    policies = []
    if config is not None:
        policies.append(ocp.checkpoint_managers.LatestN(n=max(1, int(config.training.keep_latest))))
        if config.training.keep_every > 0:
            policies.append(ocp.checkpoint_managers.EveryNSteps(interval_steps=int(config.training.keep_every)))
    options = ocp.CheckpointManagerOptions(
        create=not read_only,
        read_only=read_only,
        enable_async_checkpointing=True,
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies) if policies else None,
    )
    return _CheckpointManager(checkpoint_dir(workdir), options=options, item_names=(ITEM_EMA, ITEM_STATE, ITEM_META))


# ----------------------------------------------------------------------------------------------
# Integrity: a digest of the saved bits, checked on restore.

def tree_checksum(tree: Any) -> str:
    """Hex BLAKE2 digest of a pytree's leaves (raw bytes, dtypes and shapes, in tree order).

    Computed on a host copy (the state is replicated, so any process can compute it).
    """
    digest = hashlib.blake2b(digest_size=16)
    for leaf in jax.tree.leaves(parallel.to_host(tree)):
        leaf = np.ascontiguousarray(leaf)
        digest.update(f'{leaf.dtype.str}{leaf.shape}'.encode())
        digest.update(leaf.tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# Config compatibility.

def _config_dict(config: Any) -> dict:
    """A JSON-normal dict of a ConfigDict (tuples become lists)."""
    if isinstance(config, ml_collections.ConfigDict):
        config = config.to_dict()
    return json.loads(json.dumps(config, default=str))


def _select(config: dict, dotted: str) -> Any:
    for part in dotted.split('.'):
        config = config.get(part, {}) if isinstance(config, dict) else None
    return config


def _flatten(value: Any, prefix: str) -> dict:
    """{'<prefix>.<dotted path>': leaf} of a nested dict, or {prefix: value} for a leaf."""
    if isinstance(value, dict):
        return {f'{prefix}.{path}': leaf for path, leaf in traverse_util.flatten_dict(value, sep='.').items()}
    return {prefix: value}


def check_compatible(saved_config: dict, config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming every config entry that makes a checkpoint unusable with `config`: the model,
    diffusion and image-shape entries, except the compute switches and evaluation-time choices
    (`_COMPUTE_SWITCHES`) and a change between the fixed variance types."""
    saved, current = _config_dict(saved_config), _config_dict(config)
    differing = []
    for key in _COMPATIBILITY_KEYS:
        old, new = _flatten(_select(saved, key), key), _flatten(_select(current, key), key)
        for name in sorted((set(old) | set(new)) - set(_COMPUTE_SWITCHES)):
            if name == 'diffusion.model_var_type' and {old.get(name), new.get(name)} <= set(_FIXED_VAR_TYPES):
                continue
            if old.get(name) != new.get(name):
                differing.append(f'{name}: checkpoint {old.get(name)!r} vs config {new.get(name)!r}')
    if differing:
        raise IncompatibleCheckpointError(
            'The checkpoint was written with a different model/diffusion/data shape than the config: '
            + '; '.join(differing)
            + '. Use the config the checkpoint was trained with, or a fresh --workdir.')


def make_meta(config: ml_collections.ConfigDict, step: int, kind: str, checksums: dict) -> dict:
    return dict(package_version=package_version(), kind=kind, step=int(step), config=_config_dict(config),
                checksums=dict(checksums))


# ----------------------------------------------------------------------------------------------
# Save.

def save_state(manager: ocp.CheckpointManager, state: Any, config: ml_collections.ConfigDict) -> int:
    """Starts an asynchronous save of a TrainState (fields step, params, ema_params, opt_state).

    Returns the step saved. The arrays are copied off the devices before this returns, so the
    state may be donated to the next train step right away.
    """
    step = int(parallel.to_host(state.step))
    train_state = dict(step=state.step, params=state.params, opt_state=state.opt_state)
    checksums = {ITEM_STATE: tree_checksum(train_state), ITEM_EMA: tree_checksum(state.ema_params)}
    meta = make_meta(config, step, KIND_TRAIN, checksums)
    manager.save(step, force=True, args=ocp.args.Composite(**{
        ITEM_STATE: ocp.args.StandardSave(train_state),
        ITEM_EMA: ocp.args.StandardSave(state.ema_params),
        ITEM_META: ocp.args.JsonSave(meta),
    }))
    return step


def save_params_only(workdir: str, params: Any, config: ml_collections.ConfigDict, step: int) -> None:
    """Writes a checkpoint with only EMA params and meta (no optimizer state), and waits for it.

    Used for released/converted weights; `restore_ema_params` reads it like any checkpoint. The params
    must have the structure and shapes of the config's model (ValueError naming the first mismatch);
    they are stored in the model's param dtypes.
    """
    expected = _abstract_params(config)
    expected_leaves = dict(jax.tree_util.tree_leaves_with_path(expected))
    given_leaves = dict(jax.tree_util.tree_leaves_with_path(params))
    if expected_leaves.keys() != given_leaves.keys():
        missing = sorted(map(jax.tree_util.keystr, expected_leaves.keys() - given_leaves.keys()))
        extra = sorted(map(jax.tree_util.keystr, given_leaves.keys() - expected_leaves.keys()))
        raise ValueError(f'params do not fit the config\'s model: missing {missing[:5]}, unexpected {extra[:5]}')
    for path, leaf in given_leaves.items():
        if tuple(leaf.shape) != tuple(expected_leaves[path].shape):
            raise ValueError(f'params{jax.tree_util.keystr(path)} has shape {tuple(leaf.shape)}; the config\'s '
                             f'model needs {tuple(expected_leaves[path].shape)}')
    params = jax.tree.map(lambda leaf, want: np.asarray(leaf, dtype=want.dtype), params, expected)
    manager = make_manager(workdir)
    meta = make_meta(config, step, KIND_PARAMS_ONLY, {ITEM_EMA: tree_checksum(params)})
    manager.save(int(step), force=True, args=ocp.args.Composite(**{
        ITEM_EMA: ocp.args.StandardSave(params),
        ITEM_META: ocp.args.JsonSave(meta),
    }))
    manager.wait_until_finished()
    manager.close()


# ----------------------------------------------------------------------------------------------
# Restore.

def _abstract_params(config: ml_collections.ConfigDict) -> Any:
    """The params tree of the config's U-Net as ShapeDtypeStructs."""
    return params_lib.abstract_params(unet.create_model(config), params_lib.image_shape(config.data))


def _abstract(tree: Any, sharding: Optional[jax.sharding.Sharding]) -> Any:
    def leaf(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding if sharding is not None else
                                    getattr(x, 'sharding', None))
    return jax.tree.map(leaf, tree)



def _read_meta(manager: ocp.CheckpointManager, step: int) -> dict:
    try:
        restored = checkpoint_recovery.read_with_retries(
            lambda: manager.restore(step, args=ocp.args.Composite(**{ITEM_META: ocp.args.JsonRestore()})),
            step, str(manager.directory))
        meta = restored[ITEM_META]
    except checkpoint_recovery.CheckpointIOError:
        raise
    except Exception as error:
        raise CorruptCheckpointError(
            f'step {step}: metadata unreadable ({checkpoint_recovery.summarize_error(error)})') from error
    if not isinstance(meta, dict) or 'config' not in meta or 'checksums' not in meta:
        raise CorruptCheckpointError(f'step {step}: metadata incomplete: {meta!r:.200}')
    return meta


def _restore_items(manager: ocp.CheckpointManager, step: int, targets: dict) -> dict:
    """Restores the named items into their abstract targets and verifies their checksums."""
    meta = _read_meta(manager, step)
    missing = [name for name in targets if name not in meta['checksums']]
    if missing:
        raise IncompatibleCheckpointError(
            f'checkpoint step {step} is a {meta.get("kind")!r} checkpoint without {missing}; a params-only '
            'checkpoint (from the converter) can be sampled and evaluated but not resumed: train in a fresh --workdir.')
    try:
        restored = checkpoint_recovery.read_with_retries(lambda: manager.restore(step, args=ocp.args.Composite(
            **{name: ocp.args.StandardRestore(target) for name, target in targets.items()})),
                                      step, str(manager.directory))
    except checkpoint_recovery.CheckpointIOError:
        raise
    except Exception as error:
        raise CorruptCheckpointError(f'step {step}: {checkpoint_recovery.summarize_error(error)}') from error
    for name in targets:
        if tree_checksum(restored[name]) != meta['checksums'][name]:
            raise CorruptCheckpointError(f'step {step}: item {name!r} does not match its checksum')
    return dict(meta=meta, **{name: restored[name] for name in targets})



def _restore_with_fallback(workdir: str, manager: ocp.CheckpointManager, config: ml_collections.ConfigDict,
                           targets: dict, step: Optional[int], quarantine: bool) -> Optional[dict]:
    """Restores `step`, or the newest good step; None when there are no checkpoints.

    A step whose directory is gone after a failed read was deleted meanwhile (a trainer's retention, while an
    evaluation mode reads beside it): it is skipped with a warning, not counted as damage.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    if step is not None:
        if step not in steps:
            raise CheckpointNotFoundError(f'no checkpoint for step {step} in {checkpoint_dir(workdir)}; '
                                          f'available steps: {sorted(steps)}')
        steps = [step]
    if not steps:
        return None
    failures = []
    for candidate in steps:
        try:
            meta = _read_meta(manager, candidate)
            check_compatible(meta['config'], config)
            return _restore_items(manager, candidate, targets)
        except CorruptCheckpointError as error:
            if not os.path.isdir(os.path.join(checkpoint_dir(workdir), str(candidate))):
                failures.append(f'step {candidate}: deleted while being read')
                logging.warning('Checkpoint step %d in %s was deleted while being read (the retention of a run '
                                'training in this workdir); trying the previous one.', candidate,
                                checkpoint_dir(workdir))
                continue
            failures.append(str(error))
            logging.warning('Checkpoint step %d in %s is corrupt (%s); trying the previous one.',
                            candidate, checkpoint_dir(workdir), error)
            if quarantine:
                checkpoint_recovery.quarantine(workdir, manager, candidate)
    raise CorruptCheckpointError(
        f'no readable checkpoint in {checkpoint_dir(workdir)}: ' + '; '.join(failures)
        + ('. The damaged ones were moved to ' + os.path.join(os.path.abspath(workdir), 'checkpoints_corrupt')
           + '. To train from step 0 in this workdir anyway, pass --restart_from_scratch.' if quarantine else '.'))


def restore_state(workdir: str, manager: ocp.CheckpointManager, state: Any,
                  config: ml_collections.ConfigDict) -> Optional[Any]:
    """Restores the newest good checkpoint into the shapes, dtypes and shardings of `state`.

    Args:
      state: a TrainState (concrete or abstract, e.g. from jax.eval_shape, with shardings) as target.
    Returns:
      The restored TrainState, or None when `workdir` holds no checkpoint. Corrupt checkpoints are
      moved aside with a warning; ValueError when the config is incompatible.
    """
    train_target = _abstract(dict(step=state.step, params=state.params, opt_state=state.opt_state), None)
    targets = {ITEM_STATE: train_target, ITEM_EMA: _abstract(state.ema_params, None)}
    restored = _restore_with_fallback(workdir, manager, config, targets, None, quarantine=True)
    if restored is None:
        return None
    train_state = restored[ITEM_STATE]
    return state.replace(step=train_state['step'], params=train_state['params'],
                         opt_state=train_state['opt_state'], ema_params=restored[ITEM_EMA])


def restore_ema_params(workdir: str, config: ml_collections.ConfigDict,
                       step: Optional[int] = None) -> tuple:
    """Reads the EMA params of a training or params-only checkpoint, replicated over all devices.

    Args:
      workdir: the run's workdir (checkpoints in workdir/checkpoints).
      config: the run's config; ValueError when the checkpoint's model/diffusion/data shape differs.
      step: the step to read; None reads the newest good one (falling back past corrupt ones).
    Returns:
      (params, step).
    """
    if not os.path.isdir(checkpoint_dir(workdir)):
        raise CheckpointNotFoundError(f'no checkpoints directory {checkpoint_dir(workdir)}; train first or pass the '
                                      'workdir of a run (or one written by the converter).')
    mesh = parallel.make_mesh()
    target = _abstract(_abstract_params(config), parallel.replicated_sharding(mesh))
    manager = make_manager(workdir, read_only=True)
    try:
        restored = _restore_with_fallback(workdir, manager, config, {ITEM_EMA: target}, step, quarantine=False)
    finally:
        manager.close()
    if restored is None:
        raise CheckpointNotFoundError(f'no checkpoint in {checkpoint_dir(workdir)}: train (or convert) a model first.')
    return restored[ITEM_EMA], int(restored['meta']['step'])


def latest_step(workdir: str) -> Optional[int]:
    """The newest step directory in workdir/checkpoints (unverified), or None."""
    if not os.path.isdir(checkpoint_dir(workdir)):
        return None
    manager = make_manager(workdir, read_only=True)
    try:
        return manager.latest_step()
    finally:
        manager.close()


def restore_eval_params(workdir: str, config: ml_collections.ConfigDict, step: Optional[int] = None,
                        use_ema: bool = True) -> tuple:
    """(params, step) for evaluation: the EMA params (`restore_ema_params`), or with use_ema=False the raw
    params of a training checkpoint's train_state item, replicated over all devices.

    ValueError when use_ema=False and the checkpoint is params-only (converted weights hold no raw params).
    """
    if use_ema:
        return restore_ema_params(workdir, config, step)
    if not os.path.isdir(checkpoint_dir(workdir)):
        raise CheckpointNotFoundError(f'no checkpoints directory {checkpoint_dir(workdir)}; train first.')
    mesh = parallel.make_mesh()
    params = _abstract_params(config)
    target = _abstract(dict(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                            opt_state=jax.eval_shape(optim.make_optimizer(config.optim).init, params)),
                       parallel.replicated_sharding(mesh))
    manager = make_manager(workdir, read_only=True)
    try:
        chosen = step if step is not None else manager.latest_step()
        if chosen is not None and chosen in manager.all_steps():
            meta = _read_meta(manager, chosen)
            if ITEM_STATE not in meta['checksums']:
                raise IncompatibleCheckpointError(
                    f'eval.use_ema=False needs the raw params of a training checkpoint, but step {chosen} in '
                    f'{checkpoint_dir(workdir)} is a {meta.get("kind")!r} checkpoint (e.g. converted weights) that '
                    'holds only one set of params; use --config.eval.use_ema=True.')
        restored = _restore_with_fallback(workdir, manager, config, {ITEM_STATE: target}, step, quarantine=False)
    finally:
        manager.close()
    if restored is None:
        raise CheckpointNotFoundError(f'no checkpoint in {checkpoint_dir(workdir)}')
    return restored[ITEM_STATE]['params'], int(restored['meta']['step'])
