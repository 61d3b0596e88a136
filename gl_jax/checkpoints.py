"""A run's checkpoints: the latest few (state + data iterator + bookkeeping) and the best.

Layout of a workdir: `checkpoints/<step>/` (kept: `config.checkpoint.max_to_keep`) and
`best/<step>/` (one). The trainer saves and resumes through `Checkpoints`; the evaluator
finds and restores the model part of one with `find` and `restore_model`. Both restore
through `restore_state`.

Every finished checkpoint gets a manifest, `<step>/gl_jax_checksums.json`: the size and
CRC-32 of each of its files, written after Orbax has finalised it. A checkpoint whose
files do not match (truncated, missing, overwritten, flipped bits), or that has no
manifest (the process died between Orbax's finalisation and the manifest), is never
restored: resuming, reloading the best and evaluating all skip it with a warning that
names it and the first file that differs. Checkpoints on non-local paths (`gs://...`)
are not checksummed (the manifest needs the files on a local or mounted file system).

A save that fails for a full disk, a quota or a file system that may not be written
raises one CheckpointWriteError naming the path and the step a rerun resumes from; a
checkpoint that must go (newer than the resumed one) but cannot be deleted is moved
aside to `<step>.discarded`. Relative paths are made absolute (Orbax takes no others).
"""
from __future__ import annotations

import atexit
import errno
import gc
import json
import logging as std_logging
import os
import re
import signal
import sys
import traceback
import zlib

from absl import logging
from etils import epath
import grain
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from gl_jax.errors import CheckpointWriteError
# What a restore from a workdir's checkpoints fails with; callers catch it from here.
from gl_jax.errors import NoUsableCheckpointError  # noqa: F401

KINDS = {"best": "best", "latest": "checkpoints"}   # which -> folder in the workdir
MANIFEST = "gl_jax_checksums.json"


# ---------------------------------------------------------------------------- checksums
def _local(directory: str) -> bool:
    return "://" not in str(directory)


def _absolute(directory: str) -> str:
    """Orbax refuses relative paths (at the first save, deep inside tensorstore), and a
    relative one would also change meaning if the working directory did."""
    return os.path.abspath(directory) if _local(directory) else str(directory)


def _crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            crc = zlib.crc32(block, crc)
    return crc


def _files(step_dir: str) -> list[str]:
    out = []
    for root, _, names in os.walk(step_dir):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), step_dir)
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def write_manifest(step_dir: str) -> None:
    """Records size and CRC-32 of every file of a finished checkpoint (atomically)."""
    if not _local(step_dir):
        return
    entries = {rel: [os.path.getsize(os.path.join(step_dir, rel)),
                     _crc32(os.path.join(step_dir, rel))] for rel in _files(step_dir)}
    tmp = os.path.join(step_dir, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(entries, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(step_dir, MANIFEST))


def verify(step_dir: str) -> str | None:
    """None when every file of the checkpoint matches its manifest; else what differs."""
    if not _local(step_dir):
        return None
    path = os.path.join(step_dir, MANIFEST)
    try:
        with open(path) as f:
            entries = json.load(f)
    except FileNotFoundError:
        return f"it has no {MANIFEST} (unfinished save)"
    except (OSError, ValueError) as e:
        return f"its {MANIFEST} is unreadable ({e})"
    for rel, (size, crc) in sorted(entries.items()):
        full = os.path.join(step_dir, rel)
        if not os.path.isfile(full):
            return f"{rel} is missing"
        if os.path.getsize(full) != size:
            return f"{rel} has {os.path.getsize(full)} bytes, {size} were saved"
        if _crc32(full) != crc:
            return f"{rel} has changed since it was saved (checksum mismatch)"
    extra = sorted(set(_files(step_dir)) - set(entries))
    if extra:
        return f"{extra[0]} was not part of the saved checkpoint"
    return None


def _crash_point(step: int) -> None:
    """Fault injection for the resume tests: `GL_JAX_KILL_AFTER_SAVE=5,10,...` makes the
    process SIGKILL itself right after saving one of those steps (as a preempted machine
    could die at any moment). Unset in normal use."""
    steps = os.environ.get("GL_JAX_KILL_AFTER_SAVE", "")
    if steps and str(step) in steps.split(","):
        logging.flush()
        os.kill(os.getpid(), signal.SIGKILL)


# ------------------------------------------------------------------------------ restore
def restore_state(manager: ocp.CheckpointManager, step: int, target, *, partial: bool = False):
    """The 'state' item of checkpoint `step`, restored into `target` (leaves: shape, dtype
    and sharding). `partial`: `target` names a subset of the saved tree (e.g. only
    'params' and 'model_state' of a TrainState).

    A checkpoint of another model (layers missing, extra unless `partial`, or of other
    shapes: its metadata is compared with `target` first) raises ValueError naming the
    leaves that differ, before any array is read."""
    misfit = _model_misfit(manager, step, target, partial)
    if misfit:
        raise ValueError(misfit)
    if not partial:
        return manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target)))["state"]
    restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), target)
    return manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=True)))["state"]


