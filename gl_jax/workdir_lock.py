"""One run per workdir: an exclusive lock held for the run's life.

`workdir/.lock` holds who runs there (host, pid, start time). The lock itself is an
`fcntl.flock` on that file, which the kernel releases when the process ends however it
ends (SIGKILL included), so a lock file left by a killed run is recognised as stale and
taken over. On a file system without `flock` support the lock is skipped with a warning.

`prepare` and `check_free` let a command line refuse an unusable or busy workdir in a
moment, before its slow imports; `WorkdirLock` is what keeps two runs apart.
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket

from absl import logging

from gl_jax.errors import WorkdirError

LOCK_FILE = ".lock"
_HELD = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)


class WorkdirBusyError(RuntimeError):
    """Another run holds the workdir."""


class WorkdirLock:
    """`with WorkdirLock(workdir):` - raises WorkdirBusyError at once if another run holds it."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_FILE)
        self._fd: int | None = None

    def __enter__(self):
        fd = _open_lock_file(self.path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in _HELD:
                raise _busy(self.path) from None
            logging.warning("cannot lock %s (%s); running without the one-run-per-workdir "
                            "check.", self.path, e)
            return self
        self._fd = fd
        info = {"host": socket.gethostname(), "pid": os.getpid(),
                "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        os.fsync(fd)
        return self

    def __exit__(self, *exc):
        if self._fd is not None:
            os.ftruncate(self._fd, 0)   # no holder any more
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def prepare(workdir: str) -> None:
    """Creates `workdir` (and its parents) if needed; raises WorkdirError naming the path
    when it cannot hold a run. os.makedirs' own errors name no flag, and coming from the
    standard library they read to the command line as a bug, with a traceback."""
    if not workdir:
        raise WorkdirError("--workdir is empty: give the directory for the run's checkpoints "
                           "and results.")
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise WorkdirError(f"the workdir {workdir!r} is a file, not a directory.")
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        above = _file_above(workdir)
        why = f"{above!r} is a file, not a directory" if above else e.strerror
        raise WorkdirError(f"the workdir {workdir!r} cannot be created: {why}.") from None
    # Opening the lock file, as WorkdirLock will, is the test: os.access says yes to root
    # even where nothing can be created (/sys, /proc).
    os.close(_open_lock_file(os.path.join(workdir, LOCK_FILE)))


def remove_if_unused(workdir: str) -> None:
    """Removes `workdir` if it holds nothing but a lock file no run holds (a holder writes
    who it is into it): what `prepare` leaves in a workdir it created for a run that was
    refused before it wrote anything. Best effort: an empty workdir left is harmless."""
    path = os.path.join(workdir, LOCK_FILE)
    try:
        if os.listdir(workdir) == [LOCK_FILE] and os.path.getsize(path) == 0:
            os.remove(path)
            os.rmdir(workdir)
    except OSError:
        pass


def check_free(workdir: str) -> None:
    """Raises WorkdirBusyError if another run holds `workdir` now. Takes nothing and writes
    nothing: a shared lock, released at once, only asks whether an exclusive one is held."""
    path = os.path.join(workdir, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return   # no run was ever here, or WorkdirLock will say what is wrong
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in _HELD:
            raise _busy(path) from None
    finally:
        os.close(fd)


def _open_lock_file(path: str) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        # os's own error names no workdir, and the command line would take it for a bug.
        raise WorkdirError(f"the workdir {os.path.dirname(path)!r} is not writable "
                           f"({e.strerror}: {path!r}).") from None


def _file_above(path: str) -> str | None:
    """The nearest existing ancestor of `path` if it is not a directory."""
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent) and parent != os.path.dirname(parent):
        parent = os.path.dirname(parent)
    return None if os.path.isdir(parent) else parent


def _busy(path: str) -> WorkdirBusyError:
    return WorkdirBusyError(
        f"the workdir {os.path.dirname(path)!r} is in use by another run ({_holder(path)}); "
        "wait for it to finish, stop it, or use another --workdir.")


def _holder(path: str) -> str:
    try:
        with open(path) as f:
            info = json.load(f)
        return f"host {info['host']}, pid {info['pid']}, started {info['started']}"
    except (OSError, ValueError, KeyError):
        return "holder unknown"
