"""Subprocesses of the tests: generous timeouts for a loaded 2-core machine, and never a process left behind.

Every process starts in a new session (its own process group), so that on a timeout, a failed assertion or an
interrupted test run the process and every child it started are killed together (SIGKILL to the group).
"""
import os
import signal
import subprocess
from collections.abc import Sequence

import pytest

# A run of a few seconds of work can take minutes when six test runs share two cores; these only bound hangs.
TIMEOUT_S = 900


def start(command: Sequence[str], **popen_kwargs) -> subprocess.Popen:
    """subprocess.Popen(command, **popen_kwargs) as the leader of a new process group."""
    return subprocess.Popen(list(command), start_new_session=True, **popen_kwargs)


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILLs the process group of `process` (also its children after the leader exited), then reaps it."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # the whole group has exited already
        pass
    process.wait()


def communicate(process: subprocess.Popen, timeout: float = TIMEOUT_S, what: str = '') -> tuple[str, str]:
    """process.communicate(timeout=...) -> (stdout, stderr); on a timeout fails the test with the output so
    far. The process group is killed whatever happens (its children included)."""
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(process)
        stdout, stderr = process.communicate()
        pytest.fail(f'{what or process.args} still running after {timeout} s (a hang?); output:\n'
                    f'{(stdout or "")[-3000:]}\n{(stderr or "")[-3000:]}')
    finally:
        kill_group(process)


def run(command: Sequence[str], *, timeout: float = TIMEOUT_S, **popen_kwargs) -> subprocess.CompletedProcess:
    """Like subprocess.run(command, capture_output=True, text=True, check=False), in its own process group,
    which is killed with all its children on a timeout (failing the test) or any exception."""
    process = start(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen_kwargs)
    stdout, stderr = communicate(process, timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def kill_groups(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        kill_group(process)
