"""Tests of `python -m gl_jax.embed`: a trained digits:quick run embeds its test split with
the evaluator's own embeddings, folders / lists / single images resolve to the documented
paths and classes, unreadable files follow the data scan's rules, and a stopped run
(SIGKILLed in a subprocess, slow tier) resumes from its shards to the same bytes."""
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from gl_jax import ablation
from gl_jax import cli
from gl_jax import embed
from gl_jax import index as index_lib
from gl_jax import runtime
from gl_jax import strategies as glpp
from gl_jax import train
from gl_jax.evaluation import exact_knn
from train_helpers import REPO, quick_config


# Any trained model will do here: digits:quick without its warm-up, one Group Loss epoch
# of STEPS steps, evaluated (and so selected) at its end.
STEPS = 4


def digits_run(tmp_path_factory) -> str:
    """A trained digits workdir, trained once per test session: test_search.py uses the
    same one."""
    workdir = tmp_path_factory.getbasetemp() / "embed_digits_run"
    if not (workdir / "results.json").is_file():
        train.train_and_evaluate(quick_config(
            warmup__epochs=0, schedule__epochs=1, schedule__steps_per_epoch=STEPS,
            schedule__lr_drop_epochs=(), schedule__lr_drop_factors=(),
            evals__untrained_baseline=False), str(workdir))
    return str(workdir)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return digits_run(tmp_path_factory)


def evaluator_embeddings(workdir, flip=False, variant=None):
    """The test split embedded through the evaluator's path (restore_member, the run's
    mesh, embed_split): (raw or flip-averaged embeddings, labels, test source)."""
    config = ablation.load_workdir_config(workdir)
    mesh = runtime.make_mesh(config.mesh)
    splits = runtime.load_splits(config)
    member = ablation.restore_member(workdir, config, splits["train"].num_classes, mesh)
    variant = variant or ablation.trained_variant(config)
    out = ablation.embed_split([member], {(0, variant): flip}, splits["test"], config, mesh,
                               "test")
    found = out[(0, variant)]
    raw = (glpp.flip_average(found["embedding"], found["flipped"]) if flip
           else found["embedding"])
    np.testing.assert_array_equal(out["index"], np.arange(len(splits["test"])))
    return raw, out["label"], splits["test"]


