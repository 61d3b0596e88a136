"""Tests of `python -m gl_jax.evaluate`, the Group Loss++ strategies (gl_jax.strategies) and
the pictures (gl_jax.visualize), on a digits:quick run trained once for the module."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from configs import digits
from gl_jax import data as gdata
from gl_jax import ablation
from gl_jax import protocol
from gl_jax import runtime
from gl_jax import strategies as glpp
from gl_jax import train
from gl_jax import visualize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_QUERIES, TOP_K, THUMB, TSNE_SIZE = 4, 3, 24, 300


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("digits_run"))
    config = digits.get_config("quick")
    config.logging.progress = False
    train.train_and_evaluate(config, workdir)
    return workdir


@pytest.fixture(scope="module")
def report(trained, tmp_path_factory):
    """Every strategy that applies (one model: no ensemble), pictures included."""
    out = str(tmp_path_factory.mktemp("evaluate"))
    config = ablation.load_workdir_config(trained)
    result = ablation.run(config, [trained], ablation.settings(
        output_dir=out, num_queries=NUM_QUERIES, top_k=TOP_K, thumb=THUMB, tsne_points=150,
        tsne_size=TSNE_SIZE, tsne_iterations=250))
    return result, out


def rows_by_name(result):
    return {r["name"].split(" (")[0].split(":")[0]: r["metrics"] for r in result["rows"]}


def numpy_neighbours(embedding, k):
    """Brute-force k nearest (self excluded) by squared Euclidean distance, in float64;
    ties go to the smaller index (stable sort), as in gl_jax.evaluation."""
    x = embedding.astype(np.float64)
    d = np.sum(x ** 2, 1)[:, None] + np.sum(x ** 2, 1)[None, :] - 2 * x @ x.T
    np.fill_diagonal(d, np.inf)
    return np.argsort(d, axis=1, kind="stable")[:, :k]


# ----------------------------------------------------------------------- the ablation
@pytest.mark.slow
def test_table_has_every_row(report):
    result, out = report
    names = [r["name"] for r in result["rows"]]
    assert names[0] == "plain"
    for prefix in ("pool mix (lambda 0.5)", "leak (0.75)", "partial normalisation (beta 0.004)",
                   "re-ranking (k1 50, k2 20, lambda 0.94)", "flip TTA",
                   "all: pool_mix + leak + beta + rerank + flip"):
        assert prefix in names, (prefix, names)
    assert len(names) == 7
    assert "ensemble" in result["skipped"] and "--workdir" in result["skipped"]["ensemble"]
    markdown = open(os.path.join(out, "ablation.md")).read()
    for name in names:
        assert f"| {name} |" in markdown
    saved = json.load(open(os.path.join(out, "ablation.json")))
    assert [r["name"] for r in saved["rows"]] == names
    assert saved["rows"][0]["metrics"]["recall@1"] == result["rows"][0]["metrics"]["recall@1"]
    assert "/best/" in saved["checkpoints"][0]


@pytest.mark.slow
def test_plain_row_matches_trainer_and_numpy(trained, report):
    result, out = report
    plain = result["rows"][0]["metrics"]
    trainer = json.load(open(os.path.join(trained, "results.json")))["test"]
    # One query's worth of slack: a near-tie may order differently at float32 vs float64.
    one_query = 1.0 / plain["num_queries"] + 1e-12
    for key in ("recall@1", "recall@2", "recall@4", "recall@8"):
        assert plain[key] == pytest.approx(trainer[key], abs=one_query), key
    # float32 normalisation differs in the last bits (the trainer's inside the metric, ours
    # before it): MAP@R sums many small terms
    assert plain["map@r"] == pytest.approx(trainer["map@r"], abs=1e-5)
    # Independent NumPy recall@K on the exported plain embeddings.
    data = np.load(os.path.join(out, "embeddings.npz"))
    labels = data["test_label"]
    hits = labels[numpy_neighbours(data["test_embedding"], 8)] == labels[:, None]
    for k in (1, 2, 4, 8):
        assert plain[f"recall@{k}"] == pytest.approx(np.mean(hits[:, :k].any(1)), abs=one_query)


@pytest.mark.slow
def test_rerank_and_flip_change_the_numbers(report):
    rows = rows_by_name(report[0])
    plain = rows["plain"]
    keys = ("recall@1", "recall@2", "recall@4", "map@r", "r_precision")
    for name in ("re-ranking", "flip TTA", "pool mix", "leak", "all"):
        assert any(abs(rows[name][k] - plain[k]) > 1e-4 for k in keys), (name, rows[name], plain)
    # beta 0.004 on embeddings whose norm is O(1-10) moves distances a little: MAP@R changes,
    # but far less than the strategies that change the features.
    assert rows["partial normalisation"]["map@r"] != plain["map@r"]
    assert abs(rows["partial normalisation"]["map@r"] - plain["map@r"]) < 0.02


@pytest.mark.slow
def test_exported_embeddings(trained, report):
    result, out = report
    data = np.load(os.path.join(out, "embeddings.npz"))
    assert list(data["parts"]) == ["test"] and list(data["workdirs"]) == [trained]
    splits = runtime.load_splits(ablation.load_workdir_config(trained))
    n = len(splits["test"])
    assert data["test_embedding"].shape == (n, 64)
    assert data["test_embedding_all"].shape == (n, 64)
    np.testing.assert_array_equal(data["test_index"], np.arange(n))
    np.testing.assert_array_equal(data["test_label"], splits["test"].labels)
    np.testing.assert_array_equal(data["test_camera"], -np.ones(n))
    np.testing.assert_allclose(np.linalg.norm(data["test_embedding"], axis=1), 1.0, atol=1e-5)
    # 'all' includes beta: rows are longer than 1 (l2 part) by beta * |x|.
    assert np.all(np.linalg.norm(data["test_embedding_all"], axis=1) > 1.0)


# ---------------------------------------------------------------------------- pictures
@pytest.mark.slow
def test_retrieval_png(report):
    result, out = report
    image = Image.open(os.path.join(out, "retrieval.png"))
    image.load()
    assert image.format == "PNG" and image.mode == "RGB"
    tile = THUMB + 2 * visualize.BORDER
    expected = (2 * visualize.MARGIN + (TOP_K + 1) * tile + TOP_K * visualize.GAP
                + visualize.SEPARATOR,
                2 * visualize.MARGIN + NUM_QUERIES * tile + (NUM_QUERIES - 1) * visualize.GAP)
    assert image.size == expected
    info = result["pictures"]["retrieval"]
    data = np.load(os.path.join(out, "embeddings.npz"))
    labels = data["test_label"]
    queries = np.asarray(info["queries"])
    assert len(queries) == NUM_QUERIES
    # The drawn neighbours are the k nearest: their distances are NumPy's k smallest
    # (compared as distances, so that a float32 near-tie may order either way).
    x = data["test_embedding"].astype(np.float64)
    for q, drawn in zip(queries, info["neighbours"]):
        d = np.sum((x - x[q]) ** 2, axis=1)
        d[q] = np.inf
        np.testing.assert_allclose(d[drawn], np.sort(d)[:TOP_K], atol=1e-5)
    pixels = np.asarray(image)
    for i, q in enumerate(queries):
        x, y = visualize.tile_origin(i, 0, THUMB)
        assert tuple(pixels[y + 1, x + 1]) == visualize.QUERY
        for j, neighbour in enumerate(info["neighbours"][i]):
            x, y = visualize.tile_origin(i, j + 1, THUMB)
            want = visualize.CORRECT if labels[neighbour] == labels[q] else visualize.WRONG
            assert tuple(pixels[y + 1, x + 1]) == want, (i, j)
            assert tuple(pixels[y + tile - 2, x + tile - 2]) == want, (i, j)


@pytest.mark.slow
def test_tsne_png(report):
    result, out = report
    image = Image.open(os.path.join(out, "tsne.png"))
    image.load()
    assert image.format == "PNG" and image.mode == "RGB" and image.size == (TSNE_SIZE, TSNE_SIZE)
    assert result["pictures"]["tsne"]["points"] == 150
    colours = {tuple(c) for c in np.asarray(image).reshape(-1, 3)}
    for c in visualize.class_colours(5):   # 5 test digits, each drawn
        assert tuple(int(v) for v in c) in colours


# ---------------------------------------------------------------------------- ensembles
@pytest.mark.slow
def test_ensemble_of_a_model_with_itself_equals_the_model(trained, tmp_path):
    config = ablation.load_workdir_config(trained)
    result = ablation.run(config, [trained, trained], ablation.settings(
        strategies="ensemble", output_dir=str(tmp_path), pictures=False, tsne=False, nmi=True))
    names = [r["name"] for r in result["rows"]]
    assert names == ["plain", "plain (model 2)", "ensemble (2 models)", "all: ensemble"]
    plain, ensemble = result["rows"][0]["metrics"], result["rows"][2]["metrics"]
    n = plain["num_queries"]
    for key in ("recall@1", "recall@2", "recall@4", "recall@8"):
        # float32 rounding of the doubled distances may at most swap one exact tie
        assert abs(ensemble[key] - plain[key]) <= 1.0 / n + 1e-12, key
    assert ensemble["map@r"] == pytest.approx(plain["map@r"], abs=1e-4)
    assert 0.0 < plain["nmi"] <= 1.0
    assert ensemble["nmi"] == pytest.approx(plain["nmi"], abs=1e-3)
    data = np.load(os.path.join(tmp_path, "embeddings.npz"))
    np.testing.assert_array_equal(data["test_embedding_all"],
                                  np.concatenate([data["test_embedding"]] * 2, axis=1))


# ------------------------------------------------------------------------------- re-id
def make_fake_market(root):
    """A Market-1501-shaped folder of digit images: persons 1-5 = digits 0-4 (train, 5 ids
    as the trained classifier), persons 6-10 = digits 5-9 in query (camera 1) and gallery
    (cameras 1 and 2), and distractors (person 0000) in the gallery."""
    source = gdata.digits_source()
    by_digit = {d: np.flatnonzero(source.labels == d) for d in range(10)}
    layout = {"bounding_box_train": [(d + 1, 1, i) for d in range(5) for i in by_digit[d][:6]]}
    layout["query"] = [(d + 1, 1, i) for d in range(5, 10) for i in by_digit[d][:2]]
    layout["bounding_box_test"] = (
        [(d + 1, 1 + j % 2, i) for d in range(5, 10) for j, i in enumerate(by_digit[d][2:8])]
        + [(0, 2, i) for i in by_digit[0][10:14]])
    for folder, records in layout.items():
        os.makedirs(os.path.join(root, folder))
        for n, (person, camera, index) in enumerate(records):
            Image.fromarray(source[int(index)]["image"]).save(
                os.path.join(root, folder, f"{person:04d}_c{camera}s1_{n:06d}_00.png"))


def numpy_reid_rank1(q, q_ids, q_cams, g, g_ids, g_cams, junk):
    """CMC rank-1 from the protocol: drop same id + same camera, junk never matches,
    queries without a match skipped."""
    hits = []
    for i in range(len(q)):
        d = ((g.astype(np.float64) - q[i]) ** 2).sum(1)
        keep = ~((g_ids == q_ids[i]) & (g_cams == q_cams[i]))
        match = (g_ids == q_ids[i]) & ~np.isin(g_ids, junk)
        if not match[keep].any():
            continue
        order = np.argsort(d[keep], kind="stable")
        hits.append(bool(match[keep][order[0]]))
    return float(np.mean(hits))


@pytest.mark.slow
def test_reid_dataset(trained, tmp_path):
    root = str(tmp_path / "market")
    make_fake_market(root)
    config = ablation.load_workdir_config(trained)
    config.data.name, config.data.root = "market1501", root
    out = str(tmp_path / "out")
    result = ablation.run(config, [trained], ablation.settings(
        strategies="beta,rerank", output_dir=out, num_queries=3, top_k=4, thumb=16, tsne=False))
    assert result["kind"] == "reid"
    names = [r["name"] for r in result["rows"]]
    assert names[0] == "plain" and names[-1] == "all: beta + rerank" and len(names) == 4
    assert "re-ranking (k1 20, k2 6, lambda 0.3)" in names   # the re-id defaults
    data = np.load(os.path.join(out, "embeddings.npz"))
    assert list(data["parts"]) == ["query", "gallery"]
    assert data["query_embedding"].shape == (10, 64) and data["gallery_embedding"].shape == (34, 64)
    np.testing.assert_array_equal(data["query_camera"], np.ones(10))
    np.testing.assert_array_equal(np.unique(data["gallery_camera"]), [1, 2])
    # dense labels: person 0000 (the distractors) is label 0, the only junk label
    assert result["junk_labels"] == [0]
    plain = result["rows"][0]["metrics"]
    assert plain["rank@1"] == pytest.approx(numpy_reid_rank1(
        data["query_embedding"], data["query_label"], data["query_camera"],
        data["gallery_embedding"], data["gallery_label"], data["gallery_camera"], [0]), abs=1e-9)
    assert plain["num_queries"] == 10
    assert result["rows"][2]["metrics"] != plain   # re-ranking changes something
    image = Image.open(os.path.join(out, "retrieval.png"))
    assert image.size == visualize.grid_size(3, 4, 16)


def make_fake_inshop(root):
    """An In-Shop-shaped folder: items 0-4 = digits 0-4 (train), items 5-9 = digits 5-9 with
    2 query and 5 gallery images each."""
    source = gdata.digits_source()
    lines = []
    os.makedirs(os.path.join(root, "Eval"))
    os.makedirs(os.path.join(root, "Img", "img"))
    for digit in range(10):
        members = np.flatnonzero(source.labels == digit)
        statuses = ["train"] * 6 if digit < 5 else ["query"] * 2 + ["gallery"] * 5
        for n, (index, status) in enumerate(zip(members, statuses)):
            name = f"img/id_{digit:08d}_{n:02d}.png"
            Image.fromarray(source[int(index)]["image"]).save(os.path.join(root, "Img", name))
            lines.append(f"{name} id_{digit:08d} {status}")
    with open(os.path.join(root, "Eval", "list_eval_partition.txt"), "w") as f:
        f.write(f"{len(lines)}\nimage_name item_id evaluation_status\n" + "\n".join(lines) + "\n")


@pytest.mark.slow
def test_query_gallery_dataset(trained, tmp_path):
    root = str(tmp_path / "inshop")
    make_fake_inshop(root)
    config = ablation.load_workdir_config(trained)
    config.data.name, config.data.root = "inshop", root
    out = str(tmp_path / "out")
    result = ablation.run(config, [trained], ablation.settings(
        strategies="rerank", output_dir=out, num_queries=2, top_k=3, thumb=16, tsne=False))
    assert result["kind"] == "query_gallery"
    assert [r["name"] for r in result["rows"]] == [
        "plain", "re-ranking (k1 6, k2 2, lambda 0.4)", "all: rerank"]   # In-Shop defaults
    data = np.load(os.path.join(out, "embeddings.npz"))
    q, g = data["query_embedding"], data["gallery_embedding"]
    assert q.shape == (10, 64) and g.shape == (25, 64)
    # NumPy recall@K of queries against the gallery (no self to exclude).
    d = ((q[:, None, :].astype(np.float64) - g[None]) ** 2).sum(-1)
    hits = data["gallery_label"][np.argsort(d, axis=1, kind="stable")] == \
        data["query_label"][:, None]
    plain = result["rows"][0]["metrics"]
    one_query = 1.0 / len(q) + 1e-12   # slack for a float32 near-tie
    for k in (1, 2, 4, 8):
        assert plain[f"recall@{k}"] == pytest.approx(np.mean(hits[:, :k].any(1)), abs=one_query)
    np.testing.assert_array_equal(data["gallery_index"], np.arange(25))
    info = result["pictures"]["retrieval"]
    for query, drawn in zip(info["queries"], info["neighbours"]):
        np.testing.assert_allclose(np.sort(d[query][drawn]), np.sort(d[query])[:3], atol=1e-5)


def test_junk_labels_are_looked_up_by_person_id():
    def splits(names):
        return {"query": gdata.ArraySource("q", np.zeros((1, 2, 2, 3), np.uint8), [0],
                                           class_names=names)}
    assert protocol.junk_labels(splits(["-1", "0", "7"]), "reid") == (0, 1)
    # without distractors the dense label 0 is a real person, not junk
    assert protocol.junk_labels(splits(["6", "7"]), "reid") == ()


# ------------------------------------------------------------------------------ bad input
@pytest.mark.slow
def test_workdir_without_checkpoint(tmp_path, trained):
    config = ablation.load_workdir_config(trained)
    with pytest.raises(FileNotFoundError, match="holds no intact checkpoint"):
        ablation.run(config, [str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ablation.run(config, [str(tmp_path / "missing")])


@pytest.mark.slow
def test_different_architectures_in_one_ensemble(trained, tmp_path):
    other = str(tmp_path / "other")
    shutil.copytree(os.path.join(trained, "best"), os.path.join(other, "best"))
    config = ablation.load_workdir_config(trained)
    config.model.name = "resnet18"
    with open(os.path.join(other, "config.json"), "w") as f:
        f.write(config.to_json())
    with pytest.raises(ValueError, match="different architectures.*resnet18"):
        ablation.run(ablation.load_workdir_config(trained), [trained, other])


@pytest.mark.slow
def test_checkpoint_that_does_not_fit_the_config(trained):
    config = ablation.load_workdir_config(trained)
    config.model.embedding_dim = 32   # the checkpoint has no embedding layer
    mesh = runtime.make_mesh(config.mesh)
    with pytest.raises(ValueError, match=r"does not fit the model .*: the model has "
                       r"params/embedding/bias \(32,\), params/embedding/kernel \(64, 32\) "
                       r"that the checkpoint lacks; other shapes: params/classifier/kernel "
                       r"saved \(64, 5\), model \(32, 5\)$"):
        ablation.restore_member(trained, config, 5, mesh)


@pytest.mark.slow
def test_strategies_that_do_not_apply(trained):
    config = ablation.load_workdir_config(trained)
    with pytest.raises(ValueError, match="^--evaluate.strategies asks .* ensemble: needs two"):
        ablation.run(config, [trained], ablation.settings(strategies="ensemble"))
    with pytest.raises(ValueError, match=r"^--evaluate.strategies: unknown strategy \['sharpen"):
        ablation.run(config, [trained], ablation.settings(strategies="rerank,sharpen"))
    # At 2 px the small CNN ends in a 1 x 1 map: max = avg, the mix cannot do anything.
    config.data.image_size = config.data.resize_size = 2
    with pytest.raises(ValueError, match=r"pool_mix: .*\(1, 1, 1, 64\)"):
        ablation.run(config, [trained], ablation.settings(strategies="pool_mix"))


@pytest.mark.slow
def test_command_line(trained, tmp_path):
    """The absl entry point end to end (config from the workdir's config.json)."""
    out = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "-m", "gl_jax.evaluate", f"--workdir={trained}",
         "--evaluate.strategies=flip", "--evaluate.pictures=False", "--evaluate.tsne=False",
         f"--evaluate.output_dir={out}"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr == ""   # no progress line into a pipe, no Orbax notes
    assert "| flip TTA |" in proc.stdout
    saved = json.load(open(out / "ablation.json"))
    assert [r["name"] for r in saved["rows"]] == ["plain", "flip TTA", "all: flip"]
    assert sorted(os.listdir(out)) == ["ablation.json", "ablation.md", "embeddings.npz"]


# ------------------------------------------------------------------ gl_jax.strategies
def test_partial_normalize_golden_and_reference():
    # Hand-computed: |(3, 4)| = 5 -> (0.6, 0.8) + 0.1 * (3, 4) = (0.9, 1.2).
    np.testing.assert_allclose(glpp.partial_normalize([[3.0, 4.0]], 0.1), [[0.9, 1.2]],
                               rtol=1e-6)
    np.testing.assert_array_equal(glpp.partial_normalize([[0.0, 0.0]], 0.5), [[0.0, 0.0]])
    x = np.random.default_rng(0).normal(size=(7, 5)).astype(np.float32) * 3
    reference = x / np.sqrt((x.astype(np.float64) ** 2).sum(1, keepdims=True)) + 0.004 * x
    np.testing.assert_allclose(glpp.partial_normalize(x, 0.004), reference, rtol=1e-6)
    np.testing.assert_allclose(glpp.partial_normalize(x, 0.0), glpp.l2_normalize(x))
    with pytest.raises(ValueError, match="beta"):
        glpp.partial_normalize(x, -1.0)
    with pytest.raises(ValueError, match=r"\(n, d\).*\(5,\)"):
        glpp.partial_normalize(np.ones(5), 0.1)


def test_flip_average_and_concatenate():
    a, b = np.array([[1.0, 2.0]]), np.array([[3.0, -2.0]])
    np.testing.assert_array_equal(glpp.flip_average(a, b), [[2.0, 0.0]])
    with pytest.raises(ValueError, match="differ in shape"):
        glpp.flip_average(a, np.ones((2, 2)))
    rng = np.random.default_rng(1)
    m1, m2 = (glpp.l2_normalize(rng.normal(size=(6, d))) for d in (4, 3))
    joint = glpp.concatenate([m1, m2])

    def sq(x):
        return ((x[:, None, :].astype(np.float64) - x[None, :, :]) ** 2).sum(-1)
    # The ensemble's squared distances are the sum of the members'.
    np.testing.assert_allclose(sq(joint), sq(m1) + sq(m2), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="different numbers of items"):
        glpp.concatenate([m1, m2[:5]])


def test_settings_per_dataset_and_overrides():
    cub = glpp.settings_for("cub200")
    assert (cub.pool_mix, cub.leak, cub.beta, cub.rerank) == (
        0.5, 0.75, 0.004, {"k1": 50, "k2": 20, "lambda_value": 0.94})
    cars, sop, inshop = (glpp.settings_for(n) for n in ("cars196", "sop", "inshop"))
    assert (cars.leak, cars.beta, sop.pool_mix, sop.leak, sop.beta) == (0.0, 0.004, 0.6, 1.0, 5e-4)
    assert (inshop.pool_mix, inshop.beta, inshop.rerank) == (
        0.57, 0.002, {"k1": 6, "k2": 2, "lambda_value": 0.4})
    assert glpp.settings_for("tfds_cub200") == cub
    assert glpp.settings_for("market1501").rerank == {"k1": 20, "k2": 6, "lambda_value": 0.3}
    assert glpp.settings_for("digits") == glpp.FALLBACK
    tuned = glpp.settings_for("sop", beta=0.01, rerank_k1=10, leak=None)
    assert (tuned.beta, tuned.rerank_k1, tuned.leak) == (0.01, 10, 1.0)
    with pytest.raises(ValueError, match="pool_mix must be in"):
        glpp.settings_for("cub200", pool_mix=1.5)
    with pytest.raises(ValueError, match="rerank_lambda"):
        glpp.settings_for("cub200", rerank_lambda=-0.1)
    assert glpp.parse_strategies("auto") is None
    assert glpp.parse_strategies(" rerank, flip ,rerank") == ("rerank", "flip")
    assert glpp.parse_strategies("all") == glpp.STRATEGIES
    assert ablation.clamp_rerank({"k1": 50, "k2": 20, "lambda_value": 0.9}, 12) == {
        "k1": 11, "k2": 12, "lambda_value": 0.9}


# ------------------------------------------------------------------- gl_jax.visualize
def test_retrieval_grid_and_scatter_plot_units():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, size=(10, 6, 3), dtype=np.uint8) for _ in range(6)]
    correct = np.array([[True, False], [False, True]])
    grid = visualize.retrieval_grid(images[:2], [images[2:4], images[4:6]], correct, thumb=20)
    assert grid.size == visualize.grid_size(2, 2, 20)
    px = np.asarray(grid)
    for i in range(2):
        for j in range(2):
            x, y = visualize.tile_origin(i, j + 1, 20)
            assert tuple(px[y, x]) == (visualize.CORRECT if correct[i, j] else visualize.WRONG)
    with pytest.raises(ValueError, match="every query needs 2"):
        visualize.retrieval_grid(images[:2], [images[2:4], images[4:5]], correct)
    plot = visualize.scatter_plot([[0.0, 0.0], [1.0, 2.0], [2.0, 0.5]], [3, 7, 3], size=100)
    assert plot.size == (100, 100)
    colours = visualize.class_colours(2)
    pixels = {tuple(c) for c in np.asarray(plot).reshape(-1, 3)}
    assert {tuple(int(v) for v in c) for c in colours} <= pixels
    with pytest.raises(ValueError, match=r"labels must have shape \(3,\)"):
        visualize.scatter_plot(np.zeros((3, 2)), [1, 2])
