"""Tests of `gl_jax.Index` and `python -m gl_jax.search`: exact search against a NumPy
brute force written from the definition, one file round trip, the model checks, the
leave-one-out that reproduces the run's Recall@1 (digits:quick; the Omniglot run's printed
commands are tests/test_first_run.py's), and each error as one line."""
import io
import json
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from PIL import Image

import gl_jax
from gl_jax import ablation
from gl_jax import embed
from gl_jax import runtime
from gl_jax import search
from gl_jax.evaluation import clustering
from gl_jax.index import Index
from test_embed import STEPS, assert_one_line_user_error, digits_run, write_images
from train_helpers import REPO, read_results


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return digits_run(tmp_path_factory)


@pytest.fixture(scope="module")
def test_index(trained, tmp_path_factory):
    """The digits run's test split embedded by `gl_jax.embed`: (file, Index)."""
    output = str(tmp_path_factory.mktemp("index") / "test.npz")
    return output, embed.embed_images(trained, "split:test", output, show_progress=False)


def brute_force(queries, gallery, k, exclude=None):
    """From the definition: L2-normalise, all Euclidean distances in float64, a stable
    sort (equal distances keep the smaller row first), the excluded row dropped."""
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    d = np.sqrt(np.maximum(((q[:, None, :] - g[None, :, :]) ** 2).sum(-1), 0.0))
    if exclude is not None:
        d[np.arange(len(q)), exclude] = np.inf
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(d, order, axis=1)


# -------------------------------------------------------------------------- the index
def test_search_equals_a_brute_force_reference():
    rng = np.random.default_rng(0)
    gallery = rng.normal(size=(300, 16)).astype(np.float32)
    queries = rng.normal(size=(37, 16)).astype(np.float32)
    index = Index(gallery, [f"g{i}" for i in range(300)])
    found = index.search(queries, 9, block_size=8)
    order, distances = brute_force(queries.astype(np.float64), gallery.astype(np.float64), 9)
    np.testing.assert_array_equal(found.indices, order)
    np.testing.assert_allclose(found.distances, distances, atol=2e-6)
    assert found.paths[3, 0] == f"g{order[3, 0]}" and found.indices.dtype == np.int32
    assert (np.diff(found.distances, axis=1) >= 0).all()


def test_ties_keep_the_smaller_row_and_exclude_leaves_one_out():
    # Rows 0, 2 and 5 are the same vector (up to scale): equal distances to any query.
    gallery = np.asarray([[1, 0], [0, 1], [2, 0], [-1, 0], [0, -1], [3, 0]], np.float32)
    queries = np.asarray([[1, 0.1], [0, 1]], np.float32)
    index = Index(gallery)
    found = index.search(queries, 4)
    order, _ = brute_force(queries.astype(np.float64), gallery.astype(np.float64), 4)
    assert found.indices[0, :3].tolist() == [0, 2, 5] == order[0, :3].tolist()
    left_out = index.search(queries, 5, exclude=[2, 1])
    order, distances = brute_force(queries.astype(np.float64), gallery.astype(np.float64), 5,
                                   exclude=np.asarray([2, 1]))
    np.testing.assert_array_equal(left_out.indices, order)
    np.testing.assert_allclose(left_out.distances, distances, atol=2e-6)
    with pytest.raises(ValueError) as error:   # 6 entries, one left out: at most 5
        index.search(queries, 6, exclude=[2, 1])
    assert_one_line_user_error(error, "k=6 must be an integer from 1 to 5")


def test_save_and_load_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    model = {"config_sha256": "ab" * 32, "step": 7, "image_size": 32,
             "embedding": {"strategies": []}, "workdir": "/w"}
    index = Index(rng.normal(size=(20, 5)), [f"/data/é{i}.png" for i in range(20)],
                  rng.integers(-1, 3, 20), class_names=["x", "y", "z"], model=model,
                  records=np.arange(20) * 2, skipped=[("/data/bad.png", "empty file")],
                  images="/data")
    path = str(tmp_path / "index.npz")
    index.save(path)
    loaded = gl_jax.Index.load(path)
    assert gl_jax.Index is Index and Index.from_embeddings_file(path).model == model
    for name in ("embeddings", "paths", "labels", "records"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(index, name))
    assert loaded.embeddings.dtype == np.float32
    assert (loaded.class_names, loaded.model, loaded.skipped, loaded.images, loaded.normalized) \
        == (["x", "y", "z"], model, [("/data/bad.png", "empty file")], "/data", False)
    with np.load(path, allow_pickle=False) as z:   # every array loads without pickles
        assert sorted(z.files) == sorted(index.arrays())
    first = open(path, "rb").read()
    loaded.save(path)
    assert open(path, "rb").read() == first    # the same content, the same bytes
    queries = rng.normal(size=(4, 5))
    np.testing.assert_array_equal(loaded.search(queries, 3).indices,
                                  index.search(queries, 3).indices)


