"""The errors gl_jax raises about what the user gave, beyond Python's own (ValueError,
FileNotFoundError, ...); the command lines print them as one line (`gl_jax.cli`).

They live here, away from the modules that raise them, so that `gl_jax.cli` can name them
without importing JAX, Orbax or the trainer.
"""


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


class NoUsableCheckpointError(RuntimeError):
    """Checkpoints exist but none of them can be restored in full."""
