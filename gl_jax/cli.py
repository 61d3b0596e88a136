"""What every command line of gl_jax shares: absl's `app.run` around the command's `main`,
with user errors printed as one line instead of a traceback.

A user error is a problem with what the user gave: a flag absl cannot parse, a config file
that is missing or fails to load, an unknown config field, a bad config value, bad or
missing data, an unusable or busy workdir, no usable checkpoint, a loss that diverged. It
is printed as `error: <message>` on stderr with exit status 2 (1 for a diverged loss).
Anything else is an internal error and keeps its traceback. `--verbosity=1` (or
`GL_JAX_TRACEBACK=1`) shows the traceback of user errors too. Logging is at WARNING unless
`--verbosity` is given (`--verbosity=0` shows INFO, the dependencies' included). A closed
stdout (`... | head -1`) stops the command quietly, with exit status 141 as if SIGPIPE had.
"""
from __future__ import annotations

import os
import re
import sys
import traceback

from absl import app
from absl import flags
from absl import logging
from ml_collections.config_flags import config_flags

from gl_jax import errors
from gl_jax import workdir_lock

# Raised on purpose by gl_jax (and config files) about what the user gave.
_USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError,
                workdir_lock.WorkdirBusyError, errors.WorkdirError,
                errors.NoUsableCheckpointError, errors.NonFiniteLossError,
                errors.CheckpointWriteError)
_OUR_CODE = (os.path.dirname(os.path.abspath(__file__)),
             os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "configs"))
_BROKEN_PIPE_STATUS = 128 + 13   # what the shell reports for a tool killed by SIGPIPE


def is_user_error(error: BaseException) -> bool:
    """A user error of a type above, raised by gl_jax's own code or a config file (not
    deep inside a library, where the same type can mean a bug)."""
    if not isinstance(error, _USER_ERRORS):
        return False
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and os.path.abspath(frames[-1].filename).startswith(_OUR_CODE)


def _verbosity_in(argv) -> int:
    """--verbosity (or -v) as typed: when flag parsing fails, absl may not have read it."""
    value = None
    for i, arg in enumerate(argv[1:], 1):
        for name in ("--verbosity", "-verbosity", "--v", "-v"):
            if arg.startswith(name + "="):
                value = arg[len(name) + 1:]
            elif arg == name and i + 1 < len(argv):
                value = argv[i + 1]
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _show_tracebacks(argv) -> bool:
    if flags.FLAGS.is_parsed() and "verbosity" in flags.FLAGS:
        verbosity = flags.FLAGS["verbosity"].value
    else:
        verbosity = _verbosity_in(argv)
    return verbosity >= 1 or os.environ.get("GL_JAX_TRACEBACK", "") not in ("", "0")


def _user_error(message: str, status: int = 2):
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


def exit_if_user_error(error: BaseException) -> None:
    """For a user error (unless tracebacks are asked for): `error: <message>` on stderr and
    exit status 2 (1 for a diverged loss). Returns for anything else: the caller re-raises."""
    if is_user_error(error) and not _show_tracebacks(sys.argv):
        _user_error(str(error), 1 if isinstance(error, errors.NonFiniteLossError) else 2)


def flag_values(argv, name: str):
    """The values given to --name on the command line (`--name=V` or `--name V`)."""
    for i, arg in enumerate(argv):
        for prefix in (f"--{name}", f"-{name}"):
            if arg.startswith(prefix + "="):
                yield arg[len(prefix) + 1:]
            elif arg == prefix and i + 1 < len(argv):
                yield argv[i + 1]


def config_package_importable(argv) -> None:
    """Config files import their siblings as a package (``from configs import common``),
    which resolves only while the directory above that package is on sys.path: so from
    the repository root, but not when a command runs elsewhere with a path to the file
    (``--config=/path/to/gl_jax/configs/omniglot.py``). For a --config file inside a
    package (a directory with __init__.py), that directory's parent is appended to
    sys.path; anything installed keeps precedence."""
    for value in flag_values(argv, "config"):
        package = os.path.dirname(os.path.abspath(value.split(":", 1)[0]))
        parent = os.path.dirname(package)
        if os.path.isfile(os.path.join(package, "__init__.py")) and parent not in sys.path:
            sys.path.append(parent)


def _check_config_files(argv) -> None:
    """A config file that is not there fails in ml_collections only when the config is
    first read, with a message about its loader's attempts: say so now, naming the flag."""
    for name in list(flags.FLAGS):
        flag = flags.FLAGS[name]
        if name != flag.name or not isinstance(flag.parser, config_flags.ConfigFileFlagParser):
            continue
        for value in flag_values(argv, name):
            path = value.split(":", 1)[0]
            if not os.path.isfile(path):
                what = "is not a file" if os.path.exists(path) else "does not exist"
                raise FileNotFoundError(f"--{name}={value}: the config file {path!r} {what}.")


