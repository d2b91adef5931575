"""The tests' subprocess helper kills a timed-out process together with its children (plain subprocess.run
leaves the children running, which is how a timed-out smoke run used to keep loading the machine)."""
import os
import signal
import subprocess
import sys
import time

import pytest
import subprocess_helpers

# A parent that starts a long-lived child, prints the child's pid and then waits forever.
_PARENT = ('import subprocess, sys, time\n'
           'child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])\n'
           'print(child.pid, flush=True)\n'
           'time.sleep(600)\n')


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped by its parent, counts as gone)."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except FileNotFoundError:
        return False


def _wait_gone(pid: int, seconds: float = 30) -> bool:
    deadline = time.monotonic() + seconds
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not _alive(pid)


def _child_pid(stdout) -> int:
    return int(stdout.strip().splitlines()[0])


def test_plain_subprocess_run_leaves_the_child_of_a_timed_out_process_running(tmp_path):
    with pytest.raises(subprocess.TimeoutExpired) as timeout:
        subprocess.run([sys.executable, '-c', _PARENT], capture_output=True, text=True, timeout=5, check=False)
    pid = _child_pid(timeout.value.stdout.decode() if isinstance(timeout.value.stdout, bytes)
                     else timeout.value.stdout)
    try:
        assert _alive(pid)
    finally:
        os.kill(pid, signal.SIGKILL)


def test_run_kills_the_whole_process_group_on_timeout():
    process = subprocess_helpers.start([sys.executable, '-c', _PARENT], stdout=subprocess.PIPE, text=True)
    pid = _child_pid(process.stdout.readline())
    with pytest.raises(pytest.fail.Exception, match='still running after 1 s'):
        subprocess_helpers.communicate(process, timeout=1)
    assert process.returncode == -signal.SIGKILL
    assert _wait_gone(pid), f'child {pid} still running'


def test_kill_group_reaches_children_after_the_leader_exited():
    """A leader that exits at once leaves its child in the group; kill_group still ends the child."""
    leader = ('import subprocess, sys\n'
              'child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])\n'
              'print(child.pid, flush=True)\n')
    result = subprocess_helpers.start([sys.executable, '-c', leader], stdout=subprocess.PIPE, text=True)
    pid = _child_pid(result.stdout.readline())
    result.wait()
    assert _alive(pid)
    subprocess_helpers.kill_group(result)
    assert _wait_gone(pid)


def test_run_returns_the_output_of_a_finished_process():
    result = subprocess_helpers.run([sys.executable, '-c', 'import sys; print("out"); print("err", file=sys.stderr)'])
    assert (result.returncode, result.stdout, result.stderr) == (0, 'out\n', 'err\n')
