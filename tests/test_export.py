"""Tests of `python -m gl_jax.export`: a digits:quick run's embedding function, exported
once for the module, loaded in a fresh process that has only jax and numpy, against the
embeddings of the evaluator's own path (the one the trainer's metrics use)."""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from gl_jax import ablation
from gl_jax import checkpoints as ckpt
from gl_jax import cli
from gl_jax import data as gdata
from gl_jax import export
from gl_jax import runtime
from gl_jax import train
from gl_jax.data import transforms
from gl_jax.evaluation import exact_knn
from train_helpers import REPO, quick_config

BATCHES = (1, 7, 64)

# Run in a fresh interpreter: a server with jax and numpy, nothing of gl_jax.
SERVE = """
import sys
import jax
import numpy as np

model, images, out = sys.argv[1:]
with open(model, "rb") as f:
    exported = jax.export.deserialize(f.read())
images = np.load(images)
result = {f"b{n}": np.asarray(exported.call(images[:n])) for n in (1, 7, 64)}
try:
    exported.call(np.zeros((2, images.shape[1] + 1, images.shape[2], 3), np.uint8))
    result["wrong_size_refused"] = np.asarray(False)
except ValueError:
    result["wrong_size_refused"] = np.asarray(True)
loaded = sorted(m for m in ("gl_jax", "flax", "orbax", "optax") if m in sys.modules)
assert not loaded, loaded
np.savez(out, **result)
"""


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("digits_run"))
    train.train_and_evaluate(quick_config(), workdir)
    return workdir


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    output = str(tmp_path_factory.mktemp("export") / "model.jaxexport")
    return output, export.export_embedding(trained, output)


@pytest.fixture(scope="module")
def evaluator_embeddings(trained):
    """The first 64 test images as the eval pipeline makes them (uint8) and their
    L2-normalised embeddings through the evaluator's path: restore_member, Embedder and
    embed_source over the run's mesh, then the metrics' normalisation."""
    config = ablation.load_workdir_config(trained)
    mesh = runtime.make_mesh(config.mesh)
    splits = runtime.load_splits(config)
    member = ablation.restore_member(trained, config, splits["train"].num_classes, mesh)
    out = runtime.embed_source([(runtime.Embedder(member.graphdef, mesh), member.params,
                                 member.model_state)], splits["test"], config, mesh)
    batch = next(gdata.make_eval_iterator(splits["test"], config.data, max(BATCHES),
                                          normalize=False))
    assert batch["image"].dtype == np.uint8 and batch["mask"].all()
    np.testing.assert_array_equal(out["index"][:max(BATCHES)], batch["index"])
    embeddings = exact_knn.l2_normalize(out["embeddings"][0]["embedding"][:max(BATCHES)])
    return batch["image"], embeddings, splits["test"]


def _no_repo_env() -> dict:
    """The environment without the repository on the path: what a server would have."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


# ----------------------------------------------------------------------------- fast tier
def test_missing_workdir_is_a_clear_error(tmp_path):
    output = str(tmp_path / "out" / "model.jaxexport")
    with pytest.raises(FileNotFoundError, match="does not exist") as error:
        export.export_embedding(str(tmp_path / "nowhere"), output)
    assert cli.is_user_error(error.value)
    assert "nowhere" in str(error.value) and "\n" not in str(error.value)
    assert not os.path.exists(os.path.dirname(output))   # nothing written for a bad workdir


def test_workdir_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no intact checkpoint") as error:
        export.export_embedding(str(tmp_path), str(tmp_path / "model.jaxexport"))
    assert cli.is_user_error(error.value)


def test_unknown_platform_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="platforms must be some of") as error:
        export.export_embedding(str(tmp_path), str(tmp_path / "m"), platforms=["cpu", "metal"])
    assert cli.is_user_error(error.value)


@pytest.mark.parametrize("name", transforms.NORMALIZATIONS)
def test_normalization_info_describes_the_pipeline(name):
    """The JSON's mean, std and channel order reproduce gl_jax.data.normalize."""
    info = export.normalization_info(name)
    pixels = np.random.default_rng(0).integers(0, 256, (5, 4, 4, 3)).astype(np.uint8)
    x = pixels.astype(np.float64)[..., info["channel_order"]]
    described = (x - np.asarray(info["mean"])) / np.asarray(info["std"])
    np.testing.assert_allclose(described, gdata.normalize(pixels, name), rtol=1e-5, atol=1e-5)
    json.dumps(info)


