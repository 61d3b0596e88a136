"""SIGTERM handling of the training loop: a preempted machine's run saves a checkpoint and
stops, and the same command resumes it."""
from __future__ import annotations

import os
import signal
import threading

from absl import logging


class Preemption:
    """SIGTERM (a preempted VM) -> a flag the loop checks after every step, then a save.

    The trainer keeps at most two steps in flight, so the save starts within two steps of
    the signal. If the process has not exited `timeout_s` seconds after the signal (a step
    or a data read that never returns), it exits with status 143 without saving: the last
    checkpoint stays the newest, and the same command resumes from it.

    `with Preemption():` installs the handler (in the main thread; elsewhere, none) and
    restores the previous one on exit."""

    def __init__(self, timeout_s: float = 25.0):
        self.requested = False
        self.dispatched = 0          # the loop's last dispatched step
        self.signal_step = None      # `dispatched` when SIGTERM arrived
        self.timeout_s = float(timeout_s)
        self._previous = None
        self._timer: threading.Timer | None = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler, nothing to restore
            self._previous = None
        return self

    def _handle(self, signum, frame):
        if self.requested:
            return
        self.signal_step = self.dispatched
        logging.warning("SIGTERM received at step %d: saving a checkpoint and stopping.",
                        self.signal_step)
        self.requested = True
        self._timer = threading.Timer(self.timeout_s, self._give_up)
        self._timer.daemon = True
        self._timer.start()

    def _give_up(self):
        logging.error("no checkpoint saved within %.0f s of SIGTERM (a step or a data read "
                      "does not return); exiting without saving. The same command resumes "
                      "from the last checkpoint.", self.timeout_s)
        logging.flush()
        os._exit(143)

    def __exit__(self, *exc):
        if self._timer is not None:
            self._timer.cancel()
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
