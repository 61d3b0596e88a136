"""Nothing lost, at the edges (issue 39): a relative --workdir, a best checkpoint that
cannot be restored, a checkpoint that cannot be deleted, a full disk, and results.json
as strict JSON.

The end-to-end tests (slow) train digits:quick (see tests/test_train_resume.py) without
reloading the best model at the learning-rate drop unless they say otherwise, so that when
and what the run evaluates does not change its training: every run of them trains the
reference's parameters, and the reference's epoch-end test metrics (metrics.jsonl, paper
protocol) are those of the model at each epoch end."""
import errno
import json
import math
import os
import re
import subprocess
import sys

from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from gl_jax import ablation
from gl_jax import checkpoints
from gl_jax import runtime
from gl_jax import train
from gl_jax.errors import CheckpointWriteError

from train_helpers import REPO, assert_same_params, quick_config, read_metrics

slow = pytest.mark.slow


def config(**overrides):
    return quick_config(schedule__reload_best_at_drop=False, **overrides)


def strict_results(workdir):
    """results.json read as strict JSON (no NaN, Infinity or -Infinity: jq and JavaScript
    refuse them)."""
    def refuse(constant):
        raise ValueError(f"results.json holds {constant}, which is not JSON")
    with open(os.path.join(workdir, "results.json")) as f:
        return json.loads(f.read(), parse_constant=refuse)


def metrics_at(reference, step):
    """The reference's test metrics of the model at `step` (an epoch end)."""
    (row,) = [r for r in read_metrics(reference) if r["step"] == step and "test/recall@1" in r]
    return {k[len("test/"):]: v for k, v in row.items() if k.startswith("test/")}


def same_metrics(got, want):
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key


def finished_steps(workdir):
    directory = os.path.join(workdir, "checkpoints")
    return sorted(int(d) for d in os.listdir(directory)
                  if d.isdigit() and os.path.isfile(os.path.join(directory, d,
                                                                 checkpoints.MANIFEST)))


class _Stopped(Exception):
    """Stands for the process dying right after a checkpoint (the real thing, SIGKILL, is
    tested in tests/test_train_resume.py; here the run must stay in this process)."""


def stop_after_saving(monkeypatch, step):
    def crash_point(saved):
        if saved == step:
            raise _Stopped(step)
    monkeypatch.setattr(checkpoints, "_crash_point", crash_point)


def flip_a_byte_of_the_largest_array_file(step_dir):
    files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, "state"))
             for f in fs]
    path = max(files, key=os.path.getsize)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run (evaluated after every Group Loss epoch)."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    train.train_and_evaluate(config(), workdir)
    return workdir


# ------------------------------------------------------------------ 1. relative workdir
@slow
def test_a_relative_workdir_trains_resumes_and_is_evaluated(reference, tmp_path,
                                                            monkeypatch, capsys):
    """`--workdir=rel_wd` crashed at the first checkpoint: Orbax takes only absolute
    paths."""
    monkeypatch.chdir(tmp_path)
    stop_after_saving(monkeypatch, 25)
    with pytest.raises(_Stopped):
        train.train_and_evaluate(config(), "rel_wd")
    assert finished_steps(str(tmp_path / "rel_wd")) == [15, 20, 25]
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    train.train_and_evaluate(config(), "rel_wd")
    assert f"resumed from step 25 in {tmp_path / 'rel_wd'}" in capsys.readouterr().out
    workdir = str(tmp_path / "rel_wd")
    results = strict_results(workdir)
    assert results["test"] == strict_results(reference)["test"]
    assert results["selected_step"] == results["evaluated_step"] == 40
    assert_same_params(workdir, reference)
    # The evaluator's path (gl_jax.evaluate -> ablation.restore_member) from a relative one.
    directory, step = checkpoints.find("rel_wd")
    assert (directory, step) == (os.path.join(workdir, "best"), 40)
    member = ablation.restore_member("rel_wd", config(), 5, runtime.make_mesh(config().mesh))
    assert member.checkpoint == os.path.join(workdir, "best", "40")