# ----------------------------------------------------------------------------- slow tier
@pytest.mark.slow
def test_fresh_process_matches_the_evaluator(exported, evaluator_embeddings, tmp_path):
    output, _ = exported
    images, expected, _ = evaluator_embeddings
    np.save(tmp_path / "images.npy", images)
    result = subprocess.run([sys.executable, "-c", SERVE, output, str(tmp_path / "images.npy"),
                             str(tmp_path / "out.npz")], cwd=str(tmp_path), env=_no_repo_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    served = np.load(tmp_path / "out.npz")
    assert bool(served["wrong_size_refused"])
    for n in BATCHES:
        got = served[f"b{n}"]
        assert got.shape == (n, expected.shape[1]) and got.dtype == np.float32
        difference = float(np.max(np.abs(got - expected[:n])))
        print(f"batch {n}: max abs difference to the evaluator {difference:.3g}")
        assert difference <= 1e-5, (n, difference)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_docs_example(exported, evaluator_embeddings, tmp_path):
    """docs/use.md's code block, on two test images saved as PNG files, gives the
    evaluator's embeddings of them: its resize and crop are the eval transform's."""
    output, _ = exported
    _, expected, source = evaluator_embeddings
    with open(os.path.join(REPO, "docs", "use.md")) as f:
        (block,) = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    shutil.copy(output, tmp_path / "model.jaxexport")
    shutil.copy(output + ".json", tmp_path / "model.jaxexport.json")
    for i, name in enumerate(("a.png", "b.png")):
        source.load_pil(i).save(tmp_path / name)
    script = block + "\nnp.save('out.npy', np.asarray(embeddings))\n"
    result = subprocess.run([sys.executable, "-c", script], cwd=str(tmp_path),
                            env=_no_repo_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected[:2], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_metadata(trained, exported, evaluator_embeddings):
    output, info = exported
    with open(output + ".json") as f:
        assert json.load(f) == info
    config = ablation.load_workdir_config(trained)
    size = int(config.data.image_size)
    # embedding_dim 0 in the config: the embedding is the pooled backbone feature.
    dim = evaluator_embeddings[1].shape[1]
    assert info["input"] == {"shape": ["b", size, size, 3], "dtype": "uint8",
                             "layout": "NHWC", "channels": "RGB"}
    assert info["output"] == {"shape": ["b", dim], "dtype": "float32", "l2_normalized": True}
    assert info["embedding_dim"] == dim == 64
    assert info["image_size"] == size
    assert info["resize"]["resize_size"] == int(config.data.resize_size)
    assert info["resize"]["crop_size"] == size
    assert info["resize"]["interpolation"] == config.data.interpolation
    assert info["normalization"] == export.normalization_info(config.data.normalization)
    assert info["backbone"] == config.model.name == "small_cnn"
    _, step = ckpt.find(trained, "best")
    assert info["checkpoint"] == {"requested": "best", "step": step, "path": f"best/{step}"}
    with open(os.path.join(trained, "config.json"), "rb") as f:
        assert info["config_sha256"] == hashlib.sha256(f.read()).hexdigest()
    assert info["platforms"] == list(export.PLATFORMS)
    assert info["file"] == "model.jaxexport"


@pytest.mark.slow
def test_bad_output_is_a_clear_error(trained, tmp_path):
    with pytest.raises(ValueError, match="is a folder") as error:
        export.export_embedding(trained, str(tmp_path))
    assert cli.is_user_error(error.value)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(PermissionError, match="cannot write") as error:
        export.export_embedding(trained, str(tmp_path / "a_file" / "model.jaxexport"))
    assert cli.is_user_error(error.value)
    assert sorted(os.listdir(tmp_path)) == ["a_file"]


@pytest.mark.slow
def test_command_line(trained, tmp_path):
    output = str(tmp_path / "exports" / "latest.jaxexport")
    command = [sys.executable, "-m", "gl_jax.export", f"--workdir={trained}",
               f"--output={output}", "--checkpoint=latest", "--platforms=cpu"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr == ""   # no Orbax notes about read-only checkpoint folders
    assert "wrote" in result.stdout
    with open(output + ".json") as f:
        info = json.load(f)
    directory, step = ckpt.find(trained, "latest")
    assert info["checkpoint"] == {"requested": "latest", "step": step,
                                  "path": f"checkpoints/{step}"}
    assert info["platforms"] == ["cpu"]
    assert os.path.getsize(output) > 0

    missing = str(tmp_path / "missing")
    result = subprocess.run([sys.executable, "-m", "gl_jax.export", f"--workdir={missing}",
                             f"--output={tmp_path / 'm.jaxexport'}"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: --workdir={missing!r} does not exist."
