"""Tests of ddpm_jax.loop: the dispatch cadence and the order in which the loop calls its hooks."""
import itertools

import numpy as np
import pytest

from ddpm_jax import loop


def _reference_dispatch(step, num_steps, steps_per_dispatch, every):
    """Counts single steps forward until the cap, the end or a multiple of any interval is reached."""
    count = 0
    while True:
        count += 1
        done = step + count
        if count == steps_per_dispatch or done == num_steps or any(done % e == 0 for e in every):
            return count


@pytest.mark.parametrize('steps_per_dispatch', [1, 2, 3, 7, 100])
@pytest.mark.parametrize('every', [(1,), (5,), (4, 6), (3, 10, 25), (100, 100, 100)])
def test_dispatch_size_stops_at_every_boundary(steps_per_dispatch, every):
    num_steps = 37
    for step in range(num_steps):
        assert loop.dispatch_size(step, num_steps, steps_per_dispatch, every) == _reference_dispatch(
            step, num_steps, steps_per_dispatch, every), step
    # Walking the dispatches visits every boundary and ends exactly at num_steps.
    step, visited = 0, []
    while step < num_steps:
        step += loop.dispatch_size(step, num_steps, steps_per_dispatch, every)
        visited.append(step)
    boundaries = {s for s in range(1, num_steps + 1) if any(s % e == 0 for e in every)} | {num_steps}
    assert boundaries <= set(visited) and visited[-1] == num_steps


class _Recorder(loop.Hook):
    def __init__(self, events):
        self.events = events

    def on_train_begin(self, step):
        self.events.append(('begin', step))

    def on_dispatch_end(self, step, state, metrics):
        self.events.append(('dispatch_end', step, state, len(metrics['loss'])))

    def on_stop(self, step, state):
        self.events.append(('stop', step, state))

    def on_continue(self, step, state):
        self.events.append(('continue', step, state))

    def on_train_end(self, step, state):
        self.events.append(('end', step, state))


class _Stop:
    def __init__(self, at=None, interrupted=False):
        self.at, self.interrupted, self.asked = at, interrupted, []

    def should_stop(self, steps):
        self.asked.append((steps.start, steps.stop))
        return self.at is not None and self.at in steps

    def raise_if_interrupted(self, step):
        if self.interrupted:
            raise KeyboardInterrupt(step)


def _step_fn(state, local_batches):
    """state: the sum of all batch values seen; metrics: one loss per step."""
    return state + int(local_batches.sum()), {'loss': np.zeros(len(local_batches))}


def _run(stop, *, start_step=0, num_steps=5):
    events = []
    batches = (np.full((2,), i) for i in itertools.count(start_step))  # batch i holds the value i
    state = loop.run(0, _step_fn, batches, [_Recorder(events)], start_step=start_step, num_steps=num_steps,
                     dispatch=lambda step: loop.dispatch_size(step, num_steps, 2, (3,)), stop=stop)
    return state, events


def test_run_calls_the_hooks_in_order_and_feeds_each_batch_once():
    stop = _Stop()
    state, events = _run(stop)
    assert state == 2 * sum(range(5))  # batches 0..4, each once
    # Dispatches of 2, 1 (boundary 3), 2 steps: states 2*(0+1), + 2*2, + 2*(3+4).
    assert events == [('begin', 0), ('dispatch_end', 2, 2, 2), ('continue', 2, 2), ('dispatch_end', 3, 6, 1),
                      ('continue', 3, 6), ('dispatch_end', 5, 20, 2), ('continue', 5, 20), ('end', 5, 20)]
    # Every step count is reported to the stop signal, the start step first (the multi-host sync protocol).
    assert stop.asked == [(0, 1), (1, 3), (3, 4), (4, 6)]


def test_run_stops_inside_a_dispatch_and_skips_on_continue():
    state, events = _run(_Stop(at=3))
    assert state == 6
    assert events[-2:] == [('dispatch_end', 3, 6, 1), ('stop', 3, 6)]
    assert ('end', 3, 6) not in events


def test_run_stopped_before_the_first_dispatch_returns_the_start_state():
    state, events = _run(_Stop(at=4), start_step=4)
    assert state == 0 and events == [('begin', 4)]


def test_run_raises_keyboard_interrupt_after_on_stop():
    events = []
    with pytest.raises(KeyboardInterrupt):
        loop.run(0, _step_fn, (np.ones(1) for _ in itertools.count()), [_Recorder(events)], start_step=0,
                 num_steps=9, dispatch=lambda step: 1, stop=_Stop(at=2, interrupted=True))
    assert events[-1] == ('stop', 2, 2)
