"""Training: TrainState, the data-parallel train step, and the training loop.

The step is written for one device: it draws its randomness, computes the loss on its slice of
the batch, averages gradients and metrics with explicit `lax.pmean` over the `data` axis, and
applies Adam and the EMA update to its (replicated) copy of the state. `make_train_step` compiles
it with `jax.jit(jax.shard_map(...))` over the 1-D mesh of all devices, donating the state.

Randomness (SPEC.md section 5; fold_in chains never stored in the state, so a restart is exact):
  t ~ randint(0, T) and noise ~ N(0, I) of global example i at step s use
      fold_in(fold_in(example_stream, s), i),
  so the step's result does not depend on how many devices share the batch; dropout uses the
  per-device key fold_in(fold_in(dropout_stream, s), device_index). The streams are
  fold_in(key(config.seed), 1) and fold_in(key(config.seed), 2); the init key is fold_in(..., 0).
"""
import functools
import json
import math
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import PartitionSpec as P

from ddpm_jax import checkpoint
from ddpm_jax import data as data_lib
from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax import image_grid
from ddpm_jax import parallel
from ddpm_jax import validation
from ddpm_jax import workdir_lock
from ddpm_jax.errors import UserError
from ddpm_jax import progress as progress_lib
from ddpm_jax.models import unet

_INIT_STREAM, _EXAMPLE_STREAM, _DROPOUT_STREAM, _SAMPLE_STREAM = 0, 1, 2, 3


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue: replicated over the mesh.

    step: int32 scalar, the number of optimizer steps taken; params / ema_params: the U-Net
    params and their EMA; opt_state: the optax state of `make_optimizer`.
    """
    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any


def stream_key(config: ml_collections.ConfigDict, stream: int) -> jax.Array:
    return jax.random.fold_in(jax.random.key(config.seed), stream)


def learning_rate_schedule(optim: ml_collections.ConfigDict) -> optax.Schedule:
    """lr * min(step / warmup_steps, 1) (official: the first step has lr 0); constant lr when warmup is 0."""
    lr, warmup = float(optim.lr), int(optim.warmup_steps)
    if warmup <= 0:
        return lambda step: jnp.full((), lr, jnp.float32)
    return lambda step: lr * jnp.minimum(jnp.asarray(step, jnp.float32) / warmup, 1.0)


def make_optimizer(optim: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Global-norm clipping (skipped when grad_clip is 0), then Adam with the warmup schedule.

    The official code clips each TPU replica's gradient before averaging (SPEC.md section 5); here the
    averaged global-batch gradient is clipped, the natural data-parallel equivalent.
    """
    adam = optax.adam(learning_rate_schedule(optim), b1=optim.beta1, b2=optim.beta2, eps=optim.eps)
    if optim.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(optim.grad_clip), adam)
    return adam


def init_params(config: ml_collections.ConfigDict, rng: jax.Array) -> Any:
    """Fresh U-Net params for config (the model's own initialisers)."""
    size, channels = config.data.image_size, config.data.channels
    model = unet.create_model(config)
    variables = model.init({'params': rng}, jnp.zeros((1, size, size, channels), jnp.float32),
                           jnp.zeros((1,), jnp.int32), train=False)
    return variables['params']


