"""Grain's worker processes end with the process that started them, even when that process
is SIGKILLed and runs no clean-up (issue 39)."""
import os
import signal
import subprocess
import sys
import time

import pytest

from gl_jax.data import pipeline
from train_helpers import _Run


def _children(pid):
    """Pids whose parent is ``pid`` (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


_ORPHAN = """
import os, sys, time
from gl_jax.data import pipeline
parent = os.getpid()
child = os.fork()
if child == 0:                       # the 'worker': starts its watcher, then works forever
    if sys.argv[1] == "late":        # the parent dies while the worker is still starting
        time.sleep(1.0)
    pipeline.exit_with_parent(parent=parent, poll_s=0.05)
    time.sleep(60)
    os._exit(3)
print(child, flush=True)
time.sleep(60)
"""


@pytest.mark.slow   # a fresh interpreter per case: seconds
@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc")
@pytest.mark.parametrize("when", ["running", "late"])
def test_a_worker_exits_once_its_parent_is_killed(when):
    parent = subprocess.Popen([sys.executable, "-c", _ORPHAN, when], stdout=subprocess.PIPE,
                              text=True)
    try:
        worker = int(parent.stdout.readline())
        assert _alive(worker)
        if when == "running":
            time.sleep(1.5)          # the watcher has started
        parent.kill()
        parent.wait()
        deadline = time.time() + 10
        while _alive(worker) and time.time() < deadline:
            time.sleep(0.05)
        assert not _alive(worker), "the worker outlived its killed parent"
    finally:
        parent.kill()


def test_the_watcher_leaves_a_worker_alone_while_its_parent_lives():
    watcher = pipeline.exit_with_parent(parent=os.getppid(), poll_s=0.01)
    time.sleep(0.1)
    assert watcher.is_alive() and watcher.daemon


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc")
def test_sigkill_of_a_run_with_two_workers_leaves_no_process(tmp_path):
    run = _Run(str(tmp_path / "wd"), "--config.data.worker_count=2",
               "--config.schedule.steps_per_epoch=1000", "--config.schedule.epochs=1")
    try:
        deadline = time.time() + 300
        descendants = []
        while time.time() < deadline and len(descendants) < 3:
            assert run.proc.poll() is None, run.output()
            children = _children(run.proc.pid)
            descendants = children + [g for c in children for g in _children(c)]
            time.sleep(0.2)
        assert len(descendants) >= 2, (descendants, run.output())
        time.sleep(2)                    # the workers are producing batches
        os.kill(run.proc.pid, signal.SIGKILL)
        run.proc.wait()
        deadline = time.time() + 30
        while any(_alive(p) for p in descendants) and time.time() < deadline:
            time.sleep(0.2)
        assert not [p for p in descendants if _alive(p)], run.output()
    finally:
        for pid in _children(run.proc.pid):
            os.kill(pid, signal.SIGKILL)
