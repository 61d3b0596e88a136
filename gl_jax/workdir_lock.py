"""One run per workdir: an exclusive lock held for the run's life.

`workdir/.lock` holds who runs there (host, pid, start time). The lock itself is an
`fcntl.flock` on that file, which the kernel releases when the process ends however it
ends (SIGKILL included), so a lock file left by a killed run is recognised as stale and
taken over. On a file system without `flock` support the lock is skipped with a warning.
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket

from absl import logging

LOCK_FILE = ".lock"


class WorkdirBusyError(RuntimeError):
    """Another run holds the workdir."""


class WorkdirLock:
    """`with WorkdirLock(workdir):` - raises WorkdirBusyError at once if another run holds it."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_FILE)
        self._fd: int | None = None

    def __enter__(self):
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise WorkdirBusyError(
                    f"the workdir {os.path.dirname(self.path)!r} is in use by another run "
                    f"({_holder(self.path)}); wait for it to finish, stop it, or use another "
                    "--workdir.") from None
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


def _holder(path: str) -> str:
    try:
        with open(path) as f:
            info = json.load(f)
        return f"host {info['host']}, pid {info['pid']}, started {info['started']}"
    except (OSError, ValueError, KeyError):
        return "holder unknown"
