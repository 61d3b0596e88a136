"""README's first command: the embedded Omniglot default, quiet, showing the held-out gain,
ending with the embed and search commands that reproduce its evaluation.

Run through the command line as a user would, at a reduced budget: `:quick` with full
epochs (2 epochs of 42 steps, a quarter of the default's 8)."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from gl_jax.index import Index
from train_helpers import REPO

pytestmark = pytest.mark.slow


# Held-out gains a training run must beat. Measured at this budget: trained +0.25 R@1 /
# +0.10 MAP@R; the same run with lr 0 (nothing learns; BatchNorm statistics still adapt
# to the data) +0.11 / +0.03.
MIN_RECALL_GAIN, MIN_MAP_GAIN = 0.18, 0.06


def _main(workdir, *flags):
    cmd = [sys.executable, "-m", "gl_jax.main", "--config=configs/omniglot.py:quick",
           f"--workdir={workdir}", "--config.schedule.steps_per_epoch=0", *flags]
    # Bytes, not text mode: universal newlines would turn a progress bar's '\r' into lines.
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, timeout=900,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    proc.stdout, proc.stderr = proc.stdout.decode(), proc.stderr.decode()
    return proc


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("first_run")
    proc = _main(workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(workdir / "results.json") as f:
        return proc, json.load(f), str(workdir)


def test_held_out_recall_beats_the_untrained_network(first_run):
    _, results, _ = first_run
    before, after = results["untrained_test"], results["test"]
    assert after["recall@1"] > before["recall@1"] + MIN_RECALL_GAIN, (before, after)
    assert after["map@r"] > before["map@r"] + MIN_MAP_GAIN, (before, after)
    assert results["gain"]["recall@1"] == pytest.approx(after["recall@1"] - before["recall@1"])


def test_the_margin_is_out_of_reach_without_learning(tmp_path):
    """With lr 0 the same run stays below the margins: they measure learning, not the
    BatchNorm statistics adapting to the data."""
    proc = _main(tmp_path, "--config.optimizer.lr=0.0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(tmp_path / "results.json") as f:
        gain = json.load(f)["gain"]
    assert gain["recall@1"] < MIN_RECALL_GAIN and gain["map@r"] < MIN_MAP_GAIN, gain


def test_output_is_a_few_clean_lines(first_run):
    proc, _, _ = first_run
    # Into a pipe or a file progress comes in whole lines, not carriage-return redraws.
    assert "\r" not in proc.stdout + proc.stderr
    lines = proc.stdout.split("\n") + proc.stderr.split("\n")
    # No dependency chatter: no absl INFO lines (I1130 12:00:00 ... or INFO:absl:...).
    chatter = [line for line in lines if re.match(r"^(I\d{4} |INFO:|WARNING:absl)", line)]
    assert not chatter, chatter[:5]
    assert any(line.startswith("data omniglot: train 2,720 images / 136 classes")
               for line in lines), proc.stdout
    assert any(line.startswith("before training: test recall@1") for line in lines)
    assert "| held-out metric | before training | after training | gain |" in proc.stdout
    # The data summary, stages, where files go, before training, one line per epoch's
    # evaluation at most, the table: a few lines per epoch, not hundreds.
    assert len([line for line in lines if line.strip()]) <= 30, lines


def test_verbosity_brings_the_library_chatter_back(tmp_path):
    proc = _main(tmp_path, "--config.schedule.epochs=1", "--config.schedule.steps_per_epoch=5",
                 "--config.schedule.lr_drop_epochs=()", "--config.schedule.lr_drop_factors=()",
                 "--verbosity=0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"^I\d{4} .*checkpoint", proc.stderr, re.MULTILINE)


def _command(*args, timeout=600):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def test_the_printed_commands_reproduce_the_evaluation(first_run, tmp_path):
    """The run ends with the commands that embed its 106 test characters and search them;
    run as printed, the embeddings are the evaluator's (evaluate/embeddings.npz) within
    1e-6, and every test image as a query (itself left out) gives the run's Recall@1."""
    proc, results, workdir = first_run
    printed = [line.strip() for line in proc.stdout.splitlines() if "python -m gl_jax." in line]
    assert printed == [
        f"python -m gl_jax.embed --workdir={workdir} --images=split:test "
        f"--output={workdir}/embed/test.npz",
        f"python -m gl_jax.search --index={workdir}/embed/test.npz --query=split:test:0 --k=5"]
    for command in printed:
        done = _command(*command.split()[1:])
        assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("\n") == 1 + 1 + 5   # the index, the query, its 5 neighbours

    evaluated = _command("-m", "gl_jax.evaluate", f"--workdir={workdir}",
                         "--evaluate.strategies=flip", "--evaluate.pictures=False",
                         "--evaluate.tsne=False", "--evaluate.nmi=False", timeout=900)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    index = Index.load(f"{workdir}/embed/test.npz")
    with np.load(f"{workdir}/evaluate/embeddings.npz", allow_pickle=False) as z:
        expected, labels = z["test_embedding"], z["test_label"]
    assert index.embeddings.shape == expected.shape == (2120, 64)
    assert len(index.class_names) == 106
    np.testing.assert_array_equal(index.labels, labels)
    difference = float(np.max(np.abs(index.embeddings - expected)))
    print(f"max abs difference to evaluate/embeddings.npz: {difference:.3g}")
    assert difference <= 1e-6

    found = _command("-m", "gl_jax.search", f"--index={workdir}/embed/test.npz",
                     "--query=split:test", "--k=1", f"--output={tmp_path / 'all.json'}")
    assert found.returncode == 0, found.stderr[-3000:]
    with open(tmp_path / "all.json") as f:
        queries = json.load(f)["queries"]
    assert [q["excluded_row"] for q in queries] == list(range(2120))
    recall = float(np.mean([q["neighbours"][0]["class"] == q["class"] for q in queries]))
    print(f"leave-one-out Recall@1 {recall} (results.json: {results['test']['recall@1']})")
    assert recall == results["test"]["recall@1"]