_MODEL_PARTS = ("params", "model_state")


def _leaf_shapes(tree) -> dict:
    """{'params/backbone/conv1/kernel': shape} for the leaves of the model's parts of a
    TrainState-like tree or of a checkpoint's metadata tree (Variables' `value` dropped)."""
    shapes = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
        if names and names[-1] == "value":
            names.pop()
        if names and names[0] in _MODEL_PARTS and hasattr(leaf, "shape"):
            shapes["/".join(names)] = tuple(leaf.shape)
    return shapes


def _model_misfit(manager: ocp.CheckpointManager, step: int, target, partial: bool) -> str:
    """'' when the model's leaves of checkpoint `step` have the paths and shapes of
    `target`'s; else what differs (at most 3 leaves named per kind). `partial`: leaves
    saved beyond `target`'s are fine (e.g. the classifier, for a model built without one)."""
    wanted = _leaf_shapes(target)
    if not wanted:
        return ""
    # The handler, not a Checkpointer: that one also looks for (and warns about the absence
    # of) a step-level metadata file inside the item's folder.
    item = epath.Path(manager.directory) / str(step) / "state"
    saved = _leaf_shapes(ocp.PyTreeCheckpointHandler().metadata(item).tree)

    def first_three(items: list) -> str:
        return ", ".join(items[:3]) + (f" and {len(items) - 3} more" if len(items) > 3 else "")

    missing = [f"{p} {wanted[p]}" for p in sorted(set(wanted) - set(saved))]
    extra = [] if partial else [f"{p} {saved[p]}" for p in sorted(set(saved) - set(wanted))]
    reshaped = [f"{p} saved {saved[p]}, model {wanted[p]}"
                for p in sorted(set(wanted) & set(saved)) if wanted[p] != saved[p]]
    parts = []
    if missing:
        parts.append(f"the model has {first_three(missing)} that the checkpoint lacks")
    if extra:
        parts.append(f"the checkpoint has {first_three(extra)} that the model lacks")
    if reshaped:
        parts.append(f"other shapes: {first_three(reshaped)}")
    return "; ".join(parts)


class _ReadOnlyNotes(std_logging.Filter):
    """Drops Orbax's warnings that a manager opened its folder read-only: all that finding
    and restoring a checkpoint ever do, so they would only be noise on stderr."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        message = str(record.msg)   # both notes are plain strings: nothing to format
        return not ("orbax" in record.pathname and ("read_only=True" in message
                                                    or "directory is read only" in message))


def _manager(directory: str, max_to_keep: int | None = None, read_only: bool = False):
    logger, quiet = logging.get_absl_logger(), _ReadOnlyNotes()
    logger.addFilter(quiet)   # Orbax says so while the options and the manager are built
    try:
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only,
                                               read_only=read_only)
        return ocp.CheckpointManager(_absolute(directory), options=options)
    finally:
        logger.removeFilter(quiet)


def _verified_steps(manager: ocp.CheckpointManager, failures: list | None = None):
    """Steps newest first whose files match their manifest; the others are logged (and
    appended to `failures` as (step, reason))."""
    for step in sorted(manager.all_steps(), reverse=True):
        step_dir = os.path.join(str(manager.directory), str(step))
        problem = verify(step_dir)
        if problem is None:
            yield step
            continue
        logging.warning("checkpoint %s is damaged: %s; skipping it.", step_dir, problem)
        if failures is not None:
            failures.append((step, problem))


class _IteratorState:
    """A data iterator's state as grain's checkpoint handler writes it for iterators that
    are not its own DatasetIterator: JSON bytes (read back as a DatasetIterator's dict)."""

    def __init__(self, state):
        self._state = state if isinstance(state, bytes) else json.dumps(state, indent=4).encode()

    def get_state(self) -> bytes:
        return self._state


def _processes() -> tuple[int, int]:
    """(this JAX process's index, the number of processes)."""
    return jax.process_index(), jax.process_count()


# --------------------------------------------------------------------- write failures
# What a full disk, a quota or a file system that may not be written look like.
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)


