"""The training loop: dispatch compiled steps, let hooks observe and act, stop at the end or on preemption.

`run(state, step_fn, batches, hooks, ...)` is the whole loop; everything else a run does (console and
TensorBoard metrics, checkpoints, sample grids, the periodic test loss) is a `Hook` (ddpm_jax/hooks.py), in the
manner of swirl-dynamics' templates/train.py and callbacks. The official loop (diffusion_tf/tpu_utils/tpu_utils.py
run_training) runs `iterations_per_loop` steps per TPU call and logs and saves between calls; here a dispatch
runs up to `steps_per_dispatch` steps and never crosses a log, save, sample or eval boundary.

After each dispatch the hooks run in two phases around the stop decision:
  on_dispatch_end(step, state, metrics)  every hook, in order: observe (save failures, test loss, logging);
  then, when `stop.should_stop` says so:   on_stop(step, state) (save and wait), and the loop returns;
  otherwise:                               on_continue(step, state) (periodic saves, grids).
`step` is always the number of optimizer steps done.
"""
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np
from absl import logging


class Hook:
    """A no-op hook; subclasses override what they need (see the module docstring for the order)."""

    def on_train_begin(self, step: int) -> None:
        """Before the first dispatch; `step`: the step the run starts (or resumes) from."""

    def on_dispatch_end(self, step: int, state: Any, metrics: dict) -> None:
        """After each dispatch; metrics: {name: device array [K]} of its K steps."""

    def on_stop(self, step: int, state: Any) -> None:
        """The run stops early (preemption, SIGTERM/SIGINT) after the dispatch that reached `step`."""

    def on_continue(self, step: int, state: Any) -> None:
        """After each dispatch that does not stop the run, including the last one."""

    def on_train_end(self, step: int, state: Any) -> None:
        """After the last step (not after an early stop)."""


class StopSignal(Protocol):
    """When the run must save and stop (hooks.StopRequest: signals and the multi-host sync point)."""

    def should_stop(self, steps: range) -> bool:
        """Whether to stop after a dispatch that passed through the step counts `steps`."""

    def raise_if_interrupted(self, step: int) -> None:
        """Raises KeyboardInterrupt when the stop was a Ctrl-C, after the state of `step` was saved."""


def dispatch_size(step: int, num_steps: int, steps_per_dispatch: int, every: Sequence[int]) -> int:
    """How many steps the next dispatch runs from `step`: at most steps_per_dispatch, never past num_steps nor
    past the next multiple of any cadence in `every` (positive ints: log, checkpoint, sample, eval intervals).

    dispatch_size(0, 10, 4, (3,)) == 3; dispatch_size(3, 10, 4, (3,)) == 3; dispatch_size(9, 10, 4, (3,)) == 1.
    """
    to_boundary = [(step // interval + 1) * interval - step for interval in every]
    return min(steps_per_dispatch, num_steps - step, *to_boundary)


def run(state: Any, step_fn: Callable, batches: Iterator[np.ndarray], hooks: Sequence[Hook], *, start_step: int,
        num_steps: int, dispatch: Callable[[int], int], stop: StopSignal) -> Any:
    """Trains from `start_step` to `num_steps` and returns the final state (or the state it stopped at).

    step_fn(state, local_batches [K, B_host, H, W, C]) -> (state, metrics {name: [K]}); batches yields one
    host batch per step; dispatch(step) -> K, the steps of the next dispatch (see `dispatch_size`).
    """
    step = start_step
    for hook in hooks:
        hook.on_train_begin(step)
    # Report the start step at once (several hosts): until a host reports a step, a preemption notice gives
    # sync step 1, which a resumed run never reaches. The state equals the restored checkpoint: nothing to save.
    if step < num_steps and stop.should_stop(range(step, step + 1)):
        logging.warning('Preempted at step %d before training; rerun the same command to resume.', step)
        return state
    while step < num_steps:
        count = dispatch(step)
        state, metrics = step_fn(state, np.stack([next(batches) for _ in range(count)]))
        step += count
        for hook in hooks:
            hook.on_dispatch_end(step, state, metrics)
        if stop.should_stop(range(step - count + 1, step + 1)):
            for hook in hooks:
                hook.on_stop(step, state)
            logging.warning('Stopped at step %d after saving; rerun the same command to resume.', step)
            stop.raise_if_interrupted(step)
            return state
        for hook in hooks:
            hook.on_continue(step, state)
    for hook in hooks:
        hook.on_train_end(step, state)
    return state
