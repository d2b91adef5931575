"""Checkpoint failure handling: what a failed read or save leaves behind, and what to do about it.

Holds the classification of read errors (`is_transient`: I/O trouble, which says nothing about the bytes, versus
evidence of damage), the retries of transient reads (`read_with_retries`, waits `RETRY_WAITS_S`, then
`CheckpointIOError`), the quarantine of corrupt step directories to `workdir/checkpoints_corrupt/`, the
record of a workdir's checkpoints (`checkpoint_history`), the removal of unfinished saves, one-line error
summaries without TensorStore's JSON specs (`summarize_error`, `error_chain`), and a filter for asyncio's
reports of the tensorstore reads orbax abandons. `ddpm_jax.checkpoint` uses it; it imports no checkpoint code.
"""
import logging as python_logging
import os
import re
import shutil
import threading
import time
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from ddpm_jax.errors import UserError

# Seconds to wait before each retry of a checkpoint read that failed with a transient I/O error.
RETRY_WAITS_S = (1.0, 4.0, 15.0)
# Text of tensorstore errors (they arrive as ValueError) that report I/O trouble rather than damaged bytes.
_TRANSIENT_MARKERS = ('UNAVAILABLE', 'DEADLINE_EXCEEDED', 'Input/output error', 'timed out', 'Connection reset')


class _DropAbandonedTensorstoreReads(python_logging.Filter):
    """Drops asyncio's "Future/Task exception was never retrieved" records of tensorstore reads that orbax abandons
    after the first failure of a restore: each repeats that failure (already reported, summarised) with
    TensorStore's JSON specs, kilobytes of text."""

    def filter(self, record: python_logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ('exception was never retrieved' in message and 'tensorstore_spec' in message)


python_logging.getLogger('asyncio').addFilter(_DropAbandonedTensorstoreReads())


class CheckpointIOError(UserError, RuntimeError):
    """A checkpoint that could not be read because of I/O errors that outlasted the retries; it is left in place."""


def error_chain(error: BaseException):
    """The error, then its causes (__cause__, else __context__), outermost first."""
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


def is_transient(error: BaseException) -> bool:
    """Whether a failed read is I/O trouble that says nothing about the checkpoint's bytes.

    True for OSErrors (EIO, timeouts, permissions, a stale network handle) other than a missing path, and for
    tensorstore errors reporting an I/O error or unavailability; False for everything else (missing or
    truncated files, undecodable data), which is evidence of damage.
    """
    for link in error_chain(error):
        if isinstance(link, (FileNotFoundError, NotADirectoryError, IsADirectoryError)):
            return False
        if isinstance(link, OSError) or any(marker in str(link) for marker in _TRANSIENT_MARKERS):
            return True
    return False


def summarize_error(error: BaseException, limit: int = 400) -> str:
    """'Type: message' on one line, with TensorStore's JSON specs (kilobytes each) left out."""
    text = re.sub(r"\s*\[tensorstore_spec(\[\d+\])?='[^']*'\]", '', str(error))
    text = ' '.join(text.split())
    if len(text) > limit:
        text = text[:limit] + ' ...'
    return f'{type(error).__name__}: {text}'


def read_with_retries(read: Callable[[], Any], step: int, directory: str) -> Any:
    """read(), retried after each of RETRY_WAITS_S while it fails with a transient error (`is_transient`);
    CheckpointIOError when the retries are spent. Other errors propagate at once."""
    for attempt, wait in enumerate((*RETRY_WAITS_S, None), start=1):
        try:
            return read()
        except Exception as error:
            if not is_transient(error):
                raise
            if wait is None:
                raise CheckpointIOError(
                    f'reading checkpoint step {step} in {directory} failed {attempt} times ({summarize_error(error)}); '
                    'it is left in place, since an I/O error is no evidence of damage. Check the filesystem, then '
                    'rerun the same command.') from error
            logging.warning('Reading checkpoint step %d in %s failed (%s); retrying in %.3g s.', step, directory,
                            summarize_error(error), wait)
            time.sleep(wait)
    raise AssertionError('unreachable')


def quarantine(workdir: str, manager: ocp.CheckpointManager, step: int) -> None:
    """Moves a corrupt step directory out of the manager's sight (to workdir/checkpoints_corrupt)."""
    if jax.process_index() == 0:
        source = os.path.join(os.path.abspath(workdir), 'checkpoints', str(step))
        target_dir = os.path.join(os.path.abspath(workdir), 'checkpoints_corrupt')
        os.makedirs(target_dir, exist_ok=True)
        target = os.path.join(target_dir, str(step))
        suffix = 0
        while os.path.exists(target):
            suffix += 1
            target = os.path.join(target_dir, f'{step}.{suffix}')
        if os.path.exists(source):
            os.rename(source, target)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f'ddpm_jax_quarantine_{step}')
    manager.reload()


_UNFINISHED_MARK = '.orbax-checkpoint-tmp'  # orbax's name for a step directory whose save has not completed


def checkpoint_history(workdir: str) -> list:
    """Paths that show `workdir` has held checkpoints: the complete step directories in workdir/checkpoints
    (unfinished saves do not count) and everything moved to workdir/checkpoints_corrupt."""
    found = []
    for name in ('checkpoints', 'checkpoints_corrupt'):
        directory = os.path.join(os.path.abspath(workdir), name)
        if os.path.isdir(directory):
            found += [os.path.join(directory, entry) for entry in sorted(os.listdir(directory))
                      if name == 'checkpoints_corrupt' or _UNFINISHED_MARK not in entry]
    return found


def remove_unfinished_saves(workdir: str, timeout_s: float = 60.0) -> list:
    """Deletes the temporary directories of saves that did not complete (process 0); returns their paths.

    Call after the manager's close(). A failed save can leave orbax threads behind that still write into its
    directory (its metadata writer, for one); they are awaited first (up to `timeout_s` each), or the
    directory would come back after its removal.
    """
    directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    if jax.process_index() != 0 or not os.path.isdir(directory):
        return []
    from orbax.checkpoint._src.futures import future as orbax_future
    for thread in threading.enumerate():
        if isinstance(thread, getattr(orbax_future, '_SignalingThread', ())):
            thread.join(timeout_s)
    removed = []
    for entry in sorted(os.listdir(directory)):
        if _UNFINISHED_MARK in entry:
            path = os.path.join(directory, entry)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
