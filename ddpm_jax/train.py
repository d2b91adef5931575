"""Training: TrainState, the data-parallel train step, and `train`, which wires data, checkpoints and hooks.

The step is written for one device: it draws its randomness, computes the loss on its slice of
the batch, averages gradients and metrics with explicit `lax.pmean` over the `data` axis, and
applies Adam and the EMA update to its (replicated) copy of the state (official
diffusion_tf/tpu_utils/tpu_utils.py: a CrossShardOptimizer over the TPU replicas, then the EMA).
`make_train_step` compiles it with `jax.jit(jax.shard_map(...))` over the 1-D mesh of all devices, donating the
state. The loop itself is ddpm_jax/loop.py, its hooks ddpm_jax/hooks.py.

Randomness (fold_in chains never stored in the state, so a restart is exact):
  t ~ randint(0, T) and noise ~ N(0, I) of global example i at step s use
      fold_in(fold_in(example_stream, s), i),
  so the step's result does not depend on how many devices share the batch; dropout uses the
  per-device key fold_in(fold_in(dropout_stream, s), device_index). The streams are
  fold_in(key(config.seed), 1) and fold_in(key(config.seed), 2); the init key is fold_in(..., 0).
"""
import os
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from jax.sharding import PartitionSpec as P

from ddpm_jax import checkpoint
from ddpm_jax import checkpoint_recovery
from ddpm_jax import data as data_lib
from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax import losses
from ddpm_jax import hooks as hooks_lib
from ddpm_jax import loop
from ddpm_jax import optim
from ddpm_jax import parallel
from ddpm_jax import rng_streams
from ddpm_jax import validation
from ddpm_jax import workdir_lock
from ddpm_jax import xla_cpu
from ddpm_jax.evaluation import common as eval_common
from ddpm_jax.evaluation import sample as eval_sample
from ddpm_jax.evaluation import watch
from ddpm_jax.errors import UserError
from ddpm_jax.hooks import SaveFailedError
from ddpm_jax.models import params as params_lib
from ddpm_jax.models import unet