def write_problem(error: BaseException) -> tuple[int, str | None] | None:
    """(errno, path or None) when `error`, or one it was raised from, says that the disk is
    full, over quota or not writable; None for anything else.

    Orbax writes arrays through tensorstore, whose errors arrive as ValueError whose text
    ends in `[os_error_code='28']`; other files fail with plain OSErrors."""
    for e in _chain(error):
        if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
            return e.errno, e.filename
        text = str(e)
        code = re.search(r"os_error_code='(\d+)'", text)
        number = int(code.group(1)) if code else next(
            (n for n in _WRITE_ERRNOS if os.strerror(n) in text), None)
        if number in _WRITE_ERRNOS:
            path = (re.search(r'Failed writing: "([^"]+)"', text)
                    or re.search(r'local file "([^"]+)"', text))
            return number, path.group(1) if path else None
    return None


def _chain(error: BaseException):
    """`error` and every exception it was raised from or during (groups included), once."""
    seen, todo = set(), [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]


def _release(error: BaseException) -> None:
    """Frees what a failed Orbax save left behind now, while Python can still run it.

    The frames of `error`'s tracebacks hold Orbax's event loops with the writes that were
    still pending when the first one failed. Kept alive with the error until the
    interpreter shuts down, each was finalised then and printed a traceback
    (`ImportError: sys.meta_path is None`). The tracebacks stay printable."""
    for e in _chain(error):
        traceback.clear_frames(e.__traceback__)
    gc.collect()


def _collect_at_exit(quiet: _QuietWriteFailures) -> None:
    """After a failed save, writes that were still in flight in tensorstore when `_release`
    ran end later; what Orbax left waiting on them becomes garbage only then. Collected at
    exit, while imports still work, with their noise left out until then."""
    def collect():
        try:
            gc.collect()
        finally:
            quiet.remove()
    atexit.register(collect)


class _QuietWriteFailures:
    """Leaves out what Orbax and tensorstore print themselves about a save that failed for
    a full or unwritable disk: ERROR logs with the tracebacks of Orbax's threads, and
    "Event loop is closed" from the callbacks of writes that were still in flight when
    Orbax gave up (through `sys.unraisablehook`, several per array). The error reaches the
    user once, as CheckpointWriteError (its cause chain intact)."""

    def __init__(self):
        # absl: Orbax's logs; asyncio: "Task exception was never retrieved" for each write
        # Orbax abandoned, when `_release` finalises it.
        self._loggers = [std_logging.getLogger(name) for name in ("absl", "asyncio")]
        for logger in self._loggers:
            logger.addFilter(self._log_filter)
        self._previous_hook = sys.unraisablehook
        sys.unraisablehook = self._unraisable

    @staticmethod
    def _log_filter(record) -> bool:
        if record.name == "absl" and "orbax" not in record.pathname.split(os.sep):
            return True
        error = record.exc_info[1] if record.exc_info else None
        return write_problem(error or Exception(record.getMessage())) is None

    def _unraisable(self, info) -> None:
        if not (info.object is None and isinstance(info.exc_value, RuntimeError)
                and str(info.exc_value) == "Event loop is closed"):
            self._previous_hook(info)

    def remove(self) -> None:
        for logger in self._loggers:
            logger.removeFilter(self._log_filter)
        if sys.unraisablehook == self._unraisable:
            sys.unraisablehook = self._previous_hook


