"""grain iterators: composition, determinism, resume through orbax, hosts, workers, eval."""
import os

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from gl_jax import data as gdata
from gl_jax.data.sources import CorruptImageError


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """6 classes x 5 random-size RGB JPEG/PNG images; class 'c2' holds one corrupt file."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for c in range(6):
        os.makedirs(root / f"c{c}")
        for i in range(5):
            h, w = rng.integers(20, 40, size=2)
            image = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
            image.save(root / f"c{c}" / f"{i}.{'png' if i % 2 else 'jpg'}")
    with open(root / "c2" / "9_corrupt.jpg", "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 this is not a JPEG")
    config = gdata.default_config("image_folder")
    config.update(root=str(root), train_classes=6, image_size=16, resize_size=18,
                  normalization="imagenet", read_threads=1)
    return config


def _take(it, n):
    return [next(it) for _ in range(n)]


def _folder_source(config):
    return gdata.image_folder_source(config.root)


def test_digits_train_batches(digits):
    config, sampler_config, splits = digits
    train = splits["train"]
    assert train.num_classes == 4 and len(train) == 720 and len(splits["val"]) == 181
    p, k = sampler_config.classes_per_batch, sampler_config.samples_per_class
    steps = gdata.steps_per_epoch(train, sampler_config)
    it = gdata.make_train_iterator(train, config, sampler_config)
    for step, batch in enumerate(_take(it, steps + 2)):
        assert batch["image"].shape == (p * k, 16, 16, 3) and batch["image"].dtype == np.float32
        assert batch["label"].dtype == np.int32
        assert batch["step"] == step and batch["epoch"] == step // steps
        # the labels are the source's labels of the sampled indices, K consecutive per class.
        np.testing.assert_array_equal(batch["label"], train.labels[batch["index"]])
        runs = batch["label"].reshape(p, k)
        assert (runs == runs[:, :1]).all()
        assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    # the eval transform of digits: 8x8 -> 16x16 bilinear of the stored record.
    first = batch["index"][0]
    want = gdata.eval_transform(train[first]["image"], 16, 16) / np.float32(255)
    np.testing.assert_allclose(batch["image"][0], want, atol=1e-6)
    # the iterator follows the sampler's order exactly, across the epoch boundary.
    sampler = gdata.make_sampler(train, sampler_config, config.seed)
    np.testing.assert_array_equal(batch["index"], sampler.batches(1)[1])


def test_uint8_batches_are_the_normalised_ones_before_normalising(folder):
    """normalize=False keeps the images uint8 (the trainer's batches) and changes nothing
    else; the iterator state is the same, so a checkpoint written by a run that normalised
    on the host resumes a uint8 iterator at the same batch."""
    folder = folder.copy_and_resolve_references()
    folder.skip_corrupt = True   # the corrupt file's eval row is masked in both
    source = _folder_source(folder)
    sampler_config = gdata.default_sampler_config("image_folder")
    sampler_config.update(classes_per_batch=3, samples_per_class=2)
    floats = gdata.make_train_iterator(source, folder, sampler_config)
    raw = gdata.make_train_iterator(source, folder, sampler_config, normalize=False)
    for a, b in zip(_take(floats, 2), _take(raw, 2)):
        assert b["image"].dtype == np.uint8 and b["image"].shape == a["image"].shape
        np.testing.assert_array_equal(gdata.normalize(b["image"], "imagenet"), a["image"])
        np.testing.assert_array_equal(a["index"], b["index"])
    resumed = gdata.make_train_iterator(source, folder, sampler_config, normalize=False)
    resumed.set_state(floats.get_state())
    np.testing.assert_array_equal(next(resumed)["index"], next(floats)["index"])
    evals = zip(gdata.make_eval_iterator(source, folder, 8),
                gdata.make_eval_iterator(source, folder, 8, normalize=False))
    masked = 0
    for a, b in evals:
        assert b["image"].dtype == np.uint8
        np.testing.assert_array_equal(gdata.normalize(b["image"], "imagenet"), a["image"])
        np.testing.assert_array_equal(a["mask"], b["mask"])
        masked += int((~b["mask"]).sum())
    assert masked >= 1


def test_resume_through_orbax_gives_the_next_batch(digits, tmp_path):
    config, sampler_config, splits = digits
    it = gdata.make_train_iterator(splits["train"], config, sampler_config)
    _take(it, 3)
    with ocp.CheckpointManager(tmp_path) as manager:
        manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
    want = _take(it, 2)
    resumed = gdata.make_train_iterator(splits["train"], config, sampler_config)
    with ocp.CheckpointManager(tmp_path) as manager:
        manager.restore(3, args=ocp.args.Composite(
            data=grain.checkpoint.CheckpointRestore(resumed)))
    for a, b in zip(want, _take(resumed, 2)):
        assert a["step"] == b["step"]
        np.testing.assert_array_equal(a["index"], b["index"])
        np.testing.assert_array_equal(a["image"], b["image"])


def test_start_step_and_determinism(digits):
    config, sampler_config, splits = digits
    run = _take(gdata.make_train_iterator(splits["train"], config, sampler_config), 4)
    later = next(gdata.make_train_iterator(splits["train"], config, sampler_config, start_step=3))
    np.testing.assert_array_equal(run[3]["image"], later["image"])
    assert later["step"] == 3
    other = config.copy_and_resolve_references()
    other.seed = 1
    changed = next(gdata.make_train_iterator(splits["train"], other, sampler_config))
    assert not np.array_equal(changed["index"], run[0]["index"])


def test_augmented_global_batch_identical_on_one_and_two_hosts(folder):
    source = _folder_source(folder)  # uses the corrupt class too, hence skip_corrupt
    config = folder.copy_and_resolve_references()
    config.skip_corrupt = True
    sampler_config = gdata.default_sampler_config("image_folder")
    sampler_config.update(classes_per_batch=3, samples_per_class=2)
    one = _take(gdata.make_train_iterator(source, config, sampler_config), 3)
    hosts = [_take(gdata.make_train_iterator(source, config, sampler_config, process_index=i,
                                             process_count=2), 3) for i in range(2)]
    for step in range(3):
        for key in ("image", "label", "index"):
            joined = np.concatenate([hosts[0][step][key], hosts[1][step][key]])
            np.testing.assert_array_equal(joined, one[step][key])
    # augmentation really happens: the same record in two steps gets different crops.
    assert one[0]["image"].shape == (6, 16, 16, 3)
    assert not np.array_equal(one[0]["image"], one[1]["image"])
    with pytest.raises(ValueError, match="not divisible by process_count=4"):
        gdata.make_train_iterator(source, config, sampler_config, process_count=4)


@pytest.mark.slow
def test_worker_processes_keep_composition_and_values(digits):
    config, sampler_config, splits = digits
    in_process = _take(gdata.make_train_iterator(splits["train"], config, sampler_config), 3)
    workers = config.copy_and_resolve_references()
    workers.worker_count = 2
    it = gdata.make_train_iterator(splits["train"], workers, sampler_config)
    try:
        for a, b in zip(in_process, _take(it, 3)):
            np.testing.assert_array_equal(a["index"], b["index"])
            np.testing.assert_array_equal(a["image"], b["image"])
            assert a["step"] == b["step"]
        state = it.get_state()
        want = next(it)
    finally:
        it.close()
    resumed = gdata.make_train_iterator(splits["train"], workers, sampler_config)
    try:
        resumed.set_state(state)
        np.testing.assert_array_equal(next(resumed)["image"], want["image"])
    finally:
        resumed.close()


def test_corrupt_image_error_names_file_and_skip_keeps_class(folder):
    source = _folder_source(folder)
    bad = [i for i, p in enumerate(source.paths) if "corrupt" in p][0]
    with pytest.raises(CorruptImageError, match="9_corrupt.jpg"):
        source[bad]
    # a sampler whose every batch contains the corrupt file's class c2.
    labels_only_c2 = np.flatnonzero(source.labels == source.labels[bad])
    config = folder.copy_and_resolve_references()
    config.augment = False
    sampler_config = gdata.default_sampler_config("image_folder")
    sampler_config.update(classes_per_batch=6, samples_per_class=6)
    it = gdata.make_train_iterator(source, config, sampler_config)
    with pytest.raises(CorruptImageError, match="9_corrupt.jpg"):
        next(it)
    config.skip_corrupt = True
    batch = next(gdata.make_train_iterator(source, config, sampler_config))
    rows = np.flatnonzero(batch["index"] == bad)
    assert len(rows) > 0 and np.isin(batch["index"], labels_only_c2).sum() == 6
    # the corrupt file's row holds the image of the next record of its class.
    replacement = gdata.eval_transform(source[bad + 1 if bad + 1 in labels_only_c2
                                              else labels_only_c2[0]]["image"], 16, 18)
    want = gdata.normalize(replacement, "imagenet")
    np.testing.assert_allclose(batch["image"][rows[0]], want, atol=1e-5)
    assert (batch["label"][rows] == source.labels[bad]).all()


def test_eval_iterator_covers_each_record_once_with_padding(digits):
    config, _, splits = digits
    test = splits["test"]
    batch_size = 100
    assert gdata.eval_steps(test, batch_size) == 9
    hosts = [list(gdata.make_eval_iterator(test, config, batch_size, process_index=i,
                                           process_count=2)) for i in range(2)]
    single = list(gdata.make_eval_iterator(test, config, batch_size))
    assert len(single) == 9
    for b, (h0, h1) in zip(single, zip(*hosts)):
        assert b["image"].shape == (100, 16, 16, 3) and h0["image"].shape == (50, 16, 16, 3)
        for key in ("image", "label", "camera", "index", "mask"):
            np.testing.assert_array_equal(np.concatenate([h0[key], h1[key]]), b[key])
    index = np.concatenate([b["index"] for b in single])
    mask = np.concatenate([b["mask"] for b in single])
    np.testing.assert_array_equal(index[mask], np.arange(len(test)))
    assert (index[~mask] == -1).all() and (~mask).sum() == 900 - len(test)
    label = np.concatenate([b["label"] for b in single])
    np.testing.assert_array_equal(label[mask], test.labels)
    assert (np.concatenate([b["camera"] for b in single]) == -1).all()


def test_eval_skip_corrupt_masks_the_row(folder):
    source = _folder_source(folder)
    config = folder.copy_and_resolve_references()
    bad = [i for i, p in enumerate(source.paths) if "corrupt" in p][0]
    with pytest.raises(CorruptImageError, match="9_corrupt.jpg"):
        list(gdata.make_eval_iterator(source, config, 8))
    config.skip_corrupt = True
    batches = list(gdata.make_eval_iterator(source, config, 8))
    index = np.concatenate([b["index"] for b in batches])
    mask = np.concatenate([b["mask"] for b in batches])
    assert not mask[bad] and index[bad] == bad and mask.sum() == len(source) - 1


def test_fewer_classes_than_p_is_an_error_before_training(digits):
    config, sampler_config, splits = digits
    too_many = sampler_config.copy_and_resolve_references()
    too_many.classes_per_batch = 5
    with pytest.raises(ValueError, match="4 classes, fewer than classes_per_batch=5"):
        gdata.make_train_iterator(splits["train"], config, too_many)


@pytest.mark.parametrize("field,value,message", [
    ("normalization", "bgr", "data.normalization='bgr'"),
    ("interpolation", "lanczos", "data.interpolation='lanczos'"),
    ("image_size", 20, "data.image_size=20"),
    ("crop_scale", (0.5, 0.1), "data.crop_scale"),
    ("crop_ratio", (0.0, 1.0), "data.crop_ratio"),
    ("worker_count", -1, "data.worker_count=-1"),
])
def test_bad_config_values_are_errors_naming_the_field(digits, field, value, message):
    config, sampler_config, splits = digits
    bad = config.copy_and_resolve_references()
    bad[field] = value
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        gdata.make_train_iterator(splits["train"], bad, sampler_config)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        gdata.make_eval_iterator(splits["test"], bad, 10)
