"""Nothing lost: kills after each kind of checkpoint, SIGTERM, damaged checkpoints, one run per
workdir, bad data and bad settings found before training, one-line user errors.

digits:quick: a warm-up of 10 steps, then 3 Group Loss epochs of 10 steps, checkpoints
every 5 steps and at every epoch end, an evaluation after each Group Loss epoch."""
import json
import logging as std_logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time

from absl import logging as absl_logging
import numpy as np
import pytest

from gl_jax import checkpoints
from gl_jax import train

from train_helpers import REPO, _Run, assert_same_params, latest_params, quick_config, read_results

pytestmark = pytest.mark.slow
# Every kind of checkpoint: 5 within the warm-up, 10 the stage boundary, 20 and 30 epoch
# ends before their evaluation (30 also before the learning-rate drop), 25 within a Group
# Loss epoch, 40 the last, before the final evaluation.
KILL_STEPS = (5, 10, 20, 25, 30, 40)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    train.train_and_evaluate(quick_config(), workdir)
    return workdir


def assert_same_run(workdir, reference):
    assert read_results(workdir)["test"] == read_results(reference)["test"]
    assert read_results(workdir)["selected_step"] == read_results(reference)["selected_step"]
    assert_same_params(workdir, reference)


def finished_steps(workdir):
    ckpt = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt):
        return []
    return sorted(int(d) for d in os.listdir(ckpt)
                  if d.isdigit() and os.path.isfile(os.path.join(ckpt, d, checkpoints.MANIFEST)))


# ---------------------------------------------------------------------------- SIGKILL
def test_sigkill_right_after_each_kind_of_checkpoint_then_resume_matches_uninterrupted(
        reference, tmp_path):
    """The process kills itself right after saving a checkpoint of each kind (KILL_STEPS);
    each rerun of the same command resumes where the last one died; the last one ends
    exactly as the uninterrupted run."""
    workdir = str(tmp_path / "killed")
    env = {"GL_JAX_KILL_AFTER_SAVE": ",".join(str(s) for s in KILL_STEPS)}
    for previous, expected in zip((None,) + KILL_STEPS, KILL_STEPS):
        code, out = _Run(workdir, env=env).wait()
        assert code == -signal.SIGKILL, out
        assert finished_steps(workdir)[-1] == expected
        assert not os.path.exists(os.path.join(workdir, "results.json"))
        if previous is not None:
            assert f"resumed from step {previous}" in out
    code, out = _Run(workdir, env=env).wait()
    assert code == 0 and "resumed from step 40" in out, out
    assert_same_run(workdir, reference)


# ---------------------------------------------------------------------------- SIGTERM
def test_sigterm_saves_within_two_steps_and_resumes_to_the_same_result(reference, tmp_path):
    workdir = str(tmp_path / "preempted")
    # With logging every 10 steps, up to 10 steps could be queued on the device; at most
    # 2 are in flight, so the checkpoint is saved within 2 steps of the signal.
    seconds = []
    for after in (5, 15, 25):
        run = _Run(workdir, "--config.logging.every_steps=10")
        deadline = time.time() + 300
        while not any(s >= after for s in finished_steps(workdir)):
            assert run.proc.poll() is None, run.output()
            assert time.time() < deadline
            time.sleep(0.02)
        sent = time.time()
        run.proc.send_signal(signal.SIGTERM)
        code, out = run.wait()
        seconds.append(time.time() - sent)
        assert code == 0 and "SIGTERM" in out, out
        if os.path.exists(os.path.join(workdir, "results.json")):
            break
        late = re.search(r"stopped at step (\d+), (\d+) step\(s\) after SIGTERM", out)
        assert late and int(late.group(2)) <= 2, out
        assert finished_steps(workdir)[-1] == int(late.group(1))
    print("SIGTERM to exit, seconds:", [round(s, 2) for s in seconds])
    assert max(seconds) < 20
    if not os.path.exists(os.path.join(workdir, "results.json")):
        code, out = _Run(workdir).wait()
        assert code == 0 and "resumed from step" in out, out
    assert_same_run(workdir, reference)


# ---------------------------------------------------------------------- damaged checkpoints
def _damage(step_dir, how):
    files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, "state", "d"))
             for f in fs]
    path = max(files, key=os.path.getsize)   # the largest array file
    if how == "truncated array file":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    elif how == "missing state item":
        shutil.rmtree(os.path.join(step_dir, "state"))
    elif how == "garbage iterator state":
        with open(os.path.join(step_dir, "data", "process_0-of-1.json"), "w") as f:
            f.write("{not json")
    elif how == "flipped bytes":
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) // 2)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0xFF]))
    else:
        raise ValueError(how)


@pytest.mark.parametrize("how", ["truncated array file", "missing state item",
                                 "garbage iterator state", "flipped bytes"])
def test_a_damaged_newest_checkpoint_is_skipped(reference, tmp_path, how, caplog):
    workdir = str(tmp_path / "damaged")
    shutil.copytree(reference, workdir)
    os.remove(os.path.join(workdir, "results.json"))
    shutil.rmtree(os.path.join(workdir, "best"))   # re-made by the resumed run
    _damage(os.path.join(workdir, "checkpoints", "40"), how)
    # Resuming from 35 replays the last 5 steps and the last evaluation.
    caplog.set_level("WARNING")
    train.train_and_evaluate(quick_config(), workdir)
    assert "checkpoint" in caplog.text and "40" in caplog.text
    assert read_results(workdir)["test"] == read_results(reference)["test"]
    _, params = latest_params(workdir)
    _, expected = latest_params(reference)
    for key in params:
        np.testing.assert_array_equal(params[key], expected[key], err_msg=key)


