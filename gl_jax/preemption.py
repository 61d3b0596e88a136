"""SIGTERM handling of the training loop: a preempted machine's run saves a checkpoint and
stops, and the same command resumes it.

With several processes (a multi-host slice) saving is collective, so every process must
stop at the same step although each host sees SIGTERM at its own time: JAX's preemption
service (started by `jax.distributed.initialize`) hears the signal on any host, agrees
with the others on a step, and `multihost_utils.reached_preemption_sync_point` says when
it is reached. The loop asks `should_stop(step)` after every step either way."""
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
    restores the previous one on exit. With several processes and JAX's preemption
    service, that service keeps SIGTERM and decides the step (no watchdog then)."""

    def __init__(self, timeout_s: float = 25.0):
        self.requested = False
        self.dispatched = 0          # the loop's last dispatched step
        self.signal_step = None      # `dispatched` when SIGTERM arrived
        self.timeout_s = float(timeout_s)
        self._previous = None
        self._timer: threading.Timer | None = None
        self._synced = False

    @staticmethod
    def _sync_manager():
        """JAX's preemption sync manager when several processes run with it, else None."""
        import jax
        if jax.process_count() < 2:
            return None
        from jax._src import distributed   # where jax.distributed keeps its state
        return getattr(distributed.global_state, "preemption_sync_manager", None)

    def should_stop(self, step: int) -> bool:
        """True once the run must save and stop after `step`: SIGTERM arrived here, or,
        with several processes, every process has reached the step they agreed on."""
        if self._synced and not self.requested:
            from jax.experimental import multihost_utils
            if multihost_utils.reached_preemption_sync_point(step):
                self.requested = True
                self.signal_step = step
                logging.warning("preemption: every process stops after step %d.", step)
        return self.requested

    def __enter__(self):
        self._synced = self._sync_manager() is not None
        if self._synced:
            return self   # the service's own SIGTERM handler must stay in place
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