# ---------------------------------------------------- 2. a best checkpoint not restored
@slow
def test_a_damaged_best_checkpoint_says_so_and_results_name_the_evaluated_step(
        reference, tmp_path, capsys):
    """Evaluated every 2 epochs, the run selects step 30 and ends at step 40. With best/30
    damaged, a rerun evaluated step 40's model and results.json called it step 30's."""
    workdir = str(tmp_path / "every2")
    train.train_and_evaluate(config(evals__every_epochs=2), workdir)
    results = strict_results(workdir)
    assert results["selected_step"] == results["evaluated_step"] == 30
    same_metrics(results["test"], metrics_at(reference, 30))
    flip_a_byte_of_the_largest_array_file(os.path.join(workdir, "best", "30"))
    capsys.readouterr()
    train.train_and_evaluate(config(evals__every_epochs=2), workdir)
    out = capsys.readouterr().out
    assert ("the selected model (step 30) cannot be restored (best/30: " in out
            and "checksum" in out and "evaluating the final model (step 40) instead" in out), out
    results = strict_results(workdir)
    assert results["selected_step"] == 30 and results["evaluated_step"] == 40
    assert results["note"].startswith("NOT the selected model (epoch 2, step 30), which could "
                                      "not be restored (best/30: "), results["note"]
    assert "the final model, step 40" in results["note"]
    same_metrics(results["test"], metrics_at(reference, 40))
    assert results["test"] != metrics_at(reference, 30)


@slow
def test_a_damaged_best_checkpoint_at_a_learning_rate_drop_says_so_and_training_goes_on(
        tmp_path, capsys, monkeypatch):
    """schedule.reload_best_at_drop: at the drop (the start of Group Loss epoch 3, step 30)
    the best checkpoint so far is damaged; the run says so on stdout and continues from the
    current parameters (it used to say nothing but a log warning)."""
    save_best = checkpoints.Checkpoints.save_best

    def save_and_damage(self, state, step, meta):
        save_best(self, state, step, meta)
        flip_a_byte_of_the_largest_array_file(os.path.join(str(self.best.directory), str(step)))

    monkeypatch.setattr(checkpoints.Checkpoints, "save_best", save_and_damage)
    workdir = str(tmp_path / "drop")
    train.train_and_evaluate(quick_config(schedule__reload_best_at_drop=True), workdir)
    out = capsys.readouterr().out
    assert "continuing from the best checkpoint so far" not in out
    (line,) = [line for line in out.splitlines() if "lr drop" in line] or [out]
    assert line.startswith("epoch 3: lr drop; the best checkpoint so far (step ") and (
        "cannot be restored (best/" in line and "checksum" in line
        and line.endswith("continuing from the current parameters (step 30) instead")), line
    results = strict_results(workdir)
    assert results["evaluated_step"] == 40 and "could not be restored" in results["note"]


# ------------------------------------------------- 3. a checkpoint that cannot be deleted
@slow
def test_an_unreadable_undeletable_newest_checkpoint_is_moved_aside_and_the_run_goes_on(
        reference, tmp_path, monkeypatch, caplog, capsys):
    """checkpoints/25 can be neither read nor deleted (as `chmod 000` makes it for anyone
    but root): the run skips it, resumes from 20, and deleting 25 raised PermissionError,
    at every rerun. Root reads everything, so the manifest is replaced by a directory (an
    open() that fails), and the deletion fails as Orbax's rmtree does without permission."""
    workdir = str(tmp_path / "unreadable")
    stop_after_saving(monkeypatch, 25)
    with pytest.raises(_Stopped):
        train.train_and_evaluate(config(), workdir)
    monkeypatch.undo()
    step_dir = os.path.join(workdir, "checkpoints", "25")
    os.remove(os.path.join(step_dir, checkpoints.MANIFEST))
    os.mkdir(os.path.join(step_dir, checkpoints.MANIFEST))
    delete = ocp.CheckpointManager.delete

    def undeletable(self, step):
        if step == 25 and os.path.basename(str(self.directory)) == "checkpoints":
            raise PermissionError(errno.EACCES, "Permission denied",
                                  os.path.join(str(self.directory), "25", "state"))
        return delete(self, step)

    monkeypatch.setattr(ocp.CheckpointManager, "delete", undeletable)
    caplog.set_level("WARNING")
    capsys.readouterr()
    train.train_and_evaluate(config(), workdir)
    assert "resumed from step 20" in capsys.readouterr().out
    assert f"checkpoint {step_dir} is damaged: its {checkpoints.MANIFEST} is unreadable" in (
        caplog.text)
    assert (f"checkpoint {step_dir} cannot be deleted ([Errno 13] Permission denied: "
            f"'{step_dir}/state'); moved it to {step_dir}.discarded, which the run ignores: "
            "delete it when you can.") in caplog.text
    assert os.path.isdir(step_dir + ".discarded")
    assert strict_results(workdir)["test"] == strict_results(reference)["test"]
    assert_same_params(workdir, reference)
    # The set-aside folder is no step for the next rerun either.
    train.train_and_evaluate(config(), workdir)
    assert "resumed from step 40" in capsys.readouterr().out
    assert strict_results(workdir)["test"] == strict_results(reference)["test"]