class Checkpoints:
    """Latest checkpoints (state + data iterator + bookkeeping) and the best one."""

    def __init__(self, workdir: str, config):
        self.workdir = _absolute(workdir)
        self.latest = _manager(os.path.join(self.workdir, KINDS["latest"]),
                               int(config.checkpoint.max_to_keep))
        self.best = _manager(os.path.join(self.workdir, KINDS["best"]), 1)

    def _finish(self, manager: ocp.CheckpointManager, step: int) -> None:
        manager.wait_until_finished()
        directory = os.path.join(str(manager.directory), str(step))
        index, count = _processes()
        if index == 0:
            write_manifest(directory)
        if count > 1:
            # Process 0 writes the manifest; every process may read it next (the best
            # model is restored on all of them). One that looked before it was written
            # took the checkpoint for an unfinished save and skipped it while the others
            # restored it, and the processes' collectives no longer matched: a hang.
            multihost_utils.sync_global_devices(f"gl_jax checkpoint manifest {directory}")

    def _write(self, manager: ocp.CheckpointManager, step: int, args) -> None:
        """Saves `args` as checkpoint `step` of `manager` and waits for it to be final; a
        full or unwritable disk becomes one CheckpointWriteError instead of an Orbax
        traceback."""
        try:
            manager.save(step, args=args)
            self._finish(manager, step)
        except Exception as e:  # noqa: BLE001 - anything else is re-raised as it is
            problem = write_problem(e)
            if problem is None:
                raise
            _release(e)
            raise self._write_error(manager, step, *problem) from e

    def _write_error(self, manager, step: int, number: int, path: str | None):
        # The epoch-end checkpoint precedes the evaluation that saves a best model, so a
        # run that fails saving best/<step> resumes from checkpoints/<step>.
        newest = step if manager is self.best else step - 1
        resume = next((s for s in sorted(self.latest.all_steps(), reverse=True)
                       if s <= newest and verify(os.path.join(str(self.latest.directory),
                                                              str(s))) is None), None)
        where = os.path.join(str(manager.directory), str(step))
        remedy = ("after freeing space" if number in (errno.ENOSPC, errno.EDQUOT)
                  else f"once {manager.directory} can be written")
        then = (f"the earlier checkpoints are intact: {remedy}, the same command resumes "
                f"from step {resume} (checkpoints/{resume})." if resume is not None else
                f"no earlier checkpoint was saved: {remedy}, the same command starts "
                "from the beginning.")
        return CheckpointWriteError(
            f"cannot save checkpoint {where}: {os.strerror(number)}"
            + (f" (writing {path})" if path else "") + f"; {then}", number, path or where)

    def save(self, state, iterator, meta: dict) -> None:
        """`iterator`: anything with grain's `get_state()` (a grain iterator, a
        gl_jax.feed.BatchFeed); `restore_iterator` puts a grain iterator back there."""
        step = int(meta["step"])
        if step in self.latest.all_steps():
            return
        self._write(self.latest, step, ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(_IteratorState(iterator.get_state())),
            meta=ocp.args.JsonSave(meta)))
        _crash_point(step)

    def candidates(self, failures: list | None = None):
        """Steps of the latest checkpoints that passed the checksum check, newest first."""
        return _verified_steps(self.latest, failures)

    def restore_meta(self, step: int) -> dict:
        return dict(self.latest.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))["meta"])

    def restore_state(self, step: int, target):
        return restore_state(self.latest, step, target)

    def restore_iterator(self, step: int, iterator) -> None:
        """Puts `iterator` (freshly built with the same arguments) where step `step` left it."""
        self.latest.restore(step, args=ocp.args.Composite(
            data=grain.checkpoint.CheckpointRestore(iterator)))

    def save_best(self, state, step: int, meta: dict) -> None:
        for stale in [s for s in self.best.all_steps() if s >= step]:
            self._delete(self.best, stale)
        self._write(self.best, step, ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)))

    def restore_best(self, target, failures: list | None = None):
        """The best state so far, or None when there is none or it cannot be restored
        (damaged, or restoring fails: warned, and appended to `failures` as (step, why))."""
        for step in _verified_steps(self.best, failures):
            try:
                return restore_state(self.best, step, target)
            except Exception as e:  # noqa: BLE001 - any failure means: not this checkpoint
                why = f"{type(e).__name__}: {str(e)[:200]}"
                logging.warning("best checkpoint %s cannot be restored (%s).",
                                os.path.join(str(self.best.directory), str(step)), why)
                if failures is not None:
                    failures.append((step, why))
        return None

    def discard_after(self, step: int) -> None:
        """Checkpoints newer than the resumed state (damaged ones, or a best model of the
        lost future) are deleted, so that the run saves those steps anew."""
        for manager in (self.latest, self.best):
            for s in [s for s in manager.all_steps() if s > step]:
                self._delete(manager, s)

    def _delete(self, manager: ocp.CheckpointManager, step: int) -> None:
        """Deletes checkpoint `step`; one that cannot be deleted (files this user may not
        read or remove) is renamed to `<step>.discarded`, a name Orbax does not take for a
        step, so that it neither stops the run nor is resumed; failing that, it is left
        where it is with a warning."""
        try:
            manager.delete(step)
            return
        except OSError as e:
            error = e
        path = os.path.join(str(manager.directory), str(step))
        if not os.path.lexists(path):   # gone after all (e.g. deleted by hand meanwhile)
            manager.reload()
            return
        aside, n = f"{path}.discarded", 1
        while os.path.lexists(aside):
            n += 1
            aside = f"{path}.discarded-{n}"
        try:
            # Renaming within the same folder needs no access to the step's own files.
            os.rename(path, aside)
        except OSError as e:
            logging.warning("checkpoint %s cannot be deleted (%s) nor moved aside (%s); the "
                            "run goes on without it: delete it by hand.", path, error, e)
            return
        manager.reload()
        logging.warning("checkpoint %s cannot be deleted (%s); moved it to %s, which "
                        "the run ignores: delete it when you can.", path, error, aside)

    def __enter__(self) -> Checkpoints:
        """For the run's life: Orbax's own reports of a write that failed for lack of space
        or permission are left out (CheckpointWriteError says it once); the managers are
        closed at the end, however the run ends."""
        self._quiet = _QuietWriteFailures()
        return self

    def __exit__(self, error_type, error, tb) -> None:
        try:
            self.close(quiet=error is not None)
        finally:
            if isinstance(error, CheckpointWriteError):
                _collect_at_exit(self._quiet)
            else:
                self._quiet.remove()

    def close(self, *, quiet: bool = False) -> None:
        """Waits for pending saves and closes both managers. `quiet`: while another error
        is on its way out, a save that failed (and fails again here) is only logged."""
        for manager in (self.latest, self.best):
            try:
                manager.close()
            except Exception as e:  # noqa: BLE001 - see `quiet`
                if not quiet:
                    raise
                logging.info("closing %s after an error: %s: %s", manager.directory,
                             type(e).__name__, e)


