"""The hooks of the training loop (ddpm_jax/loop.py): metrics, test loss, checkpoints, sample grids, stopping.

Each takes plain values and callables; train.train builds them from the config. The official run_training
(diffusion_tf/tpu_utils/tpu_utils.py) logs summaries every 100 steps and saves checkpoints between TPU calls;
the sample grids, the test loss and the preemption handling are additions of this package.
"""
import os
import signal
import threading
import time
from typing import Any, Callable, Optional

import jax
import numpy as np
from absl import logging

from ddpm_jax import checkpoint_recovery, image_grid, parallel, progress as progress_lib
from ddpm_jax.errors import UserError
from ddpm_jax.loop import Hook


def at_boundary(step: int, every: int, num_steps: int) -> bool:
    """Whether `step` steps done is a multiple of `every` or the end of the run."""
    return step % every == 0 or step == num_steps


class StopRequest:
    """When a preempted or interrupted run saves and stops, at a step boundary that every host agrees on.

    Single host: SIGTERM and SIGINT (Ctrl-C) set a flag (these handlers replace the default ones, which
    would kill the process or raise KeyboardInterrupt anywhere, even inside a library callback that swallows
    it); the run stops after the dispatch in flight. A second SIGINT raises KeyboardInterrupt at once (no save).
    Several hosts: `jax.distributed.initialize` installs JAX's preemption notifier, a C++ SIGTERM
    handler. A SIGTERM to any one host reaches all hosts through the coordination service; they agree
    on a sync step, one past the largest step any host has reported to `manager.reached_preemption`, which
    is then True at that exact step on every host. No Python handler is installed here: it would
    replace the notifier's, and no host would learn of the preemption.
    """

    _SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, manager):
        self.requested = False
        self.signal_name = None
        self._manager = manager
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

    def should_stop(self, steps: range) -> bool:
        """Whether to save and stop after a dispatch; `steps`: the step counts it passed through
        (range(5, 7) for a dispatch that took the run from step 4 to step 6)."""
        if jax.process_count() > 1:
            # Report every step count of the dispatch: the sync step may fall inside it (with
            # steps_per_dispatch > 1), and is missed for good if only the dispatch's last step is reported.
            return any(self._manager.reached_preemption(step) for step in steps)
        return self.requested

    def raise_if_interrupted(self, step: int) -> None:
        if self.signal_name == 'SIGINT':
            raise KeyboardInterrupt(f'stopped by SIGINT at step {step}, after saving it')

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


class MetricLog:
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


def write_scalars(writer, values: dict) -> None:
    """Writes the mean of each metric over the fetched steps at the number of steps done after the last of them
    (the console's step count: values['step'] holds the 0-based index of each step)."""
    if writer is None:
        return
    step = int(values['step'][-1]) + 1
    for name in ('loss', 'grad_norm', 'lr'):
        writer.add_scalar(f'train/{name}', float(np.mean(values[name])), step)
    writer.flush()


class MetricsHook(Hook):
    """The console line (loss, grad_norm, lr, steps/s, img/s, ETA, test loss) and TensorBoard train/* every
    `log_every` steps and at the end; a non-finite loss or grad_norm stops the run (MetricLog.drain).

    The throughput and the ETA's rate start at the first log point after (re)start, so compilation never enters
    them; other work reported through `exclude` (grids, test loss) is kept out of them.
    """

    def __init__(self, writer, *, num_steps: int, log_every: int, batch_size: int):
        self._writer, self._num_steps, self._log_every, self._batch_size = writer, num_steps, log_every, batch_size
        self._log = MetricLog()
        self._eta = progress_lib.Progress('train', num_steps, window=10)
        self._log_time, self._log_step = time.time(), 0
        self._test_loss = None

    def on_train_begin(self, step: int) -> None:
        self._log_time, self._log_step = time.time(), step

    def exclude(self, seconds: float, *, from_eta: bool) -> None:
        """Keeps `seconds` of other work out of the throughput (and out of the ETA's rate when from_eta)."""
        self._log_time += seconds
        if from_eta:
            self._eta.exclude(seconds)

    def report_test_loss(self, value: float) -> None:
        """Adds the test loss of this dispatch's step to its console line."""
        self._test_loss = value

    def flush(self) -> None:
        """Fetches the pending metrics and writes them to TensorBoard (raises on a non-finite value)."""
        values = self._log.drain()
        if values is not None:
            write_scalars(self._writer, values)

    def on_dispatch_end(self, step: int, state: Any, metrics: dict) -> None:
        self._log.add(step - len(metrics['loss']), metrics)
        test_loss, self._test_loss = self._test_loss, None
        if at_boundary(step, self._log_every, self._num_steps):
            values = self._log.drain()
            write_scalars(self._writer, values)
            self._log_line(step, values, test_loss)
        elif test_loss is not None:
            logging.info('step %d/%d | test_loss %.6f (EMA)', step, self._num_steps, test_loss)

    def _log_line(self, step: int, values: dict, test_loss: Optional[float]) -> None:
        now = time.time()
        steps_per_second = (step - self._log_step) / max(now - self._log_time, 1e-9)
        self._log_time, self._log_step = now, step
        self._eta.update(step, log=False)
        eta_seconds = self._eta.eta_seconds()
        logging.info('step %d/%d | loss %.5f | grad_norm %.4f | lr %.3g | %.2f steps/s | %.1f img/s | ETA %s%s',
                     step, self._num_steps, values['loss'].mean(), values['grad_norm'].mean(), values['lr'][-1],
                     steps_per_second, steps_per_second * self._batch_size,
                     '?' if eta_seconds is None else progress_lib.format_duration(eta_seconds),
                     '' if test_loss is None else f' | test_loss {test_loss:.6f} (EMA)')