class _Position:
    def __init__(self, n):
        self.n = n

    def get_state(self):
        return {"position": self.n}


def _small_checkpoints(directory, steps):
    config = quick_config()
    config.checkpoint.max_to_keep = 5
    store = checkpoints.Checkpoints(str(directory), config)
    for step in steps:
        store.save({"w": np.full(3, step, np.float32)}, _Position(step), {"step": step})
    return store


def test_a_checkpoint_that_can_be_neither_deleted_nor_moved_is_left_with_a_warning(
        tmp_path, monkeypatch, caplog):
    with _small_checkpoints(tmp_path, [1, 2]) as store:
        monkeypatch.setattr(store.latest, "delete", lambda step: (_ for _ in ()).throw(
            PermissionError(errno.EACCES, "Permission denied")))
        monkeypatch.setattr(checkpoints.os, "rename", lambda *a: (_ for _ in ()).throw(
            OSError(errno.EBUSY, "Device or resource busy")))
        caplog.set_level("WARNING")
        store.discard_after(1)
    path = os.path.join(str(tmp_path), "checkpoints", "2")
    assert (f"checkpoint {path} cannot be deleted ([Errno 13] Permission denied) nor moved "
            "aside ([Errno 16] Device or resource busy); the run goes on without it: delete "
            "it by hand.") in caplog.text


def test_a_checkpoint_moved_aside_is_no_step_and_its_step_is_saved_anew(tmp_path, monkeypatch):
    with _small_checkpoints(tmp_path, [1, 2, 3]) as store:
        delete = store.latest.delete
        monkeypatch.setattr(store.latest, "delete", lambda step: (_ for _ in ()).throw(
            PermissionError(errno.EACCES, "Permission denied")) if step == 2 else delete(step))
        store.discard_after(1)
        assert store.latest.all_steps() == [1]
        store.save({"w": np.zeros(3, np.float32)}, _Position(2), {"step": 2})
    directory = os.path.join(str(tmp_path), "checkpoints")
    assert sorted(os.listdir(directory)) == ["1", "2", "2.discarded"]
    with _small_checkpoints(tmp_path, []) as store:
        assert list(store.candidates()) == [2, 1]


def test_a_checkpoint_of_another_model_names_the_leaves_that_differ(tmp_path, monkeypatch):
    """Restoring into a model of other layers or shapes fails before Orbax reads anything
    (its metadata is compared first), naming what is missing, extra and reshaped."""
    zeros = lambda *shape: np.zeros(shape, np.float32)
    saved = {"params": {"conv": {"kernel": zeros(3, 3, 1, 8)}, "head": {"kernel": zeros(8, 5)},
                        "proj": {"kernel": zeros(8, 8)}},
             "model_state": {"bn": {"mean": zeros(8)}}, "opt_state": {"mu": zeros(2)}}
    with _small_checkpoints(tmp_path, []) as store:
        store.save(saved, _Position(1), {"step": 1})
    like = lambda *shape: jax.ShapeDtypeStruct(shape, np.float32,
                                               sharding=jax.sharding.SingleDeviceSharding(
                                                   jax.devices()[0]))
    target = {"params": {"conv": {"kernel": like(3, 3, 1, 8)}, "head": {"kernel": like(8, 10)},
                         "embedding": {"kernel": like(8, 4), "bias": like(4)}},
              "model_state": {"bn": {"mean": like(8)}}}
    monkeypatch.setattr(ocp.CheckpointManager, "restore", lambda *a, **k: pytest.fail(
        "Orbax was asked to restore a checkpoint that does not fit"))
    with pytest.raises(ValueError) as raised:
        checkpoints.restore_model(str(tmp_path / "checkpoints"), 1, target)
    # The model part only: leaves saved beyond the target's (params/proj) are no misfit.
    assert str(raised.value) == (
        "the model has params/embedding/bias (4,), params/embedding/kernel (8, 4) that the "
        "checkpoint lacks; other shapes: params/head/kernel saved (8, 5), model (8, 10)")
    # The trainer's full restore (resume) also names what the model lacks; the optimizer
    # state is not compared (its layout is the optimizer's, not the model's).
    with _small_checkpoints(tmp_path, []) as store, pytest.raises(ValueError) as raised:
        store.restore_state(1, dict(target, opt_state={"nu": like(3)}))
    assert str(raised.value) == (
        "the model has params/embedding/bias (4,), params/embedding/kernel (8, 4) that the "
        "checkpoint lacks; the checkpoint has params/proj/kernel (8, 8) that the model lacks; "
        "other shapes: params/head/kernel saved (8, 5), model (8, 10)")