class _CompileKey:
    """Hashable view of the config entries that shape the compiled functions, so that repeated
    train() calls in one process (tests, notebooks) reuse compiled code."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config.copy_and_resolve_references()
        self._key = json.dumps({name: config[name].to_dict() for name in ('data', 'model', 'diffusion', 'optim',
                                                                            'sampling')} | {'seed': config.seed},
                               sort_keys=True, default=repr)

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        return isinstance(other, _CompileKey) and self._key == other._key


def create_train_state(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, *,
                       abstract: bool = False) -> TrainState:
    """The step-0 state, replicated over `mesh` (ShapeDtypeStructs with shardings when `abstract`).

    The EMA starts as a copy of the params in its own buffers (donating a state whose params and EMA
    share buffers fails).
    """
    init = _compiled_init(_CompileKey(config), mesh)
    if abstract:
        return jax.eval_shape(init)
    return init()


@functools.lru_cache(maxsize=4)
def _compiled_init(key: _CompileKey, mesh: jax.sharding.Mesh) -> Callable[[], TrainState]:
    config = key.config
    optimizer = make_optimizer(config.optim)

    def init() -> TrainState:
        params = init_params(config, stream_key(config, _INIT_STREAM))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          ema_params=jax.tree.map(jnp.copy, params), opt_state=optimizer.init(params))

    return jax.jit(init, out_shardings=parallel.replicated_sharding(mesh))


def make_train_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, *,
                    donate_state: bool = True) -> Callable:
    """The compiled step `(state, batches [K, B, H, W, C]) -> (state, metrics {name: [K]})`.

    Runs K = batches.shape[0] optimizer steps in one dispatch (lax.scan). `batches` holds the global
    batches sharded on axis 1 (`parallel.shard_batch(..., batch_axis=1)`); the state is replicated and,
    with `donate_state` (default), donated: its buffers are reused for the new state and deleted; False
    keeps the input state alive (same results; for measuring what donation saves). Metrics (replicated):
    loss (batch mean), grad_norm (global norm of the averaged gradient, before clipping), lr (the
    learning rate of the step).
    """
    return _compiled_train_step(_CompileKey(config), mesh, bool(donate_state))


@functools.lru_cache(maxsize=4)
def _compiled_train_step(key: _CompileKey, mesh: jax.sharding.Mesh, donate_state: bool) -> Callable:
    config = key.config
    model = unet.create_model(config)
    diffusion = diffusion_lib.diffusion_from_config(config)
    optimizer = make_optimizer(config.optim)
    schedule = learning_rate_schedule(config.optim)
    ema_decay = float(config.optim.ema_decay)
    ema_warmup = bool(config.optim.get('ema_warmup', False))
    num_timesteps = diffusion.num_timesteps
    example_stream = stream_key(config, _EXAMPLE_STREAM)
    dropout_stream = stream_key(config, _DROPOUT_STREAM)

    def device_step(state: TrainState, x_start: jax.Array) -> tuple:
        """One optimizer step on this device's slice x_start [b, H, W, C]."""
        keys = parallel.example_keys(example_stream, state.step, x_start.shape[0])
        t = jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, 0), (), 0, num_timesteps))(keys)
        noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1), x_start.shape[1:],
                                                     x_start.dtype))(keys)
        x_t = diffusion_lib.q_sample(diffusion, x_start, t, noise)
        dropout_key = parallel.device_key(dropout_stream, state.step)

        def loss_fn(params):
            output = model.apply({'params': params}, x_t, t, train=True, rngs={'dropout': dropout_key})
            return jnp.mean(diffusion_lib.training_losses(diffusion, output, x_start, x_t, t, noise))

        loss, grads = jax.value_and_grad(loss_fn)(parallel.to_varying(state.params))
        grads = jax.lax.pmean(grads, parallel.DATA_AXIS)
        loss = jax.lax.pmean(loss, parallel.DATA_AXIS)
        # The named scopes label these ops in profiles (experiments/profile_step.py).
        with jax.named_scope('optimizer'):
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
        with jax.named_scope('ema'):
            decay = ema_decay_at(state.step, ema_decay, ema_warmup)
            ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
        metrics = dict(loss=loss.astype(jnp.float32), grad_norm=optax.tree.norm(grads).astype(jnp.float32),
                       lr=jnp.asarray(schedule(state.step), jnp.float32))
        return TrainState(step=state.step + 1, params=params, ema_params=ema_params, opt_state=opt_state), metrics

    def device_steps(state: TrainState, batches: jax.Array) -> tuple:
        if batches.shape[0] == 1:
            state, metrics = device_step(state, batches[0])
            return state, jax.tree.map(lambda m: m[None], metrics)
        return jax.lax.scan(device_step, state, batches)

    sharded = jax.shard_map(device_steps, mesh=mesh, in_specs=(P(), P(None, parallel.DATA_AXIS)),
                            out_specs=(P(), P()))
    return jax.jit(sharded, donate_argnums=0 if donate_state else ())