class TestLossHook(Hook):
    """The test L_simple of the EMA params every `every` steps (TensorBoard eval/test_loss, and the console).

    make_loss_fn() -> (ema_params -> float) is called at the first evaluation (it reads the eval split).
    """

    def __init__(self, make_loss_fn: Callable[[], Callable[[Any], float]], writer, *, every: int,
                 report: Callable[[float], None], exclude: Callable[[float], None]):
        self._make_loss_fn, self._writer, self._every = make_loss_fn, writer, every
        self._report, self._exclude = report, exclude
        self._loss_fn = None

    def on_dispatch_end(self, step: int, state: Any, metrics: dict) -> None:
        if step % self._every:
            return
        started = time.time()
        if self._loss_fn is None:
            self._loss_fn = self._make_loss_fn()
        value = self._loss_fn(state.ema_params)
        if self._writer is not None:
            self._writer.add_scalar('eval/test_loss', value, step)
            self._writer.flush()
        self._report(value)
        self._exclude(time.time() - started)


class SaveFailedError(UserError):
    """A checkpoint save that failed (disk full, permissions): training stops, the previous checkpoint stays."""


def save_failed(error: BaseException, step: int, directory: str) -> SaveFailedError:
    """The one-line SaveFailedError for a failed save of `step` into `directory` (train() removes the unfinished
    save)."""
    os_error = next((link for link in checkpoint_recovery.error_chain(error)
                     if isinstance(link, OSError) and link.errno), None)
    cause = os.strerror(os_error.errno) if os_error is not None else checkpoint_recovery.summarize_error(error)
    return SaveFailedError(
        f'{cause} while saving step {step} to {directory}: training stopped and the unfinished save is removed; '
        'the last complete checkpoint is kept. Free space or fix the permissions, then rerun the same command to '
        'resume from it.')


class CheckpointHook(Hook):
    """Saves every `every` steps, at the end and on an early stop (asynchronously, one save in flight); a failed
    save stops the run as soon as it is noticed (SaveFailedError), at the latest at the next save.

    manager: the orbax CheckpointManager; save(state) starts a save of `state`; flush() runs before each save
    (it fetches the metrics, so a state that followed a NaN is never saved); directory names the checkpoints in
    messages.
    """

    def __init__(self, manager, save: Callable[[Any], None], *, every: int, num_steps: int,
                 flush: Callable[[], None], directory: str):
        self._manager, self._save, self._flush, self._directory = manager, save, flush, directory
        self._every, self._num_steps = every, num_steps
        self._saving = None  # the step of the last save started and not yet known to have completed

    def check_saves(self, block: bool) -> None:
        """Raises SaveFailedError when the last save failed; waits for it to complete when `block`."""
        if self._saving is None or (not block and self._manager.is_saving_in_progress()):
            return
        try:
            self._manager.wait_until_finished()
        except Exception as error:  # pylint: disable=broad-except
            raise save_failed(error, self._saving, self._directory) from error
        self._saving = None

    def save(self, step: int, state: Any) -> None:
        self._flush()  # raises before saving a state that followed a NaN
        self.check_saves(block=True)  # orbax waits for the previous save anyway
        self._saving = step
        try:
            self._save(state)
        except Exception as error:  # pylint: disable=broad-except
            raise save_failed(error, step, self._directory) from error

    def on_dispatch_end(self, step: int, state: Any, metrics: dict) -> None:
        self.check_saves(block=False)  # a failed save stops the run now, not at the next save

    def on_continue(self, step: int, state: Any) -> None:
        if at_boundary(step, self._every, self._num_steps):
            self.save(step, state)

    def on_stop(self, step: int, state: Any) -> None:
        self.save(step, state)
        self.check_saves(block=True)

    def on_train_end(self, step: int, state: Any) -> None:
        self.check_saves(block=True)


class GridHook(Hook):
    """A PNG grid of EMA samples every `every` steps and at the end: workdir/samples/step_XXXXXXX.png.

    sample(ema_params) -> float images [N', H, W, C] in [-1, 1] (N' >= num_samples, a fixed key: successive grids
    start from the same noise); only process 0 writes (`is_primary`). The time it takes is kept out of the
    throughput and the ETA through exclude(seconds).
    """

    def __init__(self, sample: Callable[[Any], jax.Array], samples_dir: str, *, every: int, num_steps: int,
                 num_samples: int, scale: int, is_primary: bool, exclude: Callable[[float], None]):
        self._sample, self._dir, self._every, self._num_steps = sample, samples_dir, every, num_steps
        self._num_samples, self._scale, self._is_primary, self._exclude = num_samples, scale, is_primary, exclude

    def on_continue(self, step: int, state: Any) -> None:
        if not at_boundary(step, self._every, self._num_steps):
            return
        started = time.time()
        samples = parallel.to_host(self._sample(state.ema_params))[:self._num_samples]
        if self._is_primary:
            path = os.path.join(self._dir, f'step_{step:07d}.png')
            image_grid.save_image_grid(samples, path, scale=self._scale)
            logging.info('Wrote %s', path)
        self._exclude(time.time() - started)