# --------------------------------------------------------------------------- 4. full disk
def _failing_writes_under(monkeypatch, part, number=errno.ENOSPC):
    """Every file Orbax writes through etils (the JSON items; its arrays go through
    tensorstore) under a path containing `part` fails with OSError `number` (ENOSPC: as
    on a full disk)."""
    path_type = type(epath.Path("/"))
    write_text = path_type.write_text

    def failing(self, *args, **kwargs):
        if part in str(self):
            raise OSError(number, os.strerror(number), str(self))
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(path_type, "write_text", failing)


def test_a_full_disk_while_saving_is_one_error_naming_the_step_to_resume_from(
        tmp_path, monkeypatch):
    """The write fails in Orbax's background thread, as on a real full disk."""
    store = _small_checkpoints(tmp_path, [1])
    _failing_writes_under(monkeypatch, os.path.join("checkpoints", "2.orbax-checkpoint-tmp"))
    with pytest.raises(CheckpointWriteError) as raised:
        with store:
            store.save({"w": np.zeros(3, np.float32)}, _Position(2), {"step": 2})
    error = raised.value
    directory = os.path.join(str(tmp_path), "checkpoints")
    assert isinstance(error, OSError) and error.errno == errno.ENOSPC
    assert str(error).startswith(f"cannot save checkpoint {directory}/2: No space left on "
                                 f"device (writing {directory}/2.orbax-checkpoint-tmp/")
    assert str(error).endswith("; the earlier checkpoints are intact: after freeing space, the "
                               "same command resumes from step 1 (checkpoints/1).")
    assert "\n" not in str(error)
    assert os.path.isfile(os.path.join(directory, "1", checkpoints.MANIFEST))


def test_an_unwritable_best_folder_resumes_from_the_epoch_end_checkpoint(tmp_path, monkeypatch):
    store = _small_checkpoints(tmp_path, [1, 2])
    _failing_writes_under(monkeypatch, os.path.join("best", "2.orbax-checkpoint-tmp"),
                          errno.EROFS)
    with pytest.raises(CheckpointWriteError, match=(
            r"^cannot save checkpoint .*/best/2: Read-only file system \(writing .*\); the "
            r"earlier checkpoints are intact: once .*/best can be written, the same "
            r"command resumes from step 2 \(checkpoints/2\)\.$")):
        with store:
            store.save_best({"w": np.zeros(3, np.float32)}, 2, {"step": 2})


def test_write_problems_are_recognised_through_tensorstore_and_exception_chains():
    # What a real full disk raised (tensorstore, through Orbax's threads).
    text = ('RESOURCE_EXHAUSTED: Error writing "model_state.backbone.bn1.mean.value/0" in '
            'OCDBT database at local file "/w/checkpoints/10.orbax-checkpoint-tmp/state.orbax-'
            'checkpoint-tmp/ocdbt.process_0/": Failed writing: "/w/checkpoints/10.orbax-'
            'checkpoint-tmp/state.orbax-checkpoint-tmp/ocdbt.process_0/d/bcd7": Failed to '
            "write 131732 bytes to file 7: No space left on device [os_error_code='28']")
    assert checkpoints.write_problem(ValueError(text)) == (
        errno.ENOSPC, "/w/checkpoints/10.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/"
        "ocdbt.process_0/d/bcd7")
    try:
        try:
            raise PermissionError(errno.EACCES, "Permission denied", "/w/best/2")
        except OSError as e:
            raise RuntimeError("Save Finalize thread failed") from e
    except RuntimeError as e:
        assert checkpoints.write_problem(e) == (errno.EACCES, "/w/best/2")
    assert checkpoints.write_problem(ValueError("shapes do not match")) is None
    assert checkpoints.write_problem(OSError(errno.EIO, "Input/output error")) is None