def ema_decay_at(step: jax.Array, ema_decay: float, warmup: bool) -> jax.Array:
    """The EMA decay of the update after `step` steps (int scalar): float32 scalar.

    Official (diffusion_tf/utils.py): 0 at the first step (the shadow becomes the params), then ema_decay.
    warmup=True: 0 at the first step, then min(ema_decay, (1 + step) / (10 + step)) (the warm-up of TF's
    ExponentialMovingAverage with num_updates), so that after n steps the initialisation's weight is ~0 instead of
    ema_decay^n (0.999^1500 = 22% for the digits default).
    """
    decay = jnp.asarray(ema_decay, jnp.float32)
    if warmup:
        step_f = jnp.asarray(step, jnp.float32)
        decay = jnp.minimum(decay, (1.0 + step_f) / (10.0 + step_f))
    return jnp.where(step == 0, 0.0, decay).astype(jnp.float32)


def make_grid_sampler(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, num_samples: int) -> Callable:
    """Compiled `ema_params -> samples [N', H, W, C]` (N' >= num_samples, a multiple of the device count).

    Each device runs diffusion.p_sample_loop on its share with key fold_in(sample_stream, device); the
    key is fixed, so grids from successive steps start from the same noise.
    """
    return _compiled_grid_sampler(_CompileKey(config), mesh, num_samples)


@functools.lru_cache(maxsize=4)
def _compiled_grid_sampler(key: _CompileKey, mesh: jax.sharding.Mesh, num_samples: int) -> Callable:
    config = key.config
    model = unet.create_model(config)
    diffusion = diffusion_lib.diffusion_from_config(config)
    num_devices = mesh.devices.size
    per_device = max(1, math.ceil(num_samples / num_devices))
    shape = (per_device, config.data.image_size, config.data.image_size, config.data.channels)
    sample_stream = stream_key(config, _SAMPLE_STREAM)

    def device_sample(params):
        rng = jax.random.fold_in(sample_stream, jax.lax.axis_index(parallel.DATA_AXIS))
        model_fn = lambda x, t: model.apply({'params': params}, x, t, train=False)
        return diffusion_lib.p_sample_loop(diffusion, model_fn, shape, rng,
                                           clip_denoised=config.sampling.clip_denoised)

    return jax.jit(jax.shard_map(device_sample, mesh=mesh, in_specs=P(), out_specs=P(parallel.DATA_AXIS)))


def validate_config(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
    """Raises a ValueError naming the value and the fix for training settings that cannot work: the config
    checks of validation.validate_config, and the global batch against the devices of `mesh`."""
    validation.validate_config(config, 'train')
    parallel.check_global_batch(config.training.batch_size, mesh)


class _StopRequest:
    """When a preempted or interrupted run saves and stops, at a step boundary that every host agrees on.

    Single host: SIGTERM and SIGINT (Ctrl-C) set a flag (these handlers replace the default ones, which
    would kill the process or raise KeyboardInterrupt anywhere, even inside a library callback that swallows
    it); the run stops after the dispatch in flight. A second SIGINT raises KeyboardInterrupt at once (no save).
    Several hosts: `jax.distributed.initialize` installs JAX's preemption notifier, a C++ SIGTERM
    handler. A SIGTERM to any one host reaches all hosts through the coordination service; they agree
    on a sync step, one past the largest step any host has reported to `reached_preemption`, which
    is then True at that exact step on every host. No Python handler is installed here: it would
    replace the notifier's, and no host would learn of the preemption.
    """

    _SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self.signal_name = None
        self._previous = {}

    def __enter__(self):
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._handle) for signum in self._SIGNALS}
        return self

    def _handle(self, signum, frame):  # pylint: disable=unused-argument
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt('second SIGINT: stopped without saving')
        self.signal_name = signal.Signals(signum).name
        logging.warning('%s received: saving a checkpoint and stopping%s.', self.signal_name,
                        ' (press Ctrl-C again to stop without saving)' if signum == signal.SIGINT else '')
        self.requested = True

    def should_stop(self, manager, steps: range) -> bool:
        """Whether to save and stop after a dispatch; `steps`: the step counts it passed through
        (range(5, 7) for a dispatch that took the run from step 4 to step 6)."""
        if jax.process_count() > 1:
            # Report every step count of the dispatch: the sync step may fall inside it (with
            # steps_per_dispatch > 1), and is missed for good if only the dispatch's last step is reported.
            return any(manager.reached_preemption(step) for step in steps)
        return self.requested

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


