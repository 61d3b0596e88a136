"""A run's checkpoints: the latest few (state + data iterator + bookkeeping) and the best.

Layout of a workdir: `checkpoints/<step>/` (kept: `config.checkpoint.max_to_keep`) and
`best/<step>/` (one). The trainer saves and resumes through `Checkpoints`; the evaluator
finds and restores the model part of one with `find` and `restore_model`. Both restore
through `restore_state`.
"""
from __future__ import annotations

import os

from absl import logging
import grain
import jax
import orbax.checkpoint as ocp

KINDS = {"best": "best", "latest": "checkpoints"}   # which -> folder in the workdir


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


class Checkpoints:
    """Latest checkpoints (state + data iterator + bookkeeping) and the best one."""

    def __init__(self, workdir: str, config):
        self.latest = _manager(os.path.join(workdir, KINDS["latest"]),
                               int(config.checkpoint.max_to_keep))
        self.best = _manager(os.path.join(workdir, KINDS["best"]), 1)

    def save(self, state, iterator, meta: dict) -> None:
        step = int(meta["step"])
        if step in self.latest.all_steps():
            return
        self.latest.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(iterator),
            meta=ocp.args.JsonSave(meta)))
        self.latest.wait_until_finished()

    def latest_meta(self) -> tuple[int | None, dict | None]:
        """The newest readable checkpoint's step and bookkeeping; corrupt ones are skipped."""
        for step in sorted(self.latest.all_steps(), reverse=True):
            try:
                meta = self.latest.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
                return step, dict(meta["meta"])
            except Exception as e:  # a half-written or damaged checkpoint
                logging.warning("checkpoint %d in %s is unreadable (%s); trying the previous one.",
                                step, self.latest.directory, e)
        return None, None

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
        self.best.wait_until_finished()

    def restore_best(self, target):
        step = self.best.latest_step()
        if step is None:
            return None
        return restore_state(self.best, step, target)

    def discard_best_after(self, step: int) -> None:
        """A best checkpoint newer than the resumed state belongs to the lost future."""
        for s in [s for s in self.best.all_steps() if s > step]:
            self.best.delete(s)

    def close(self):
        self.latest.close()
        self.best.close()


def find(workdir: str, which: str = "best") -> tuple[str, int]:
    """(folder, step) of the checkpoint to evaluate in a training workdir.

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
        steps = manager.all_steps()
        manager.close()
        if steps:
            if kind != which:
                logging.warning("%s has no %s checkpoint; evaluating the latest (step %d).",
                                workdir, which, max(steps))
            return directory, max(steps)
    raise FileNotFoundError(
        f"--workdir={workdir!r} holds no checkpoint (looked for finished steps in "
        f"{', '.join(os.path.join(workdir, KINDS[k]) for k in order)}); train "
        "there first with `python -m gl_jax.main`.")


def restore_model(directory: str, step: int, target: dict) -> dict:
    """Only `params` and `model_state` of a saved TrainState (no optimizer state)."""
    manager = _manager(directory, read_only=True)
    try:
        return restore_state(manager, step, target, partial=True)
    finally:
        manager.close()
