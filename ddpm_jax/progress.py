"""Console output: progress lines for long loops, and `quiet_libraries` for the CLIs.

Progress lines for long loops: count, rate and ETA, logged at most every `every_seconds`.

    progress = Progress('sampling', total=num_steps, unit='steps')
    for ...:
        progress.update(done)   # absolute count; logs "sampling: 120/1000 steps (12.0%) | 3.1 steps/s | ETA 0:04:43"

The rate is measured over a moving window of recent updates, starting at the first update: whatever ran before it
(compilation, a restored checkpoint's first steps) never enters the rate. Until a second update there is no rate
and the ETA reads '?'. `exclude(seconds)` removes time spent on something else (e.g. writing a sample grid).

`report_from_device(model_fn, on_call)` reports from inside a jit-compiled loop: it wraps a
`model_fn(x [B,H,W,C], t [B] int32)` so that every call sends t[0] to the host callback `on_call(t)` through
`jax.debug.callback`; the model's outputs, and so every result, are unchanged.
"""
from __future__ import annotations

import collections
import logging as python_logging
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging


def format_duration(seconds: float) -> str:
    """h:mm:ss of a non-negative number of seconds."""
    seconds = int(max(seconds, 0))
    return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


class Progress:
    """Logs `<what>: <count>/<total> <unit> (<pct>%) | <rate> <unit>/s | ETA h:mm:ss` (total None: no pct/ETA)."""

    def __init__(self, what: str, total: Optional[int], *, unit: str = 'steps', every_seconds: float = 30.0,
                 window: int = 20, clock: Callable[[], float] = time.monotonic):
        self.what, self.total, self.unit = what, total, unit
        self.every_seconds, self.clock = float(every_seconds), clock
        self.count = 0
        self._samples = collections.deque(maxlen=max(window, 2))   # (time, count)
        self._last_log = None

    def exclude(self, seconds: float) -> None:
        """Shifts the window's times so that `seconds` of other work do not lower the rate."""
        self._samples = collections.deque(((t + seconds, c) for t, c in self._samples), maxlen=self._samples.maxlen)

    def rate(self) -> Optional[float]:
        """Units per second over the window, None before two updates."""
        if len(self._samples) < 2:
            return None
        (t0, c0), (t1, c1) = self._samples[0], self._samples[-1]
        return (c1 - c0) / (t1 - t0) if t1 > t0 else None

    def eta_seconds(self) -> Optional[float]:
        rate = self.rate()
        if self.total is None or not rate:
            return None
        return max(self.total - self.count, 0) / rate

    def line(self) -> str:
        """The progress line of the current state."""
        text = f'{self.what}: {self.count}'
        if self.total is not None:
            text += f'/{self.total} {self.unit} ({100.0 * self.count / max(self.total, 1):.1f}%)'
        else:
            text += f' {self.unit}'
        rate, eta = self.rate(), self.eta_seconds()
        text += f' | {rate:.3g} {self.unit}/s' if rate is not None else f' | ? {self.unit}/s'
        if self.total is not None:
            text += f' | ETA {format_duration(eta)}' if eta is not None else ' | ETA ?'
        return text

    def update(self, count: int, *, log: bool = True) -> None:
        """Sets the count (ignored unless it grows) and, with `log`, logs when due and always at the total."""
        if count <= self.count and self._samples:
            return
        now = self.clock()
        self.count = int(count)
        self._samples.append((now, self.count))
        finished = self.total is not None and self.count >= self.total
        if log and (finished or self._last_log is None or now - self._last_log >= self.every_seconds):
            self._last_log = now
            logging.info('%s', self.line())

    def advance(self, amount: int = 1) -> None:
        self.update(self.count + amount)


def report_from_device(model_fn: Callable, on_call: Callable[[int], None], report_at=None) -> Callable:
    """model_fn (x, t) -> output that also calls the host function on_call(int t[0]) at its calls.

    report_at: None (every call) or the timesteps (ints >= 0) at which to report; the other calls skip the
    callback (a lax.cond), which keeps the host round trips of a long loop to a few. The callback is unordered
    and returns nothing, so it changes no value that the traced computation produces. When the batch is split
    over several devices it may run once per device for a call: `on_call` must tolerate repeats (e.g. map t
    to a count and use `Progress.update`, which ignores counts that do not grow).
    """
    def host(t):
        on_call(int(np.asarray(t)))

    if report_at is not None:
        report_at = np.asarray(report_at, np.int64)
        table = np.zeros(int(report_at.max()) + 1, bool)
        table[report_at] = True

    def wrapped(x, t):
        if not jnp.issubdtype(t.dtype, jnp.integer):   # continuous time (the ODE solvers): no step to report
            return model_fn(x, t)
        if report_at is None:
            jax.debug.callback(host, t[0])
        else:
            due = jnp.asarray(table).at[t[0]].get(mode='fill', fill_value=False)
            jax.lax.cond(due, lambda s: jax.debug.callback(host, s), lambda s: None, t[0])
        return model_fn(x, t)

    return wrapped


class TimestepCounter:
    """on_call for `report_from_device` in loops that visit `timesteps` (ascending original timesteps) from the last
    to the first: the model call at t is step #{s in timesteps: s >= t} of a loop, reported to `progress` as
    `offset` + that number. Set `offset` (e.g. loops done x steps per loop) before each loop."""

    def __init__(self, timesteps, progress: Progress):
        self.timesteps = np.sort(np.asarray(timesteps))
        self.progress = progress
        self.offset = 0

    def report_timesteps(self, max_reports: int = 100) -> np.ndarray:
        """At most about max_reports of the timesteps, evenly spread, always with the loop's last one (the
        smallest), for `report_from_device(..., report_at=...)`."""
        return self.timesteps[::max(1, -(-len(self.timesteps) // max_reports))]

    def __call__(self, t: int) -> None:
        done = len(self.timesteps) - int(np.searchsorted(self.timesteps, t, side='left'))
        self.progress.update(self.offset + done)


def counting(batch_fn: Callable, what: str, total: Callable[[], int] | int | None, unit: str = 'images') -> Callable:
    """batch_fn(batch, ...) that reports its progress in rows of its batches out of `total` (an int, or a
    function called at the first batch only, so that nothing is computed when the pass never runs). The count is
    capped at the total, as the last batch may be padded."""
    progress = []

    def counted(batch, *args, **kwargs):
        if not progress:
            progress.append(Progress(what, total() if callable(total) else total, unit=unit))
        outputs = batch_fn(batch, *args, **kwargs)
        count = progress[0].count + len(batch)
        progress[0].update(count if progress[0].total is None else min(count, progress[0].total))
        return outputs

    return counted


class _QuietLibraries(python_logging.Filter):
    """Keeps orbax's per-save INFO chatter out of the console (warnings and errors still show)."""

    def filter(self, record: python_logging.LogRecord) -> bool:
        return record.levelno >= python_logging.WARNING or '/orbax/' not in record.pathname


def quiet_libraries() -> None:
    """Installs the filter on absl's log handler (call once in a CLI's main)."""
    logging.get_absl_handler().addFilter(_QuietLibraries())
