"""What every command line of gl_jax shares: absl's `app.run` around the command's `main`,
with user errors printed as one line instead of a traceback.

A user error is a problem with what the user gave: a bad config value, bad or missing
data, a busy workdir, no usable checkpoint, a loss that diverged. It is printed as
`error: <message>` on stderr with exit status 2 (1 for a diverged loss). Anything else is
an internal error and keeps its traceback. `--verbosity=1` (or `GL_JAX_TRACEBACK=1`)
shows the traceback of user errors too. Logging is at WARNING unless `--verbosity` is
given (`--verbosity=0` shows INFO, the dependencies' included).
"""
from __future__ import annotations

import os
import sys
import traceback

from absl import app
from absl import flags
from absl import logging

from gl_jax import workdir_lock
from gl_jax.errors import NoUsableCheckpointError
from gl_jax.errors import NonFiniteLossError

# Raised on purpose by gl_jax (and config files) about what the user gave.
_USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError,
                workdir_lock.WorkdirBusyError, NoUsableCheckpointError, NonFiniteLossError)
_OUR_CODE = (os.path.dirname(os.path.abspath(__file__)),
             os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "configs"))


def is_user_error(error: BaseException) -> bool:
    """A user error of a type above, raised by gl_jax's own code or a config file (not
    deep inside a library, where the same type can mean a bug)."""
    if not isinstance(error, _USER_ERRORS):
        return False
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and os.path.abspath(frames[-1].filename).startswith(_OUR_CODE)


def _show_tracebacks() -> bool:
    verbosity = flags.FLAGS["verbosity"].value if "verbosity" in flags.FLAGS else 0
    return verbosity >= 1 or os.environ.get("GL_JAX_TRACEBACK", "") not in ("", "0")


def config_package_importable(argv) -> None:
    """Config files import their siblings as a package (``from configs import common``),
    which resolves only while the directory above that package is on sys.path: so from
    the repository root, but not when a command runs elsewhere with a path to the file
    (``--config=/path/to/gl_jax/configs/omniglot.py``). For a --config file inside a
    package (a directory with __init__.py), that directory's parent is appended to
    sys.path; anything installed keeps precedence."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            value = arg[len("--config="):]
        elif arg == "--config" and i + 1 < len(argv):
            value = argv[i + 1]
        else:
            continue
        package = os.path.dirname(os.path.abspath(value.split(":", 1)[0]))
        parent = os.path.dirname(package)
        if os.path.isfile(os.path.join(package, "__init__.py")) and parent not in sys.path:
            sys.path.append(parent)


def run(main) -> None:
    """`app.run(main)`; user errors -> one line on stderr and a non-zero exit status."""
    config_package_importable(sys.argv)

    def guarded(argv):
        if not flags.FLAGS["verbosity"].present:
            # Quiet by default: the run prints its own summary lines; dependencies' INFO
            # chatter (Orbax, grain) appears with --verbosity=0 or higher.
            logging.set_verbosity(logging.WARNING)
        try:
            return main(argv)
        except KeyboardInterrupt:
            print("\ninterrupted; the same command resumes from the last checkpoint.",
                  file=sys.stderr, flush=True)
            # Data-reading threads may still block: leave without waiting for them.
            os._exit(130)
        except BaseException as e:   # noqa: BLE001 - sorted into user and internal errors
            if not is_user_error(e) or _show_tracebacks():
                raise
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(1 if isinstance(e, NonFiniteLossError) else 2)
    app.run(guarded)