@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue: replicated over the mesh.

    step: int32 scalar, the number of optimizer steps taken; params / ema_params: the U-Net
    params and their EMA; opt_state: the optax state of `optim.make_optimizer`.
    """
    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any


def stream_key(config: ml_collections.ConfigDict, stream: int) -> jax.Array:
    return jax.random.fold_in(jax.random.key(config.seed), stream)


def make_init_fn(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Callable[[], TrainState]:
    """The compiled `() -> TrainState` of step 0, replicated over `mesh`.

    The EMA starts as a copy of the params in its own buffers (donating a state whose params and EMA
    share buffers fails).
    """
    model, shape = unet.create_model(config), params_lib.image_shape(config.data)
    optimizer = optim.make_optimizer(config.optim)
    rng = stream_key(config, rng_streams.TRAIN_INIT)

    def init() -> TrainState:
        params = params_lib.init_params(model, shape, rng)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          ema_params=jax.tree.map(jnp.copy, params), opt_state=optimizer.init(params))

    return jax.jit(init, out_shardings=parallel.replicated_sharding(mesh))


def create_train_state(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, *,
                       abstract: bool = False) -> TrainState:
    """The step-0 state, replicated over `mesh` (ShapeDtypeStructs with shardings when `abstract`)."""
    init = make_init_fn(config, mesh)
    if abstract:
        return jax.eval_shape(init)
    return init()


def make_train_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, *,
                    donate_state: bool = True) -> Callable:
    """The compiled step `(state, batches [K, B, H, W, C]) -> (state, metrics {name: [K]})`.

    Runs K = batches.shape[0] optimizer steps in one dispatch (lax.scan; unrolled on CPU, where XLA runs a loop
    whose body is a train step ~30x slower per step than the same steps written out). `batches` holds the global
    batches sharded on axis 1 (`parallel.shard_batch(..., batch_axis=1)`); the state is replicated and,
    with `donate_state` (default), donated: its buffers are reused for the new state and deleted; False
    keeps the input state alive (same results; for measuring what donation saves). Metrics (replicated):
    loss (batch mean), grad_norm (global norm of the averaged gradient, before clipping), lr (the
    learning rate of the step).
    """
    device_step = _device_step_fn(config)
    platform = mesh.devices.flat[0].platform
    unroll = platform == 'cpu'   # elsewhere one loop body keeps compile time flat in K

    def device_steps(state: TrainState, batches: jax.Array) -> tuple:
        if batches.shape[0] == 1:
            state, metrics = device_step(state, batches[0])
            return state, jax.tree.map(lambda m: m[None], metrics)
        return jax.lax.scan(device_step, state, batches, unroll=unroll)

    sharded = jax.shard_map(device_steps, mesh=mesh, in_specs=(P(), P(None, parallel.DATA_AXIS)),
                            out_specs=(P(), P()))
    return xla_cpu.jit(sharded, platform=platform, donate_argnums=0 if donate_state else ())


def _device_step_fn(config: ml_collections.ConfigDict) -> Callable:
    """`(state, x_start [b, H, W, C]) -> (state, metrics)`: one optimizer step on this device's slice, inside
    shard_map over the `data` axis (official run_cifar.py train_fn: L_simple and Adam; tpu_utils.py: the EMA)."""
    model = unet.create_model(config)
    diffusion = diffusion_lib.diffusion_from_config(config)
    optimizer = optim.make_optimizer(config.optim)
    schedule = optim.learning_rate_schedule(config.optim)
    ema_decay, ema_warmup = float(config.optim.ema_decay), bool(config.optim.ema_warmup)
    example_stream = stream_key(config, rng_streams.TRAIN_EXAMPLE)
    dropout_stream = stream_key(config, rng_streams.TRAIN_DROPOUT)

    def device_step(state: TrainState, x_start: jax.Array) -> tuple:
        keys = parallel.example_keys(example_stream, state.step, x_start.shape[0])
        t = jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, 0), (), 0, diffusion.num_timesteps))(keys)
        noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1), x_start.shape[1:],
                                                     x_start.dtype))(keys)
        x_t = diffusion_lib.q_sample(diffusion, x_start, t, noise)
        dropout_key = parallel.device_key(dropout_stream, state.step)

        def loss_fn(params):
            output = model.apply({'params': params}, x_t, t, train=True, rngs={'dropout': dropout_key})
            return jnp.mean(losses.training_losses(diffusion, output, x_start, x_t, t, noise))

        loss, grads = jax.value_and_grad(loss_fn)(parallel.to_varying(state.params))
        grads = jax.lax.pmean(grads, parallel.DATA_AXIS)
        loss = jax.lax.pmean(loss, parallel.DATA_AXIS)
        # The named scopes label these ops in profiles (experiments/profile_step.py).
        with jax.named_scope('optimizer'):
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
        with jax.named_scope('ema'):
            decay = optim.ema_decay_at(state.step, ema_decay, ema_warmup)
            ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
        metrics = dict(loss=loss.astype(jnp.float32), grad_norm=optax.tree.norm(grads).astype(jnp.float32),
                       lr=jnp.asarray(schedule(state.step), jnp.float32))
        return TrainState(step=state.step + 1, params=params, ema_params=ema_params, opt_state=opt_state), metrics

    return device_step


def make_grid_sampler(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, num_samples: int) -> Callable:
    """`ema_params -> float samples [N', H, W, C]` in [-1, 1], N' = num_samples rounded up to a multiple of the
    device count: one batch of the evaluation sampler (config.sampling: the paper's ancestral sampler by default)
    with the fixed key fold_in(sample_stream, 0), so grids from successive steps start from the same noise."""
    grid_config = config.copy_and_resolve_references()
    grid_config.sampling.batch_size = -(-num_samples // mesh.devices.size) * mesh.devices.size
    sample_batch = eval_sample.make_sample_batch_fn(grid_config, eval_common.model_apply_fn(config), mesh,
                                                    quantize=False)
    rng = jax.random.fold_in(stream_key(config, rng_streams.TRAIN_GRID_SAMPLE), 0)
    return lambda ema_params: sample_batch(ema_params, rng)


def validate_config(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
    """Raises a ValueError naming the value and the fix for training settings that cannot work: the config
    checks of validation.validate_config, and the global batch against the devices of `mesh`."""
    validation.validate_config(config, 'train')
    parallel.check_global_batch(config.training.batch_size, mesh)


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
    source = data_lib.load_source(config, config.data.train_split)  # a missing dataset or bad image fails here
    os.makedirs(workdir, exist_ok=True)
    with workdir_lock.writer_lock(workdir):
        manager = checkpoint.make_manager(workdir, config)
        try:
            state = _restore_or_start(config, workdir, mesh, manager, restart_from_scratch)
            step = int(parallel.to_host(state.step))
            batches = data_lib.train_batches(config, start_step=step, source=source)
            state = _run(config, workdir, mesh, manager, state, step, batches)
        except BaseException as error:
            try:  # waits for a save in flight; its own failure, if any, was reported or is secondary to this one
                manager.close()
            except Exception as close_error:  # pylint: disable=broad-except
                logging.warning('Closing the checkpoint manager failed too: %s',
                                checkpoint_recovery.summarize_error(close_error))
            if isinstance(error, SaveFailedError):  # only now: orbax's threads write into it until the close
                for path in checkpoint_recovery.remove_unfinished_saves(workdir):
                    logging.warning('Removed the unfinished save %s', path)
            raise
        manager.close()
        return state


def _restore_or_start(config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh, manager,
                      restart_from_scratch: bool) -> TrainState:
    """The state of the newest good checkpoint, or the step-0 state in a workdir that has never held one.

    A workdir whose checkpoints are all gone or quarantined (checkpoint_recovery.checkpoint_history) is refused
    with a UserError naming what was found: starting over would silently discard the run. `restart_from_scratch`
    starts from step 0 there instead; where a readable checkpoint exists it resumes as usual (so a job that is
    restarted with the flag still on keeps its new progress).
    """
    try:  # the abstract state (a trace of the initialiser, ~0.5 s) only where there is something to restore
        state = checkpoint.restore_state(workdir, manager, create_train_state(config, mesh, abstract=True),
                                         config) if manager.all_steps() else None
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
    history = checkpoint_recovery.checkpoint_history(workdir)
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


def _run(config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh, manager, state: TrainState,
         step: int, batches) -> TrainState:
    """Runs loop.run from `step` with the compiled step and the hooks of config.training (TensorBoard on
    process 0 only)."""
    training = config.training
    num_steps, train_step = int(training.num_train_steps), make_train_step(config, mesh)
    every = [training.log_every_steps, training.checkpoint_every_steps, training.sample_every_steps]
    every += [training.eval_every_steps] if training.eval_every_steps > 0 else []
    writer = None
    if jax.process_index() == 0:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
        writer = SummaryWriter(os.path.join(workdir, 'tensorboard'))

    def step_fn(state: TrainState, local_batches):
        return train_step(state, parallel.shard_batch(local_batches, mesh, batch_axis=1))

    try:
        hooks = _make_hooks(config, workdir, mesh, manager, writer)
        with hooks_lib.StopRequest(manager) as stop:
            return loop.run(state, step_fn, batches, hooks, start_step=step, num_steps=num_steps, stop=stop,
                            dispatch=lambda s: loop.dispatch_size(s, num_steps, training.steps_per_dispatch, every))
    finally:
        if writer is not None:
            writer.close()


def _make_hooks(config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh, manager,
                writer) -> list:
    """[checkpoints, test loss (eval_every_steps > 0), metrics, sample grids (num_grid_samples > 0)], in the
    order they run after each dispatch."""
    training, num_steps = config.training, int(config.training.num_train_steps)
    metrics = hooks_lib.MetricsHook(writer, num_steps=num_steps, log_every=training.log_every_steps,
                                    batch_size=training.batch_size)
    hooks = [hooks_lib.CheckpointHook(manager, lambda state: checkpoint.save_state(manager, state, config),
                                      every=training.checkpoint_every_steps, num_steps=num_steps,
                                      flush=metrics.flush, directory=checkpoint.checkpoint_dir(workdir))]
    if training.eval_every_steps > 0:
        def make_loss_fn():
            return watch.make_test_loss_fn(config, eval_common.model_apply_fn(config), mesh)
        hooks.append(hooks_lib.TestLossHook(make_loss_fn, writer, every=training.eval_every_steps,
                                            report=metrics.report_test_loss,
                                            exclude=lambda seconds: metrics.exclude(seconds, from_eta=False)))
    hooks.append(metrics)
    if training.num_grid_samples > 0:
        hooks.append(hooks_lib.GridHook(
            make_grid_sampler(config, mesh, training.num_grid_samples), os.path.join(workdir, 'samples'),
            every=training.sample_every_steps, num_steps=num_steps, num_samples=training.num_grid_samples,
            scale=max(1, 64 // config.data.image_size), is_primary=jax.process_index() == 0,
            exclude=lambda seconds: metrics.exclude(seconds, from_eta=True)))
    return hooks