def _reason(error: BaseException) -> str:
    """The error's own message, with its type where the type tells something."""
    if isinstance(error, _USER_ERRORS):
        return str(error)
    return f"{type(error).__name__}: {error}"


def _flag_error(error: Exception) -> str:
    """One line about an error raised while absl parsed the command line (config files and
    their overrides included), naming the flag, the config field or the file."""
    return " ".join(_flag_error_text(error).split())


def _flag_error_text(error: Exception) -> str:
    flag = argument = field = None
    for frame, _ in traceback.walk_tb(error.__traceback__):
        local = frame.f_locals
        # _parse_from_default: a flag that parses as it is defined (DEFINE_config_dict).
        if (frame.f_code.co_name in ("parse", "_parse_from_default")
                and isinstance(local.get("self"), flags.Flag)):
            flag, field = local["self"], None
            argument = local.get("argument", local.get("arguments", local.get("value")))
        elif flag is not None and isinstance(local.get("field_path"), str):
            field = local["field_path"]   # ml_collections applying --config.<field_path>
    if flag is None:
        if isinstance(error, flags.Error):
            required = re.fullmatch(r"flag --(\S+)=None: Flag --\1 must have a value other "
                                    r"than None\.", str(error))
            if required:
                return f"--{required[1]} is required (--helpshort lists the flags)."
            return re.sub(r"^flag ", "", str(error))
        return _reason(error)
    # Past absl's and ml_collections' wrappers, to what the parser or config file raised.
    cause = error
    while cause.__context__ is not None and (
            isinstance(cause, flags.Error)
            or str(cause).startswith("Error whilst parsing config file")):
        cause = cause.__context__
    if field is not None:
        missing = cause
        while missing is not None and not isinstance(missing, KeyError):
            missing = missing.__cause__ or missing.__context__
        if missing is not None and missing.args:
            # ml_collections: "'lrr'", then maybe 'Did you mean "lr" instead of "lrr"?'.
            key, *hints = str(missing.args[0]).splitlines()
            parts = field.split(".")
            above = parts[:parts.index(key.strip("'"))] if key.strip("'") in parts else []
            return (f"--{flag.name}.{field}: {'.'.join([flag.name, *above])} has no field "
                    f"{key}. {' '.join(hints)}")
        return f"--{flag.name}.{field}: {_reason(cause)}"
    if isinstance(cause, flags.Error):   # absl's own, which names the flag
        return re.sub(r"^flag ", "", str(cause))
    return f"--{flag.name}={argument}: {_reason(cause)}"


def _parse_flags(argv, before_flags=None):
    """absl's parsing of the command line, with what it refuses as a user error: it runs
    before `main`, where the handler in `run` is not yet active."""
    try:
        if before_flags is not None:
            before_flags(argv)
        _check_config_files(argv)
        return flags.FLAGS(argv)
    except BrokenPipeError:   # --help into a closed pipe: `run` handles it
        raise
    except Exception as e:   # noqa: BLE001 - all of it is about what the user typed
        if _show_tracebacks(argv):
            raise
        _user_error(_flag_error(e))


def _stdout_closed() -> None:
    """Whatever is still buffered for stdout goes nowhere, instead of into a second
    BrokenPipeError at exit (the pattern of Python's signal module documentation)."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def run(main, before_flags=None) -> None:
    """`app.run(main)`; user errors -> one line on stderr and a non-zero exit status.

    `before_flags(argv)`, if given, runs first, where what fails is an error in the command
    line as typed, like absl's own parsing after it: a check that should not wait for the
    config file (which may import JAX), or a flag whose definition applies overrides from
    the command line (ml_collections' DEFINE_config_dict).
    """
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
        except BrokenPipeError:
            _stdout_closed()
            sys.stderr.flush()
            os._exit(_BROKEN_PIPE_STATUS)   # as after an interrupt: threads may block
        except BaseException as e:   # noqa: BLE001 - sorted into user and internal errors
            exit_if_user_error(e)
            raise

    try:
        app.run(guarded, flags_parser=lambda argv: _parse_flags(argv, before_flags))
    except BrokenPipeError:
        _stdout_closed()
        sys.exit(_BROKEN_PIPE_STATUS)
    except SystemExit:
        try:   # what is still buffered (absl's --help) meets the closed pipe here, not at exit
            sys.stdout.flush()
        except BrokenPipeError:
            _stdout_closed()
            sys.exit(_BROKEN_PIPE_STATUS)
        raise
