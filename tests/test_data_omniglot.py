"""The embedded Omniglot dataset: packaged files, alphabet-disjoint splits, decoding."""
import io
import os
import zipfile

import ml_collections
import numpy as np
import pytest

from gl_jax import data
from gl_jax.data import omniglot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def splits():
    return omniglot.load_omniglot_splits()


def test_packaged_files_are_found():
    files = omniglot.packaged_files()
    assert sorted(files) == sorted([*omniglot.ZIPS, "LICENSE"])
    assert b"MIT License" in files["LICENSE"].read_bytes()
    for name in omniglot.ZIPS:
        with zipfile.ZipFile(io.BytesIO(files[name].read_bytes())) as z:
            assert z.testzip() is None


def test_pyproject_ships_the_zips_and_licence_only():
    text = open(os.path.join(REPO, "pyproject.toml")).read()
    assert '"gl_jax.data" = ["assets/omniglot/*.zip", "assets/omniglot/LICENSE"]' in text
    folder = os.path.join(REPO, "gl_jax", "data", "assets", "omniglot")
    assert sorted(os.listdir(folder)) == sorted([*omniglot.ZIPS, "LICENSE"])


def test_splits_are_alphabet_disjoint_with_the_documented_sizes(splits):
    train, test = splits["train"], splits["test"]
    assert set(splits) == {"train", "test"}
    assert (train.num_classes, len(train)) == (136, 2720)
    assert (test.num_classes, len(test)) == (106, 2120)
    assert omniglot.alphabets(train) == ["Balinese", "Early_Aramaic", "Greek", "Korean", "Latin"]
    assert omniglot.alphabets(test) == sorted(omniglot.TEST_ALPHABETS)
    for source in (train, test):
        assert np.array_equal(np.bincount(source.labels), np.full(source.num_classes, 20))
        assert all(name.count("/") == 1 and name.split("/")[1].startswith("character")
                   for name in source.class_names)
    assert test.class_names[0] == "Japanese_(katakana)/character01"
    # A record's zip member belongs to its class.
    i = 1234
    assert f"/{test.class_names[test.labels[i]]}/" in test.describe(i)


def test_decoded_image_is_rgb_uint8_105(splits):
    record = splits["test"][0]
    image = record["image"]
    assert image.shape == (105, 105, 3) and image.dtype == np.uint8
    assert set(np.unique(image)) <= {0, 255} and image.min() == 0 and image.max() == 255
    assert record["label"] == 0 and record["camera"] == -1


def test_val_carves_the_last_characters_latin_first():
    parts = omniglot.load_omniglot_splits(val_classes=26)
    assert omniglot.alphabets(parts["val"]) == ["Latin"]
    assert "Latin" not in omniglot.alphabets(parts["train"])
    assert (parts["train"].num_classes, parts["val"].num_classes) == (110, 26)
    assert len(parts["train"]) + len(parts["val"]) == 2720
    assert parts["test"].num_classes == 106
    cut = omniglot.load_omniglot_splits(val_classes=5)
    assert cut["val"].class_names == [f"Latin/character{n}" for n in range(22, 27)]
    assert not set(cut["val"].class_names) & set(cut["train"].class_names)
    with pytest.raises(ValueError, match="val_classes"):
        omniglot.load_omniglot_splits(val_classes=136)


def test_drawers_limit_training_only():
    parts = omniglot.load_omniglot_splits(drawers=5)
    assert len(parts["train"]) == 136 * 5 and len(parts["test"]) == 2120
    assert parts["train"].describe(0).endswith("_01.png")
    assert parts["train"].describe(4).endswith("_05.png")
    with pytest.raises(ValueError, match="drawers"):
        omniglot.load_omniglot_splits(drawers=21)


def test_root_folder_of_zips(tmp_path):
    for name, f in omniglot.packaged_files().items():
        (tmp_path / name).write_bytes(f.read_bytes())
    parts = omniglot.load_omniglot_splits(str(tmp_path))
    assert parts["test"].num_classes == 106
    with pytest.raises(FileNotFoundError, match="images_background_small1.zip"):
        omniglot.load_omniglot_splits(str(tmp_path / "nowhere"))


def test_load_splits_dispatch_and_pipeline(splits):
    config = data.default_config("omniglot")
    config.image_size = config.resize_size = 32
    config.augment = False
    config.normalization = "unit"
    config.val_classes = 26
    parts = data.load_splits(config)
    assert set(parts) == {"train", "val", "test"}
    sampler = ml_collections.ConfigDict({"classes_per_batch": 4, "samples_per_class": 2,
                                         "mode": "official"})
    batch = next(data.make_train_iterator(parts["train"], config, sampler))
    assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
    _, counts = np.unique(batch["label"], return_counts=True)
    assert np.all(counts % 2 == 0)   # K = 2 per drawn class (the official sampler may
                                     # draw a class twice)


@pytest.mark.parametrize("arg", [None, "quick"])
def test_config_loads(arg):
    from configs import omniglot as omniglot_config
    from gl_jax import models
    from gl_jax.losses import registry
    assert "python -m gl_jax.main --config=configs/omniglot.py" in omniglot_config.__doc__
    config = omniglot_config.get_config(arg)
    assert config.data.name == "omniglot" and config.data.root == ""
    assert config.model.name in models.available_models()
    registry.hparams_from_config(config.loss)
    assert len(config.schedule.lr_drop_epochs) == len(config.schedule.lr_drop_factors)
    # The test characters never select the model: no evaluation inside the loop.
    assert config.evals.every_epochs > config.schedule.epochs
    if arg == "quick":
        assert config.schedule.steps_per_epoch > 0
    with pytest.raises(ValueError, match="quick"):
        omniglot_config.get_config("fast")