_FALLBACKS_SAID: set = set()   # (workdir, which, step) whose fallback to the latest was logged


def find(workdir: str, which: str = "best") -> tuple[str, int]:
    """(folder, step) of the newest intact checkpoint to evaluate in a training workdir.

    which: 'best' (the selected model; falls back to the latest when a run saved none) or
    'latest'. Raises FileNotFoundError naming the workdir when there is none."""
    if which not in KINDS:
        raise ValueError(f"checkpoint must be one of {sorted(KINDS)}, got {which!r}")
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"--workdir={workdir!r} does not exist.")
    order = [which] + (["latest"] if which == "best" else [])
    for kind in order:
        directory = os.path.join(_absolute(workdir), KINDS[kind])
        if not os.path.isdir(directory):
            continue
        manager = _manager(directory, read_only=True)
        step = next(_verified_steps(manager), None)
        manager.close()
        if step is not None:
            said = (_absolute(workdir), which, step)
            if kind != which and said not in _FALLBACKS_SAID:
                _FALLBACKS_SAID.add(said)   # embed and search call find() several times
                logging.warning("%s has no intact %s checkpoint; evaluating the latest "
                                "(step %d).", workdir, which, step)
            return directory, step
    raise FileNotFoundError(
        f"--workdir={workdir!r} holds no intact checkpoint (looked for finished steps in "
        f"{', '.join(os.path.join(workdir, KINDS[k]) for k in order)}); train "
        "there first with `python -m gl_jax.main`.")


def restore_model(directory: str, step: int, target: dict) -> dict:
    """Only `params` and `model_state` of a saved TrainState (no optimizer state)."""
    manager = _manager(directory, read_only=True)
    try:
        return restore_state(manager, step, target, partial=True)
    finally:
        manager.close()