def write_images(folder, count, seed=0, classes=("a", "b", "c")):
    """`count` random PNGs of assorted sizes, spread over class folders."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        sub = folder / classes[i % len(classes)]
        sub.mkdir(parents=True, exist_ok=True)
        h, w = rng.integers(6, 40, size=2)
        path = sub / f"img{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def assert_one_line_user_error(error, *expected):
    message = str(error.value)
    assert cli.is_user_error(error.value), repr(error.value)
    assert "\n" not in message, message
    for text in expected:
        assert text in message, message
    return message


# ----------------------------------------------------------------- what --images names
def test_a_folder_gives_sorted_paths_and_first_level_classes(tmp_path):
    for rel in ("top.png", "cat/1.png", "cat/deeper/2.jpg", "dog/3.PNG", "dog/._4.png",
                "dog/notes.txt", "empty/.keep"):
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    found = embed.resolve_images(str(tmp_path))
    rel = [os.path.relpath(n, tmp_path) for n in found.names]
    assert rel == ["top.png", "cat/1.png", "cat/deeper/2.jpg", "dog/3.PNG"]
    assert found.kind == "folder" and found.spec == str(tmp_path)
    assert found.source.class_names == ["cat", "dog"]
    assert found.source.labels.tolist() == [-1, 0, 0, 1]
    assert found.stats[0] == (1, os.stat(tmp_path / "top.png").st_mtime_ns)


def test_a_list_file_reads_paths_relative_to_itself(tmp_path):
    (tmp_path / "imgs").mkdir()
    listing = tmp_path / "imgs" / "list.txt"
    listing.write_text(f"a.png\n\n# a comment\n  sub/b.jpg  \n{tmp_path / 'c.png'}\n")
    found = embed.resolve_images(str(listing))
    assert found.kind == "list" and found.source.class_names == []
    assert found.names == [str(tmp_path / "imgs" / "a.png"),
                           str(tmp_path / "imgs" / "sub" / "b.jpg"), str(tmp_path / "c.png")]
    assert found.source.labels.tolist() == [-1, -1, -1]
    assert all(s == "missing (no such file)" for s in found.stats)


def test_a_single_image_and_a_split(tmp_path, trained):
    path = tmp_path / "one.png"
    Image.new("RGB", (5, 7)).save(path)
    found = embed.resolve_images(str(path))
    assert (found.kind, found.names, found.source.labels.tolist()) == ("image", [str(path)],
                                                                       [-1])
    config = ablation.load_workdir_config(trained)
    test = runtime.load_splits(config)["test"]
    found = embed.resolve_images("split:test", config)
    assert found.kind == "split" and found.stats is None and len(found.names) == len(test)
    assert found.names[:2] == [test.describe(0), test.describe(1)]
    one = embed.resolve_images("split:test:7", config)
    assert one.names == [test.describe(7)]
    assert one.source.labels.tolist() == [test.labels[7]]


@pytest.mark.parametrize("spec,expected", [
    ("split:", "write split:NAME"),
    ("split:test:x", "write split:NAME"),
    ("split:nope", "has the splits test, train"),
    ("split:test:100000", "split 'test' has 896 records"),
])
def test_a_bad_split_is_one_line(trained, spec, expected):
    config = ablation.load_workdir_config(trained)
    with pytest.raises(ValueError) as error:
        embed.resolve_images(spec, config)
    assert_one_line_user_error(error, expected)


def test_an_empty_folder_and_a_missing_path_are_one_line(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("no images")
    with pytest.raises(ValueError) as error:
        embed.resolve_images(str(tmp_path / "empty"))
    assert_one_line_user_error(error, "no image files under", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError) as error:
        embed.resolve_images(str(tmp_path / "nowhere"))
    assert_one_line_user_error(error, "nowhere", "does not exist")


# ------------------------------------------------------------- the evaluation's embeddings
def test_the_test_split_gets_the_evaluation_embeddings(trained, tmp_path):
    lines = []
    index = embed.embed_images(trained, "split:test", str(tmp_path / "test.npz"),
                               shard_size=256, show_progress=False, say=lines.append)
    raw, labels, test = evaluator_embeddings(trained)
    # The metrics normalise with exact_knn's rule; the evaluator's embeddings.npz with
    # strategies.l2_normalize: both within 1e-6.
    for expected in (exact_knn.l2_normalize(raw), glpp.l2_normalize(raw)):
        difference = float(np.max(np.abs(index.embeddings - expected)))
        print(f"max abs difference to the evaluation: {difference:.3g}")
        assert difference <= 1e-6
    np.testing.assert_array_equal(index.labels, labels)
    assert index.paths.tolist() == [test.describe(i) for i in range(len(test))]
    assert index.class_names == test.class_names and index.normalized
    assert not lines and not os.path.exists(tmp_path / "test.npz.parts")
    loaded = index_lib.Index.load(str(tmp_path / "test.npz"))
    np.testing.assert_array_equal(loaded.embeddings, index.embeddings)
    assert loaded.model == index.model and loaded.model["step"] == STEPS
    assert loaded.model["checkpoint"] == {"requested": "best", "path": f"best/{STEPS}"}
    assert loaded.images == "split:test" and loaded.model["workdir"] == trained


def test_raw_and_flip_embeddings_are_the_evaluators(trained, tmp_path):
    raw_index = embed.embed_images(trained, "split:test:3", str(tmp_path / "raw.npz"),
                                   normalize=False, show_progress=False)
    raw, _, _ = evaluator_embeddings(trained)
    np.testing.assert_allclose(raw_index.embeddings, raw[3:4], atol=1e-6, rtol=0)
    assert not raw_index.normalized
    flipped = embed.embed_images(trained, "split:test", str(tmp_path / "flip.npz"),
                                 strategies=["flip", "pool_mix"], pool_mix=0.3,
                                 show_progress=False)
    config = ablation.load_workdir_config(trained)
    variant = ablation.Variant("mix", 0.3, ablation.trained_variant(config).leak)
    expected, _, _ = evaluator_embeddings(trained, flip=True, variant=variant)
    assert float(np.max(np.abs(flipped.embeddings - exact_knn.l2_normalize(expected)))) <= 1e-6
    assert flipped.model["embedding"] == {"strategies": ["flip", "pool_mix"], "pool_mix": 0.3,
                                          "leak": None}
    with pytest.raises(ValueError) as error:
        embed.embed_images(trained, "split:test", str(tmp_path / "x.npz"),
                           strategies=["rerank"])
    assert_one_line_user_error(error, "rerank", "not among the embedding switches")
    tiny = tmp_path / "tiny"   # at 2 px the small CNN ends in a 1 x 1 map: max = avg
    shutil.copytree(trained, tiny)
    saved = json.loads((tiny / "config.json").read_text())
    saved["data"]["image_size"] = saved["data"]["resize_size"] = 2
    (tiny / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError) as error:
        embed.embed_images(str(tiny), "split:test:0", str(tmp_path / "y.npz"),
                           strategies=["pool_mix"], show_progress=False)
    assert_one_line_user_error(error, "--strategies asks for strategies that do not apply: "
                                      "pool_mix: backbone 'small_cnn' at 2 px")


def test_files_embed_as_the_same_images_from_the_split(trained, tmp_path):
    """Test images saved as PNG files and embedded from a folder get the embeddings of
    their split records (the eval transform runs on both)."""
    config = ablation.load_workdir_config(trained)
    test = runtime.load_splits(config)["test"]
    for i in range(6):
        folder = tmp_path / "imgs" / test.class_names[test.labels[i]]
        folder.mkdir(parents=True, exist_ok=True)
        test.load_pil(i).save(folder / f"{i}.png")
    files = embed.embed_images(trained, str(tmp_path / "imgs"), str(tmp_path / "f.npz"),
                               show_progress=False)
    split = embed.embed_images(trained, "split:test", str(tmp_path / "s.npz"),
                               show_progress=False)
    order = [int(os.path.basename(p)[:-4]) for p in files.paths]
    np.testing.assert_allclose(files.embeddings, split.embeddings[order], atol=1e-6, rtol=0)


# -------------------------------------------------------------------- unreadable images
def test_a_corrupt_image_is_named_or_skipped(trained, tmp_path):
    good = write_images(tmp_path / "imgs", 5)
    bad = tmp_path / "imgs" / "b" / "bad.png"
    bad.write_bytes(b"this is not a png file")
    output = str(tmp_path / "out.npz")
    with pytest.raises(ValueError) as error:
        embed.embed_images(trained, str(tmp_path / "imgs"), output, show_progress=False)
    assert_one_line_user_error(error, "an unreadable image", str(bad), "--skip_corrupt")
    assert not os.path.exists(output)
    lines = []
    index = embed.embed_images(trained, str(tmp_path / "imgs"), output, skip_corrupt=True,
                               show_progress=False, say=lines.append)
    assert sorted(index.paths.tolist()) == sorted(good) and len(index) == 5
    assert [p for p, _ in index.skipped] == [str(bad)]
    assert "cannot identify image file" in index.skipped[0][1]
    # The failed run's shard (its bad file recorded) is reused by the --skip_corrupt run.
    assert lines[0] == f"resuming: 1 of 1 shards in {output}.parts are done"
    assert len(lines) == 2 and "skipped 1 unreadable image(s)" in lines[1] and str(bad) in lines[1]
    with np.load(output, allow_pickle=False) as z:
        assert z["skipped_paths"].tolist() == [str(bad)]


def test_an_empty_file_fails_before_the_model_loads(trained, tmp_path):
    write_images(tmp_path / "imgs", 3)
    (tmp_path / "imgs" / "a" / "empty.png").write_bytes(b"")
    (tmp_path / "imgs" / "a" / "gone.png").symlink_to(tmp_path / "nothing.png")
    with pytest.raises(ValueError) as error:
        embed.embed_images(trained, str(tmp_path / "imgs"), str(tmp_path / "o.npz"),
                           show_progress=False)
    assert_one_line_user_error(error, "2 of 5 images cannot be read", "empty file (0 bytes)",
                               "dangling symlink")


def test_a_missing_workdir_or_checkpoint_is_one_line(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        embed.embed_images(str(tmp_path / "nowhere"), str(tmp_path), str(tmp_path / "o.npz"))
    assert_one_line_user_error(error, f"--workdir={str(tmp_path / 'nowhere')!r} does not exist")
    with pytest.raises(FileNotFoundError) as error:
        embed.embed_images(str(tmp_path), str(tmp_path), str(tmp_path / "o.npz"))
    assert_one_line_user_error(error, "holds no intact checkpoint")


# ---------------------------------------------------------------------- shards, resume
class _Stop(Exception):
    pass


def _stop_after(n):
    def after_shard(done, total):
        if done == n:
            raise _Stop
    return after_shard


def test_a_stopped_run_resumes_from_its_shards_to_the_same_bytes(trained, tmp_path):
    write_images(tmp_path / "imgs", 30)
    images = str(tmp_path / "imgs")
    reference = str(tmp_path / "reference.npz")
    embed.embed_images(trained, images, reference, shard_size=8, show_progress=False)
    output, lines = str(tmp_path / "out.npz"), []
    with pytest.raises(_Stop):
        embed.embed_images(trained, images, output, shard_size=8, show_progress=False,
                           after_shard=_stop_after(2), say=lines.append)
    assert sorted(os.listdir(output + ".parts")) == ["shard-000000.npz", "shard-000001.npz"]
    assert not os.path.exists(output)
    embed.embed_images(trained, images, output, shard_size=8, show_progress=False,
                       say=lines.append)
    assert lines == [f"resuming: 2 of 4 shards in {output}.parts are done"]
    with open(reference, "rb") as a, open(output, "rb") as b:
        assert a.read() == b.read()
    assert not os.path.exists(output + ".parts")


def test_shards_of_another_job_are_not_reused(trained, tmp_path):
    write_images(tmp_path / "imgs", 20)
    images, output, lines = str(tmp_path / "imgs"), str(tmp_path / "out.npz"), []
    with pytest.raises(_Stop):
        embed.embed_images(trained, images, output, shard_size=8, show_progress=False,
                           after_shard=_stop_after(1))
    index = embed.embed_images(trained, images, output, shard_size=8, normalize=False,
                               show_progress=False, say=lines.append)
    assert lines == [f"{output}.parts holds shards of another embedding job (another "
                     "checkpoint, settings or image list): starting over"]
    assert not index.normalized and not np.allclose(np.linalg.norm(index.embeddings, axis=1), 1)
    with pytest.raises(ValueError) as error:
        embed.embed_images(trained, images, output, shard_size=0)
    assert_one_line_user_error(error, "--shard_size=0 must be a positive number")


def test_use_commands_name_the_run_and_its_test_split(trained):
    text = embed.use_commands(trained)
    output = os.path.join(trained, "embed", "test.npz")
    assert text.splitlines()[1:] == [
        f"  python -m gl_jax.embed --workdir={trained} --images=split:test --output={output}",
        f"  python -m gl_jax.search --index={output} --query=split:test:0 --k=5"]


# ----------------------------------------------------------------------------- slow tier
KILLED = """
import os, signal, sys
from gl_jax import embed
workdir, images, output, stop = sys.argv[1:]
def after_shard(done, total):
    if done == int(stop):
        os.kill(os.getpid(), signal.SIGKILL)   # no clean-up, no flush: as a dead machine