def test_every_checkpoint_damaged_says_so_and_how_to_start_afresh(reference, tmp_path):
    workdir = str(tmp_path / "all_damaged")
    shutil.copytree(reference, workdir)
    for step in finished_steps(workdir):
        _damage(os.path.join(workdir, "checkpoints", str(step)), "flipped bytes")
    with pytest.raises(checkpoints.NoUsableCheckpointError,
                       match=r"no checkpoint in .* can be restored \(step 40: .*checksum.*"
                             r"To start this run afresh, move"):
        train.train_and_evaluate(quick_config(), workdir)


def test_the_evaluator_skips_a_damaged_best_checkpoint(reference, tmp_path):
    workdir = str(tmp_path / "eval")
    shutil.copytree(reference, workdir)
    best = os.path.join(workdir, "best")
    (step,) = [d for d in os.listdir(best) if d.isdigit()]
    _damage(os.path.join(best, step), "flipped bytes")
    said = []

    class Keep(std_logging.Handler):
        def emit(self, record):
            said.append(record.getMessage())
    keep, logger = Keep(), absl_logging.get_absl_logger()
    logger.addHandler(keep)
    try:
        for _ in range(3):   # embed and search look several times: said once
            assert checkpoints.find(workdir, "best") == (os.path.join(workdir, "checkpoints"),
                                                         40)
    finally:
        logger.removeHandler(keep)
    assert [m for m in said if "intact" in m] == [
        f"{workdir} has no intact best checkpoint; evaluating the latest (step 40)."]
    assert not [m for m in said if "read only" in m or "read_only" in m]   # Orbax's notes


# ---------------------------------------------------------------------- one run per workdir
def test_a_second_run_on_a_busy_workdir_refuses_at_once(reference, tmp_path):
    workdir = str(tmp_path / "busy")
    first = _Run(workdir)
    lock = os.path.join(workdir, ".lock")
    deadline = time.time() + 120
    while not (os.path.exists(lock) and os.path.getsize(lock) > 0):
        assert first.proc.poll() is None and time.time() < deadline, first.output()
        time.sleep(0.05)
    started = time.time()
    code, out = _Run(workdir).wait()
    assert code == 2 and time.time() - started < 30, out
    assert f"error: the workdir {workdir!r} is in use by another run (host " in out
    assert f"pid {first.proc.pid}" in out and "Traceback" not in out
    code, out = first.wait()
    assert code == 0, out
    assert read_results(workdir)["test"] == read_results(reference)["test"]


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path):
    workdir = str(tmp_path / "stale")
    os.makedirs(workdir)
    with open(os.path.join(workdir, ".lock"), "w") as f:
        json.dump({"host": "gone", "pid": 999999, "started": "yesterday"}, f)
    config = quick_config(warmup__steps_per_epoch=2, schedule__steps_per_epoch=2,
                          schedule__epochs=1, schedule__lr_drop_epochs=(),
                          schedule__lr_drop_factors=())
    train.train_and_evaluate(config, workdir)
    assert os.path.exists(os.path.join(workdir, "results.json"))


# -------------------------------------------------------------------------- user errors
def _main(*flags):
    cmd = [sys.executable, "-m", "gl_jax.main", "--config=configs/digits.py:quick", *flags]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))


def test_a_user_error_is_one_line_without_traceback(tmp_path):
    proc = _main(f"--workdir={tmp_path}", "--config.optimizer.lr=-1.0")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: config.optimizer.lr = -1.0: a learning rate must be a finite number >= 0.")
    assert "Traceback" not in proc.stderr
    shown = _main(f"--workdir={tmp_path}", "--config.optimizer.lr=-1.0", "--verbosity=1")
    assert shown.returncode != 0 and "Traceback" in shown.stderr


def test_bad_images_fail_before_any_training_naming_every_file(tmp_path):
    from PIL import Image
    root = tmp_path / "data"
    for c in range(4):
        os.makedirs(root / f"class{c}")
        for i in range(4):
            Image.new("RGB", (8, 8), (c * 60, i * 60, 0)).save(root / f"class{c}" / f"{i}.jpg")
    (root / "class3" / "notes.jpg").write_text("not an image")
    good = (root / "class2" / "0.jpg").read_bytes()
    (root / "class2" / "cut.jpg").write_bytes(good[:len(good) // 2])
    os.symlink(root / "class1" / "missing.jpg", root / "class1" / "dangling.jpg")
    proc = _main(f"--workdir={tmp_path / 'w'}", "--config.data.name=image_folder",
                 f"--config.data.root={root}", "--config.mesh.num_devices=1",
                 "--config.sampler.classes_per_batch=2", "--config.warmup.classes_per_batch=2")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for name in ("notes.jpg", "cut.jpg", "dangling.jpg", "--config.data.skip_corrupt=True"):
        assert name in proc.stderr
    assert not os.path.exists(tmp_path / "w" / "checkpoints")   # nothing was trained