class _MetricLog:
    """Keeps the metrics of dispatched steps on device and fetches them only at log/save points."""

    def __init__(self):
        self._pending = []  # (first step, {name: device array [K]})

    def add(self, first_step: int, metrics: dict) -> None:
        self._pending.append((first_step, metrics))

    def drain(self) -> Optional[dict]:
        """Fetches everything pending: {name: float64 [n]} plus 'step' [n]; raises on a non-finite value."""
        if not self._pending:
            return None
        fetched = parallel.to_host([metrics for _, metrics in self._pending])
        steps = np.concatenate([first + np.arange(len(m['loss'])) for (first, _), m in zip(self._pending, fetched)])
        self._pending = []
        merged = {name: np.concatenate([m[name] for m in fetched]).astype(np.float64) for name in fetched[0]}
        for name in ('loss', 'grad_norm'):
            bad = ~np.isfinite(merged[name])
            if bad.any():
                index = int(np.argmax(bad))
                raise FloatingPointError(
                    f'{name} is {merged[name][index]} at step {int(steps[index])}: stopping. The state after it is '
                    'not saved; the last good checkpoint is kept. Lower config.optim.lr, keep grad clipping on, '
                    'or use float32 compute.')
        merged['step'] = steps
        return merged


def _next_boundary(step: int, every: int) -> int:
    return (step // every + 1) * every


class SaveFailedError(UserError):
    """A checkpoint save that failed (disk full, permissions): training stops, the previous checkpoint stays."""


def train(config: ml_collections.ConfigDict, workdir: str, *, restart_from_scratch: bool = False) -> TrainState:
    """Trains (or resumes) the run in `workdir` up to config.training.num_train_steps.

    Writes workdir/checkpoints (orbax), workdir/tensorboard (scalars loss, grad_norm, lr),
    workdir/samples/step_XXXXXXX.png (EMA sample grids). Returns the final state. Process 0 holds the
    workdir's lock (workdir_lock) throughout. A workdir that has held checkpoints but has none readable left
    is refused unless `restart_from_scratch` (see `_restore_or_start`).
    Raises KeyboardInterrupt after saving when SIGINT stopped the run (single host).
    """
    mesh = parallel.make_mesh()
    validate_config(config, mesh)
    is_primary = jax.process_index() == 0
    source = data_lib.load_source(config, config.data.train_split)  # a missing dataset or bad image fails here
    os.makedirs(workdir, exist_ok=True)
    with workdir_lock.writer_lock(workdir):
        manager = checkpoint.make_manager(workdir, config)
        try:
            state = _restore_or_start(config, workdir, mesh, manager, restart_from_scratch)
            step = int(parallel.to_host(state.step))
            batches = data_lib.train_batches(config, start_step=step, source=source)
            state = _train_loop(config, workdir, mesh, manager, state, step, batches, is_primary)
        except BaseException as error:
            try:  # waits for a save in flight; its own failure, if any, was reported or is secondary to this one
                manager.close()
            except Exception as close_error:  # pylint: disable=broad-except
                logging.warning('Closing the checkpoint manager failed too: %s',
                                checkpoint.summarize_error(close_error))
            if isinstance(error, SaveFailedError):  # only now: orbax's threads write into it until the close
                for path in checkpoint.remove_unfinished_saves(workdir):
                    logging.warning('Removed the unfinished save %s', path)
            raise
        manager.close()
        return state


def _restore_or_start(config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh, manager,
                      restart_from_scratch: bool) -> TrainState:
    """The state of the newest good checkpoint, or the step-0 state in a workdir that has never held one.

    A workdir whose checkpoints are all gone or quarantined (checkpoint.checkpoint_history) is refused with a
    UserError naming what was found: starting over would silently discard the run. `restart_from_scratch`
    starts from step 0 there instead; where a readable checkpoint exists it resumes as usual (so a job that is
    restarted with the flag still on keeps its new progress).
    """
    try:
        state = checkpoint.restore_state(workdir, manager, create_train_state(config, mesh, abstract=True), config)
    except checkpoint.CorruptCheckpointError:
        if not restart_from_scratch:
            raise
        state = None  # every checkpoint is now in checkpoints_corrupt
    if state is not None:
        step = int(parallel.to_host(state.step))
        logging.info('Resumed from the checkpoint of step %d in %s', step, checkpoint.checkpoint_dir(workdir))
        if restart_from_scratch:
            logging.warning('--restart_from_scratch has no effect: %s holds the readable checkpoint of step %d, so '
                            'the run resumes from it.', workdir, step)
        return state
    history = checkpoint.checkpoint_history(workdir)
    if history and not restart_from_scratch:
        shown = ', '.join(history[:4]) + (f' and {len(history) - 4} more' if len(history) > 4 else '')
        raise UserError(f'{workdir} has held checkpoints but none is readable now (found {shown}); refusing to '
                        'start over from step 0, which would discard the run. Restore them, train in a fresh '
                        '--workdir, or pass --restart_from_scratch to train from step 0 in this workdir.')
    if history:
        logging.warning('--restart_from_scratch: starting from step 0 in %s, which held checkpoints (kept in %s).',
                        workdir, os.path.join(workdir, 'checkpoints_corrupt'))
    else:
        logging.info('Starting a new run in %s', workdir)
    return create_train_state(config, mesh)


def _save_failed(error: BaseException, step: int, workdir: str) -> SaveFailedError:
    """The one-line SaveFailedError for a failed save of `step` (train() removes the unfinished directory)."""
    os_error = next((link for link in checkpoint.error_chain(error)
                     if isinstance(link, OSError) and link.errno), None)
    cause = os.strerror(os_error.errno) if os_error is not None else checkpoint.summarize_error(error)
    return SaveFailedError(
        f'{cause} while saving step {step} to {checkpoint.checkpoint_dir(workdir)}: training stopped and the '
        'unfinished save is removed; the last complete checkpoint is kept. Free space or fix the permissions, then '
        'rerun the same command to resume from it.')


def _train_loop(config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh, manager, state: TrainState,
                step: int, batches: Iterator[np.ndarray], is_primary: bool) -> TrainState:
    training = config.training
    num_steps = int(training.num_train_steps)
    steps_per_dispatch = int(training.get('steps_per_dispatch', 1))
    train_step = make_train_step(config, mesh)
    grid_sampler = None
    writer = None
    if is_primary:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
        writer = SummaryWriter(os.path.join(workdir, 'tensorboard'))
    metric_log = _MetricLog()
    log_time, log_step = time.time(), step
    # The ETA's rate starts at the first log point after (re)start, so compilation never enters it.
    eta = progress_lib.Progress('train', num_steps, window=10)

    saving = None  # the step of the last save started and not yet known to have completed

    def check_saves(block: bool) -> None:
        """Raises SaveFailedError when the last save failed; waits for it to complete when `block`."""
        nonlocal saving
        if saving is None or (not block and manager.is_saving_in_progress()):
            return
        try:
            manager.wait_until_finished()
        except Exception as error:  # pylint: disable=broad-except
            raise _save_failed(error, saving, workdir) from error
        saving = None
    eval_every = int(training.get('eval_every_steps', 0))
    test_loss_fn = None

    def save() -> None:
        nonlocal saving
        values = metric_log.drain()  # raises before saving a state that followed a NaN
        if values is not None:
            _write_scalars(writer, values)
        check_saves(block=True)  # orbax waits for the previous save anyway
        saving = step
        try:
            checkpoint.save_state(manager, state, config)
        except Exception as error:  # pylint: disable=broad-except
            raise _save_failed(error, step, workdir) from error

    def write_samples() -> None:
        nonlocal grid_sampler, log_time
        if training.num_grid_samples <= 0:
            return
        started = time.time()
        if grid_sampler is None:
            grid_sampler = make_grid_sampler(config, mesh, training.num_grid_samples)
        samples = parallel.to_host(grid_sampler(state.ema_params))[:training.num_grid_samples]
        if is_primary:
            path = os.path.join(workdir, 'samples', f'step_{step:07d}.png')
            image_grid.save_image_grid(samples, path, scale=max(1, 64 // config.data.image_size))
            logging.info('Wrote %s', path)
        log_time += time.time() - started  # keep sampling out of the training throughput
        eta.exclude(time.time() - started)

    def evaluate_test_loss() -> float:
        """The watch's test L_simple (same fixed batches, t and noise) of the EMA params; TensorBoard eval/test_loss."""
        nonlocal test_loss_fn, log_time
        started = time.time()
        if test_loss_fn is None:
            from ddpm_jax.evaluation import common, watch  # pylint: disable=g-import-not-at-top
            test_loss_fn = watch.make_test_loss_fn(config, common.model_apply_fn(config), mesh)
        value = test_loss_fn(state.ema_params)
        if writer is not None:
            writer.add_scalar('eval/test_loss', value, step)
            writer.flush()
        log_time += time.time() - started  # keep evaluation out of the training throughput
        return value

    try:
        with _StopRequest() as stop:
            # Report the start step at once (several hosts): until a host reports a step, a preemption notice
            # gives sync step 1, which a resumed run never reaches. The state equals the restored checkpoint.
            if step < num_steps and stop.should_stop(manager, range(step, step + 1)):
                logging.warning('Preempted at step %d before training; rerun the same command to resume.', step)
                return state
            while step < num_steps:
                count = min(steps_per_dispatch, num_steps - step,
                            *(_next_boundary(step, every) - step for every in
                              (training.log_every_steps, training.checkpoint_every_steps, training.sample_every_steps,
                               eval_every or num_steps)))
                local = np.stack([next(batches) for _ in range(count)])
                state, metrics = train_step(state, parallel.shard_batch(local, mesh, batch_axis=1))
                metric_log.add(step, metrics)
                step += count
                check_saves(block=False)  # a failed save stops the run now, not at the next save

                test_loss = None
                if eval_every and step % eval_every == 0:
                    test_loss = evaluate_test_loss()
                if step % training.log_every_steps == 0 or step == num_steps:
                    values = metric_log.drain()
                    if values is not None:
                        _write_scalars(writer, values)
                        now = time.time()
                        steps_per_second = (step - log_step) / max(now - log_time, 1e-9)
                        log_time, log_step = now, step
                        eta.update(step, log=False)
                        eta_seconds = eta.eta_seconds()
                        logging.info('step %d/%d | loss %.5f | grad_norm %.4f | lr %.3g | %.2f steps/s | '
                                     '%.1f img/s | ETA %s%s', step, num_steps, values['loss'].mean(),
                                     values['grad_norm'].mean(), values['lr'][-1], steps_per_second,
                                     steps_per_second * training.batch_size,
                                     '?' if eta_seconds is None else progress_lib.format_duration(eta_seconds),
                                     '' if test_loss is None else f' | test_loss {test_loss:.6f} (EMA)')
                        test_loss = None
                if test_loss is not None:
                    logging.info('step %d/%d | test_loss %.6f (EMA)', step, num_steps, test_loss)
                stopping = stop.should_stop(manager, range(step - count + 1, step + 1))
                if step % training.checkpoint_every_steps == 0 or step == num_steps or stopping:
                    save()
                if stopping:
                    check_saves(block=True)
                    logging.warning('Stopped at step %d after saving; rerun the same command to resume.', step)
                    if stop.signal_name == 'SIGINT':
                        raise KeyboardInterrupt(f'stopped by SIGINT at step {step}, after saving it')
                    return state
                if step % training.sample_every_steps == 0 or step == num_steps:
                    write_samples()
            check_saves(block=True)
            return state
    finally:
        if writer is not None:
            writer.close()


def _write_scalars(writer, values: dict) -> None:
    """Writes the mean of each metric over the fetched steps at the number of steps done after the last of them
    (the console's step count: values['step'] holds the 0-based index of each step)."""
    if writer is None:
        return
    step = int(values['step'][-1]) + 1
    for name in ('loss', 'grad_norm', 'lr'):
        writer.add_scalar(f'train/{name}', float(np.mean(values[name])), step)
    writer.flush()