embed.embed_images(workdir, images, output, shard_size=8, show_progress=False,
                   after_shard=after_shard)
"""


def _embed_killed(trained, images, output, stop):
    return subprocess.run([sys.executable, "-c", KILLED, trained, images, output, str(stop)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_sigkill_at_two_points_then_a_rerun_gives_the_uninterrupted_file(trained, tmp_path):
    """60 images in 8 shards of 8: killed after shard 2, then killed after the last shard
    (before the final file), then run to the end: the bytes of a run never stopped."""
    write_images(tmp_path / "imgs", 60, seed=1)
    images, output = str(tmp_path / "imgs"), str(tmp_path / "out.npz")
    reference = str(tmp_path / "reference.npz")
    done = _embed_killed(trained, images, reference, 0)
    assert done.returncode == 0, done.stderr[-3000:]
    first = _embed_killed(trained, images, output, 2)
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    assert len(os.listdir(output + ".parts")) == 2 and not os.path.exists(output)
    second = _embed_killed(trained, images, output, 8)
    assert second.returncode == -signal.SIGKILL, second.stderr[-3000:]
    assert "resuming: 2 of 8 shards" in second.stdout
    assert len(os.listdir(output + ".parts")) == 8 and not os.path.exists(output)
    last = _embed_killed(trained, images, output, 0)
    assert last.returncode == 0, last.stderr[-3000:]
    assert "resuming: 8 of 8 shards" in last.stdout
    with open(reference, "rb") as a, open(output, "rb") as b:
        assert a.read() == b.read()
    with np.load(reference, allow_pickle=False) as a, np.load(output, allow_pickle=False) as b:
        assert a.files == b.files
        for name in a.files:
            np.testing.assert_array_equal(a[name], b[name])
        assert len(b["embeddings"]) == 60


def _command(*args):
    return subprocess.run([sys.executable, "-m", "gl_jax.embed", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600)


def _assert_exit_2_one_line(proc, *expected):
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    for text in expected:
        assert text in lines[0], lines[0]


@pytest.mark.slow
def test_the_command_line(trained, tmp_path):
    write_images(tmp_path / "imgs", 10)
    output = str(tmp_path / "out" / "e.npz")
    done = _command(f"--workdir={trained}", f"--images={tmp_path / 'imgs'}",
                    f"--output={output}", "--checkpoint=latest", "--shard_size=4")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr == ""   # no progress line for a short run into a pipe, no notes
    assert done.stdout.startswith(f"wrote {output}: 10 embeddings (64-d, L2-normalised, "
                                  "3 classes)")
    with np.load(output, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"].item()))
    assert meta["model"]["checkpoint"] == {"requested": "latest",
                                           "path": f"checkpoints/{STEPS}"}

    bad = tmp_path / "imgs" / "c" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    _assert_exit_2_one_line(_command(f"--workdir={trained}", f"--images={tmp_path / 'imgs'}",
                                     f"--output={output}"), str(bad), "an unreadable image")
    skipped = _command(f"--workdir={trained}", f"--images={tmp_path / 'imgs'}",
                       f"--output={output}", "--skip_corrupt")
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    assert "skipped 1 unreadable image(s)" in skipped.stdout and str(bad) in skipped.stdout
    (tmp_path / "none").mkdir()
    _assert_exit_2_one_line(_command(f"--workdir={trained}", f"--images={tmp_path / 'none'}",
                                     f"--output={output}"), "no image files under")
    _assert_exit_2_one_line(_command(f"--workdir={tmp_path / 'gone'}", f"--images={tmp_path}",
                                     f"--output={output}"),
                            f"--workdir={str(tmp_path / 'gone')!r} does not exist.")


@pytest.mark.slow
def test_the_benchmark_script_runs_on_a_trained_workdir(trained):
    done = subprocess.run([sys.executable, "experiments/bench_embed.py", f"--workdir={trained}",
                           "--repeats=1", "--small_shards=256"], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert [row.split("|")[1].strip() for row in rows[1:]] == [
        "trainer's evaluation pass", "gl_jax.embed pass (one shard)",
        "gl_jax.embed pass (shards of 256)", "gl_jax.embed whole call"]
    assert float(rows[1].split("|")[-2]) == 1.0   # the evaluation is its own unit
