"""The lock that makes a training run the only writer of its workdir.

Process 0 of a run holds an OS lock, `fcntl.flock`, on `workdir/train.lock` while it trains, and writes its
pid, host and start time into that file. Another trainer on the same workdir fails at once with the holder
named; evaluation modes take no lock (they only read).

Why an OS lock rather than a pid file alone: the kernel drops the lock when its holder dies in any way
(crash, SIGKILL, the OOM killer), so a dead run never blocks the next one, and no guess is needed whether a
recorded pid still lives (pids are reused; a pid on another host cannot be checked at all). The recorded
info serves the messages: a file that still holds info while its lock is free was left by a run that died
without releasing it, and is taken over with a warning. On NFS, Linux implements flock with the server's
byte-range locks, so the lock also holds between hosts sharing the filesystem. Where the filesystem has no
locks at all, training goes on with a warning.

The file is emptied on release, never deleted: a process blocked on the old file would otherwise lock a
deleted inode while a third one creates and locks a new file.
"""
import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
from typing import IO, Iterator, Optional

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from ddpm_jax.errors import UserError

LOCK_FILE = 'train.lock'


class WorkdirLockedError(UserError):
    """Another training run holds the workdir."""


def _read_holder(lock_file: IO[str]) -> Optional[dict]:
    """The holder info recorded in the lock file (None when empty or unreadable)."""
    lock_file.seek(0)
    try:
        holder = json.loads(lock_file.read() or 'null')
    except ValueError:
        return None
    return holder if isinstance(holder, dict) else None


def describe_holder(holder: Optional[dict]) -> str:
    if not holder:
        return 'a process that has not yet recorded itself'
    return (f'pid {holder.get("pid")} on host {holder.get("host")}, started {holder.get("started")}')


@contextlib.contextmanager
def _hold(workdir: str) -> Iterator[None]:
    """Holds the lock on workdir/train.lock for the block; WorkdirLockedError when another process holds it."""
    path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
    with open(path, 'a+', encoding='utf-8') as lock_file:
        try:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkdirLockedError(
                f'{workdir} is in use by another training run ({describe_holder(_read_holder(lock_file))}; lock file '
                f'{path}). Wait for it to end or stop it, or train in another --workdir; evaluation modes '
                '(--mode=sample, fid, eval, ...) may run beside it.') from None
        except OSError as error:
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            logging.warning('The filesystem of %s does not support file locks (%s): nothing stops a second trainer '
                            'on this workdir; start only one.', workdir, error)
            yield
            return
        previous = _read_holder(lock_file)
        if previous:
            logging.warning('Taking over the stale lock %s of %s, which ended without releasing it (a crash or '
                            'SIGKILL).', path, describe_holder(previous))
        lock_file.truncate(0)
        json.dump(dict(pid=os.getpid(), host=socket.gethostname(),
                       started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')), lock_file)
        lock_file.flush()
        try:
            yield
        finally:
            lock_file.truncate(0)  # the lock itself goes with the file's closing


@contextlib.contextmanager
def writer_lock(workdir: str) -> Iterator[None]:
    """Process 0 holds the workdir's lock for the block; on several hosts, every process raises
    WorkdirLockedError when process 0 could not take it (so none waits for it in a collective)."""
    with contextlib.ExitStack() as stack:
        error = None
        if jax.process_index() == 0:
            try:
                stack.enter_context(_hold(workdir))
            except WorkdirLockedError as locked:
                error = locked
        if jax.process_count() > 1:
            failed = int(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
            if failed and error is None:
                error = WorkdirLockedError(f'process 0 could not lock {workdir}: another training run holds it '
                                           '(see the log of process 0).')
        if error is not None:
            raise error
        yield