def test_bad_files_k_and_queries_are_one_line(tmp_path):
    index = Index(np.eye(4, dtype=np.float32),
                  model={"config_sha256": "a", "step": 1, "image_size": 8, "embedding": {}})
    for k in (0, 5, -1, 2.0):
        with pytest.raises(ValueError) as error:
            index.search(np.eye(4), k)
        assert_one_line_user_error(error, f"k={k!r} must be an integer from 1 to 4")
    with pytest.raises(ValueError) as error:
        index.search(np.ones((2, 3)), 1)
    assert_one_line_user_error(error, "the queries have 3 dimensions and the index 4")
    with pytest.raises(ValueError) as error:
        index.search(np.eye(4), 1, model={"config_sha256": "b", "step": 1, "image_size": 8,
                                          "embedding": {}})
    assert_one_line_user_error(error, "another model than the index's", "config_sha256 'b'")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    (tmp_path / "found.json").write_text('{"queries": []}')
    array = io.BytesIO()
    np.save(array, np.eye(3))
    with zipfile.ZipFile(tmp_path / "bad_member.npz", "w") as z:   # a member cut short
        z.writestr("embeddings.npy", array.getvalue()[:-8])
    np.savez(tmp_path / "other.npz", embeddings=np.eye(2))
    for name, expected in (("missing.npz", "does not exist"),
                           ("junk.npz", "is not a .npz file (not a zip archive)"),
                           ("found.json", "is not a .npz file (not a zip archive)"),
                           ("bad_member.npz", "is not a readable .npz file"),
                           ("other.npz", "not a gl_jax embeddings file")):
        with pytest.raises((ValueError, FileNotFoundError)) as error:
            Index.load(str(tmp_path / name))
        assert_one_line_user_error(error, expected, name)


@pytest.mark.skipif(not clustering.faiss_available(),
                    reason="faiss is not installed (optional: pip install faiss-cpu)")
def test_faiss_gives_the_exact_answer():
    rng = np.random.default_rng(2)
    index = Index(rng.normal(size=(500, 32)))
    queries = rng.normal(size=(50, 32))
    exact = index.search(queries, 10)
    fast = index.search(queries, 10, backend="faiss")
    np.testing.assert_array_equal(fast.indices, exact.indices)
    np.testing.assert_allclose(fast.distances, exact.distances, atol=1e-5)


# ------------------------------------------------------------------- with a trained model
def test_leave_one_out_reproduces_the_runs_recall_at_1(trained, test_index):
    """Every test image queries the index without itself: the share of first neighbours
    of its class is the run's reported Recall@1, exactly."""
    _, index = test_index
    found = index.search(index.embeddings, 1, model=index.model, normalized=True,
                         exclude=np.arange(len(index)))
    recall = float(np.mean(found.labels[:, 0] == index.labels))
    assert recall == read_results(trained)["test"]["recall@1"]


def test_search_images_embeds_queries_with_the_index_model(trained, test_index, tmp_path):
    path, index = test_index
    found = search.search_images(path, ["split:test:4", "split:test:10"], 3)
    assert found.names == [index.paths[4], index.paths[10]]
    assert found.excluded.tolist() == [4, 10]
    expected = index.search(index.embeddings[[4, 10]], 3, normalized=True, exclude=[4, 10])
    np.testing.assert_array_equal(found.neighbours.indices, expected.indices)
    np.testing.assert_array_equal(found.neighbours.distances, expected.distances)
    assert found.classes == [index.class_of(4), index.class_of(10)]
    kept = search.search_images(path, ["split:test:4"], 1, exclude_self=False)
    assert kept.neighbours.indices.tolist() == [[4]] and kept.excluded.tolist() == [-1]
    assert kept.neighbours.distances[0, 0] < 1e-3

    # A file holding the same image: the same query, not in the index (nothing left out).
    config = ablation.load_workdir_config(trained)
    test = runtime.load_splits(config)["test"]
    test.load_pil(4).save(tmp_path / "q.png")
    by_file = search.search_images(path, [str(tmp_path / "q.png")], 3)
    assert by_file.excluded.tolist() == [-1] and by_file.classes == [None]
    assert by_file.neighbours.indices[0, 0] == 4

    text = search.describe(found, path)
    assert text.splitlines()[1] == (f"query {index.paths[4]} (class {index.class_of(4)}, its "
                                    "own entry 4 left out)")
    assert len(text.splitlines()) == 1 + 2 * 4
    result = search.as_json(found, path)
    assert [n["row"] for n in result["queries"][1]["neighbours"]] == \
        found.neighbours.indices[1].tolist()

    image = search.picture(found, thumb=16)
    assert image.width == search.visualize.grid_size(2, 3, 16)[0]
    assert image.height > search.visualize.grid_size(2, 3, 16)[1]


