"""The errors gl_jax raises about what the user gave, beyond Python's own (ValueError,
FileNotFoundError, ...); the command lines print them as one line (`gl_jax.cli`).

They live here, away from the modules that raise them, so that `gl_jax.cli` can name them
without importing JAX, Orbax or the trainer.
"""


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


class NoUsableCheckpointError(RuntimeError):
    """Checkpoints exist but none of them can be restored in full."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, quota, no permission, read-only file
    system); the message names the path and the step the rerun resumes from. An OSError
    so that `except OSError` still catches it; `errno` holds the underlying error's."""

    def __init__(self, message: str, errno: int | None = None, path: str | None = None):
        # One argument: str() is the message alone, not '[Errno 28] ...'.
        super().__init__(message)
        self.errno = errno
        self.path = path


class WorkdirError(OSError):
    """The --workdir cannot hold a run: empty, a file, under a file, or not writable."""
