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
"""
from __future__ import annotations

import json
import os
import signal
import zlib

from absl import logging
import grain
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

# What a restore from a workdir's checkpoints fails with; callers catch it from here.
from gl_jax.errors import NoUsableCheckpointError  # noqa: F401

KINDS = {"best": "best", "latest": "checkpoints"}   # which -> folder in the workdir
MANIFEST = "gl_jax_checksums.json"


# ---------------------------------------------------------------------------- checksums
def _local(directory: str) -> bool:
    return "://" not in str(directory)


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
    'params' and 'model_state' of a TrainState)."""
    if not partial:
        return manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target)))["state"]
    restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), target)
    return manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=True)))["state"]


def _manager(directory: str, max_to_keep: int | None = None, read_only: bool = False):
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only,
                                           read_only=read_only)
    return ocp.CheckpointManager(directory, options=options)


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


class Checkpoints:
    """Latest checkpoints (state + data iterator + bookkeeping) and the best one."""

    def __init__(self, workdir: str, config):
        self.workdir = workdir
        self.latest = _manager(os.path.join(workdir, KINDS["latest"]),
                               int(config.checkpoint.max_to_keep))
        self.best = _manager(os.path.join(workdir, KINDS["best"]), 1)

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

    def save(self, state, iterator, meta: dict) -> None:
        """`iterator`: anything with grain's `get_state()` (a grain iterator, a
        gl_jax.feed.BatchFeed); `restore_iterator` puts a grain iterator back there."""
        step = int(meta["step"])
        if step in self.latest.all_steps():
            return
        self.latest.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(_IteratorState(iterator.get_state())),
            meta=ocp.args.JsonSave(meta)))
        self._finish(self.latest, step)
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
            self.best.delete(stale)
        self.best.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     meta=ocp.args.JsonSave(meta)))
        self._finish(self.best, step)

    def restore_best(self, target):
        """The best state so far, or None when there is none (or it is damaged: warned)."""
        for step in _verified_steps(self.best):
            return restore_state(self.best, step, target)
        return None

    def discard_after(self, step: int) -> None:
        """Checkpoints newer than the resumed state (damaged ones, or a best model of the
        lost future) are deleted, so that the run saves those steps anew."""
        for manager in (self.latest, self.best):
            for s in [s for s in manager.all_steps() if s > step]:
                manager.delete(s)

    def close(self):
        self.latest.close()
        self.best.close()


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
        directory = os.path.join(workdir, KINDS[kind])
        if not os.path.isdir(directory):
            continue
        manager = _manager(directory, read_only=True)
        step = next(_verified_steps(manager), None)
        manager.close()
        if step is not None:
            if kind != which:
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