def test_another_model_is_refused(trained, test_index, tmp_path):
    path, index = test_index
    other = tmp_path / "other_run"
    shutil.copytree(trained, other)
    with open(other / "config.json", "a") as f:
        f.write("\n")    # another config digest: another model as far as anyone can tell
    with pytest.raises(ValueError) as error:
        search.search_images(path, ["split:test:0"], 2, workdir=str(other))
    assert_one_line_user_error(error, "was embedded by another model", str(other))
    moved = Index(index.embeddings, index.paths, index.labels, class_names=index.class_names,
                  model=dict(index.model, step=12), normalized=True, images=index.images)
    moved.save(str(tmp_path / "moved.npz"))
    with pytest.raises(ValueError) as error:
        search.search_images(str(tmp_path / "moved.npz"), ["split:test:0"], 2)
    assert_one_line_user_error(error, "was embedded by step 12", f"is now step {STEPS}")
    gone = Index(index.embeddings, model=dict(index.model, workdir=str(tmp_path / "gone")))
    gone.save(str(tmp_path / "gone.npz"))
    with pytest.raises(FileNotFoundError) as error:
        search.search_images(str(tmp_path / "gone.npz"), ["split:test:0"], 2)
    assert_one_line_user_error(error, "does not exist", "--workdir=... names a copy elsewhere")


def test_unreadable_queries_and_k_are_one_line(trained, test_index, tmp_path):
    path, index = test_index
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "broken.png").write_bytes(b"GIF89a broken")
    cases = [(["split:test:0"], 0, "k=0 must be an integer from 1 to 896"),
             (["split:test:0"], 896, "k=896 must be an integer from 1 to 895"),
             ([str(tmp_path / "empty.png")], 2, "empty file (0 bytes)"),
             ([str(tmp_path / "broken.png")], 2, "broken.png: "),
             ([str(tmp_path / "nope.png")], 2, "--query="),
             (["split:val"], 2, "has the splits test, train")]
    for queries, k, expected in cases:
        with pytest.raises((ValueError, FileNotFoundError)) as error:
            search.search_images(path, queries, k)
        assert_one_line_user_error(error, expected)


# ----------------------------------------------------------------------------- slow tier
def _search_command(*args):
    return subprocess.run([sys.executable, "-m", "gl_jax.search", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_the_command_line(trained, test_index, tmp_path):
    path, index = test_index
    write_images(tmp_path / "q", 2)
    queries = sorted(str(p) for p in (tmp_path / "q").rglob("*.png"))
    grid = tmp_path / "new" / "folder" / "grid.png"   # folders that do not exist yet
    done = _search_command(f"--index={path}", f"--query={queries[0]}", "--query=split:test:9",
                           "--k=4", f"--picture={grid}", f"--output={tmp_path / 'found.json'}")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith(
        f"index {path}: 896 embeddings of split:test (small_cnn, step {STEPS}")
    assert lines[1] == f"query {queries[0]}" and lines[6].startswith(f"query {index.paths[9]}")
    assert lines[-1] == f"wrote {grid}"
    with open(tmp_path / "found.json") as f:
        found = json.load(f)
    assert [q["excluded_row"] for q in found["queries"]] == [-1, 9]
    assert Image.open(grid).size[0] == search.visualize.grid_size(2, 4, 64)[0]

    def one_line(proc, *expected):
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        for text in expected:
            assert text in proc.stderr

    one_line(_search_command(f"--index={path}", "--query=split:test:0", "--k=0"),
             "error: k=0 must be an integer from 1 to 896")
    one_line(_search_command(f"--index={tmp_path / 'none.npz'}", "--query=split:test:0"),
             "error: --index:", "none.npz", "does not exist")
    one_line(_search_command(f"--index={path}", "--query=split:test:0", f"--picture={tmp_path}"),
             f"error: --picture='{tmp_path}' is a folder: give a file name")
    one_line(_search_command(f"--index={path}", "--query=split:test:0",
                             f"--output={tmp_path / 'found.json' / 'x.json'}"),
             "error: --output=", "cannot write to")
    other = tmp_path / "other_run"
    shutil.copytree(trained, other)
    with open(other / "config.json", "a") as f:
        f.write(" ")
    one_line(_search_command(f"--index={path}", "--query=split:test:0", f"--workdir={other}"),
             "was embedded by another model")