@slow
def test_a_full_disk_at_the_second_checkpoint_then_the_rerun_matches_uninterrupted(
        reference, tmp_path, monkeypatch, capsys):
    workdir = str(tmp_path / "full")
    _failing_writes_under(monkeypatch, os.path.join("checkpoints", "10.orbax-checkpoint-tmp"))
    with pytest.raises(CheckpointWriteError, match=(
            r"^cannot save checkpoint .*/full/checkpoints/10: No space left on device \(writing "
            r".*\); the earlier checkpoints are intact: after freeing space, the same command "
            r"resumes from step 5 \(checkpoints/5\)\.$")):
        train.train_and_evaluate(config(), workdir)
    assert finished_steps(workdir) == [5]
    monkeypatch.undo()
    capsys.readouterr()
    train.train_and_evaluate(config(), workdir)
    assert "resumed from step 5" in capsys.readouterr().out
    assert strict_results(workdir) == strict_results(reference)
    assert_same_params(workdir, reference)


def _mount_tmpfs(path, size):
    os.makedirs(path)
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path],
                       check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"no tmpfs can be mounted here ({e})")


@slow
@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                    reason="mounting a small file system needs root")
def test_a_really_full_disk_is_one_line_and_the_rerun_after_freeing_space_matches(
        reference, tmp_path):
    """`python -m gl_jax.main` on a file system with room for one checkpoint: one line on
    stderr (it used to be 1,105 lines of tracebacks ending in `ImportError: sys.meta_path
    is None`), exit status 2; after growing the file system the rerun resumes and finishes
    (that it ends as the uninterrupted run is shown in-process above)."""
    one = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in
              os.walk(os.path.join(reference, "checkpoints", "40")) for f in fs)
    mount = str(tmp_path / "small")
    _mount_tmpfs(mount, int(1.6 * one))
    try:
        workdir = os.path.join(mount, "wd")
        cmd = [sys.executable, "-m", "gl_jax.main", "--config=configs/digits.py:quick",
               f"--workdir={workdir}", "--config.logging.progress=False",
               "--config.schedule.reload_best_at_drop=False"]
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                              env=env)
        assert proc.returncode == 2, proc.stderr[-3000:]
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and re.fullmatch(
            rf"error: cannot save checkpoint {re.escape(workdir)}/checkpoints/10: No space "
            r"left on device \(writing [^ ]+\); the earlier checkpoints are intact: after "
            r"freeing space, the same command resumes from step 5 \(checkpoints/5\)\.",
            lines[0]), proc.stderr[-3000:]
        subprocess.run(["mount", "-o", "remount,size=64m", mount], check=True)
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                              env=env)
        assert proc.returncode == 0 and "resumed from step 5" in proc.stdout, proc.stderr[-3000:]
        results = strict_results(workdir)
        assert results["selected_step"] == results["evaluated_step"] == 40
        assert results["test"].keys() == strict_results(reference)["test"].keys()
    finally:
        subprocess.run(["umount", "-l", mount], capture_output=True)


# -------------------------------------------------------------- 5. strict results.json
@pytest.mark.parametrize("final_test", [True, False])
def test_results_json_is_strict_json_when_nothing_was_selected(tmp_path, final_test):
    """One Group Loss epoch, evaluated every 2: nothing is selected, and the selection
    score, -inf, was written as -Infinity."""
    workdir = str(tmp_path / "nothing")
    train.train_and_evaluate(
        quick_config(warmup__steps_per_epoch=2, schedule__steps_per_epoch=2, schedule__epochs=1,
                     schedule__lr_drop_epochs=(), schedule__lr_drop_factors=(),
                     evals__every_epochs=2, evals__untrained_baseline=False,
                     evals__final_test=final_test), workdir)
    results = strict_results(workdir)
    assert results["selected_step"] == -1 and results["selection_score"] is None
    if final_test:
        assert results["evaluated_step"] == 4 and "no evaluation during training" in (
            results["note"])
        assert all(v is None or math.isfinite(v) for v in results["test"].values())
    else:
        assert results["evaluated_step"] is None and results["test"] is None
