"""The pre-training data scan: unreadable files, skip_corrupt, undrawable and padded classes."""
import logging
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from gl_jax import data as gdata
from gl_jax.data.scan import DataCheckError, scan_splits
from gl_jax.data.sources import EncodedSource, FileSource

_RNG = np.random.default_rng(0)
MODES = [False, True]  # full_decode
MODE_IDS = ["header", "full"]


def _write(path, fmt=None, size=(16, 20)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(_RNG.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path, format=fmt)


def _folder(root, sizes):
    """Classes c0, c1, ... with sizes[c] images, JPEG and PNG alternating."""
    for c, n in enumerate(sizes):
        for i in range(n):
            _write(str(root / f"c{c}" / f"{i}.{'png' if i % 2 else 'jpg'}"))
    return gdata.image_folder_source(str(root))


def _sampler(p=2, k=4, mode="official"):
    return ml_collections.ConfigDict(dict(classes_per_batch=p, samples_per_class=k, mode=mode))


def _break(root):
    """Four kinds of unreadable file in class c1; returns {file name: expected reason}."""
    jpeg = root / "c1" / "0.jpg"
    data = jpeg.read_bytes()
    jpeg.write_bytes(data[:len(data) // 2])
    png = root / "c1" / "1.png"
    png.write_bytes(png.read_bytes()[:60])
    (root / "c1" / "text.jpg").write_text("this is not a JPEG\n")
    os.symlink(root / "nowhere.jpg", root / "c1" / "dangling.jpg")
    (root / "c1" / "empty.png").write_bytes(b"")
    # a half JPEG / PNG fails in the header or in the stream: PIL's wording differs.
    return {"0.jpg": "OSError: ", "1.png": "OSError: ",
            "text.jpg": "UnidentifiedImageError: cannot identify image file",
            "dangling.jpg": f"dangling symlink to '{root / 'nowhere.jpg'}'",
            "empty.png": "empty file (0 bytes)"}


def _splits(source):
    return gdata.layouts.split_by_classes(source, range(3), range(3, source.num_classes), 0,
                                          "folder")


@pytest.mark.parametrize("full", MODES, ids=MODE_IDS)
def test_clean_data_passes_and_returns_the_same_splits(tmp_path, full):
    splits = _splits(_folder(tmp_path, [5] * 5))
    report = scan_splits(splits, sampler_config=_sampler(), full_decode=full, progress=False)
    assert report.ok and report.bad == () and report.files_checked == 25
    assert report.mode == ("full" if full else "header")
    assert report.records == {"train": 15, "test": 10}
    assert report.splits["train"] is splits["train"] and report.splits["test"] is splits["test"]


@pytest.mark.parametrize("full", MODES, ids=MODE_IDS)
def test_every_unreadable_file_is_named_with_its_reason_and_the_skip_flag(tmp_path, full):
    source = _folder(tmp_path, [5] * 5)  # c1: 0.jpg 1.png 2.jpg 3.png 4.jpg
    reasons = _break(tmp_path)
    source = gdata.image_folder_source(str(tmp_path))  # lists the new files too
    with pytest.raises(DataCheckError, match=r"5 of 28 images cannot be read") as err:
        scan_splits(_splits(source), full_decode=full, progress=False)
    message = str(err.value)
    assert isinstance(err.value, ValueError)
    for name, reason in reasons.items():
        assert f"{tmp_path / 'c1' / name}: {reason}" in message, name
    assert "--config.data.skip_corrupt=True" in message
    assert "leaves these records out of every split" in message
    assert "2.jpg" not in message and "3.png" not in message


@pytest.mark.parametrize("full", MODES, ids=MODE_IDS)
def test_a_jpeg_cut_inside_its_image_data_is_found_by_either_scan(tmp_path, full):
    # the header is intact, so Image.open and verify() alone would pass this file.
    _write(str(tmp_path / "c0" / "big.jpg"), size=(256, 256))
    data = (tmp_path / "c0" / "big.jpg").read_bytes()
    (tmp_path / "c0" / "big.jpg").write_bytes(data[:int(len(data) * 0.8)])
    with Image.open(tmp_path / "c0" / "big.jpg") as image:
        image.verify()
    source = FileSource("t", [tmp_path / "c0" / "big.jpg"], [0], ["c0"])
    with pytest.raises(DataCheckError, match=r"big\.jpg: OSError: image file is truncated"):
        scan_splits({"test": source}, full_decode=full, progress=False)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
@pytest.mark.parametrize("full", MODES, ids=MODE_IDS)
def test_list_file_entries_that_are_fifos_folders_or_missing_are_named(tmp_path, full):
    # list-file layouts (CUB, SOP, ...) point at paths nobody listed: a FIFO must not be
    # opened (reading it would block forever).
    _write(str(tmp_path / "ok.jpg"))
    os.mkfifo(tmp_path / "pipe.jpg")
    os.makedirs(tmp_path / "folder.jpg")
    paths = [tmp_path / n for n in ("ok.jpg", "pipe.jpg", "folder.jpg", "missing.jpg")]
    source = FileSource("list/train", paths, [0, 0, 1, 1], ["a", "b"])
    with pytest.raises(DataCheckError) as err:
        scan_splits({"train": source}, full_decode=full, progress=False)
    message = str(err.value)
    assert "3 of 4 images cannot be read" in message
    assert f"{tmp_path / 'pipe.jpg'}: not a regular file: a FIFO (named pipe)" in message
    assert f"{tmp_path / 'folder.jpg'}: not a regular file: a folder" in message
    assert f"{tmp_path / 'missing.jpg'}: missing (no such file)" in message


def test_the_list_stops_at_max_listed_and_counts_the_rest(tmp_path):
    for i in range(7):
        (tmp_path / f"{i}.jpg").write_text("text")
    source = FileSource("t", [tmp_path / f"{i}.jpg" for i in range(7)], [0] * 7, ["a"])
    with pytest.raises(DataCheckError, match=r"7 of 7 images") as err:
        scan_splits({"test": source}, progress=False, max_listed=3)
    assert "  ... and 4 more" in str(err.value)
    assert str(err.value).count("cannot identify image file") == 3


def test_skip_corrupt_leaves_the_bad_records_out_keeping_labels(tmp_path, caplog):
    source = _folder(tmp_path, [5] * 5)
    _break(tmp_path)
    source = gdata.image_folder_source(str(tmp_path))
    splits = _splits(source)
    with caplog.at_level(logging.WARNING):
        report = scan_splits(splits, sampler_config=_sampler(2, 3), skip_corrupt=True,
                             progress=False)
    assert "5 of 28 images cannot be read" in caplog.text
    assert "skip_corrupt=True: these records are left out" in caplog.text
    assert not report.ok  # the report still lists what was dropped
    bad = report.bad_indices("train")
    assert len(bad) == 5 and {b.split for b in report.bad} == {"train"}
    train = report.splits["train"]
    assert len(train) == len(splits["train"]) - 5
    assert train.class_names == splits["train"].class_names
    assert np.bincount(train.labels).tolist() == [5, 3, 5]  # c1 keeps 2.jpg, 3.png, 4.jpg
    assert not any(train.describe(i) in {b.name for b in report.bad} for i in range(len(train)))
    assert report.splits["test"] is splits["test"]
    # the sampler on the cleaned split never draws a dropped file, and every record decodes.
    sampler = gdata.make_sampler(train, _sampler(2, 3))
    drawn = np.unique(sampler.batches(0))
    assert all(train[int(i)]["image"].shape == (16, 20, 3) for i in drawn)


def test_skip_corrupt_keeps_the_query_gallery_mapping(tmp_path):
    for name in ("q0", "q1", "g0", "g1", "g2"):
        _write(str(tmp_path / f"{name}.jpg"))
    (tmp_path / "g1.jpg").write_text("not an image")
    query = FileSource("x/query", [tmp_path / "q0.jpg", tmp_path / "q1.jpg"], [0, 2],
                       ["p0", "p1", "p2"])
    gallery = FileSource("x/gallery", [tmp_path / f"g{i}.jpg" for i in range(3)], [0, 1, 2],
                         ["p0", "p1", "p2"], cameras=[1, 2, 3])
    report = scan_splits({"query": query, "gallery": gallery}, skip_corrupt=True,
                         progress=False)
    cleaned = report.splits["gallery"]
    assert cleaned.labels.tolist() == [0, 2] and cleaned.cameras.tolist() == [1, 3]
    assert cleaned.class_names == ["p0", "p1", "p2"] and report.splits["query"] is query


def test_official_class_too_small_to_be_drawn_is_an_error_naming_it_and_the_fix(tmp_path):
    # K = 9: class c2 with 4 images pads to min(8, 11) = 8 < 9 chunks -> never drawn;
    # c3 with 5 pads to 10 -> one chunk, with repeats (a warning, not an error).
    splits = {"train": _folder(tmp_path, [10, 10, 4, 5])}
    sampler = _sampler(2, 9)
    with pytest.raises(DataCheckError) as err:
        scan_splits(splits, sampler_config=sampler, progress=False)
    message = str(err.value)
    assert ("train: 1 of 4 classes can never be drawn by the official sampler with "
            "samples_per_class K=9") in message
    assert "'c2' (4 images)" in message and "'c3'" not in message
    assert "--config.sampler.mode=balanced" in message
    assert "--config.sampler.samples_per_class=8" in message
    # the scan's rule is the sampler's: c2's images never appear in any epoch.
    pk = gdata.make_sampler(splits["train"], sampler)
    c2 = np.flatnonzero(splits["train"].labels == 2)
    assert not any(np.isin(c2, pk.batches(e)).any() for e in range(5))


def test_undrawable_warn_and_padded_classes_are_reported_and_logged(tmp_path, caplog):
    splits = {"train": _folder(tmp_path, [10, 10, 4, 5])}
    with caplog.at_level(logging.WARNING):
        report = scan_splits(splits, sampler_config=_sampler(2, 9), undrawable="warn",
                             progress=False)
    assert [(c.name, c.count, c.chunks) for c in report.undrawable] == [("c2", 4, 0)]
    assert [(c.name, c.count, c.chunks) for c in report.padded] == [("c3", 5, 1)]
    assert not report.ok
    assert "can never be drawn" in caplog.text
    assert ("1 classes have fewer than samples_per_class=9 images and are padded with repeats"
            in caplog.text)


def test_balanced_mode_draws_every_class_with_replacement(tmp_path, caplog):
    splits = {"train": _folder(tmp_path, [10, 10, 4, 5])}
    with caplog.at_level(logging.WARNING):
        report = scan_splits(splits, sampler_config=_sampler(2, 9, "balanced"), progress=False)
    assert report.undrawable == () and [c.name for c in report.padded] == ["c2", "c3"]
    assert "drawn with replacement: 'c2' (4 images), 'c3' (5 images)" in caplog.text


def test_a_class_with_no_readable_image_is_undrawable_even_with_skip_corrupt(tmp_path):
    source = _folder(tmp_path, [4, 4, 2])
    for i in range(2):
        (tmp_path / "c2" / f"{i}.{'png' if i % 2 else 'jpg'}").write_bytes(b"junk")
    with pytest.raises(DataCheckError) as err:
        scan_splits({"train": source}, sampler_config=_sampler(2, 2, "balanced"),
                    skip_corrupt=True, progress=False)
    assert "'c2' (0 images)" in str(err.value)
    assert "A class with 0 readable images can only be removed or repaired" in str(err.value)


def test_unreadable_files_and_undrawable_classes_in_one_error(tmp_path):
    source = _folder(tmp_path, [10, 10, 3])
    (tmp_path / "c0" / "0.jpg").write_text("junk")
    with pytest.raises(DataCheckError) as err:
        scan_splits({"train": source}, sampler_config=_sampler(2, 9), progress=False)
    message = str(err.value)
    assert "1 of 23 images cannot be read" in message and "'c2' (3 images)" in message


def test_fewer_drawable_classes_than_p_is_an_error(tmp_path):
    source = _folder(tmp_path, [10, 3, 3])
    with pytest.raises(DataCheckError, match=r"train: 1 classes can be drawn, fewer than "
                                             r"classes_per_batch=2"):
        scan_splits({"train": source}, sampler_config=_sampler(2, 9), undrawable="warn",
                    progress=False)


def test_array_sources_need_no_file_check():
    splits = gdata.layouts.load_digits_splits()
    report = scan_splits(splits, sampler_config=gdata.default_sampler_config("digits"),
                         full_decode=True, progress=False)
    assert report.ok and report.files_checked == 0 and report.records["train"] > 0


@pytest.mark.parametrize("full", MODES, ids=MODE_IDS)
def test_encoded_records_are_decoded_and_named(tmp_path, full):
    _write(str(tmp_path / "a.png"))
    blobs = [(tmp_path / "a.png").read_bytes(), b"\x89PNG garbage"]
    source = EncodedSource("tfds/train", blobs.__getitem__, [0, 1], ["a", "b"])
    with pytest.raises(DataCheckError, match=r"tfds/train\[1\]: .*cannot identify"):
        scan_splits({"train": source}, full_decode=full, progress=False)


def test_files_shared_by_splits_are_checked_once_and_reported_per_split(tmp_path):
    _write(str(tmp_path / "a.jpg"))
    (tmp_path / "b.jpg").write_text("junk")
    paths = [tmp_path / "a.jpg", tmp_path / "b.jpg"]
    splits = {"query": FileSource("q", paths, [0, 1], ["a", "b"]),
              "gallery": FileSource("g", paths[::-1], [1, 0], ["a", "b"])}
    report = scan_splits(splits, skip_corrupt=True, progress=False)
    assert report.files_checked == 2
    assert [(b.split, b.index) for b in report.bad] == [("query", 1), ("gallery", 0)]


def test_progress_bar_on_stderr(tmp_path, capsys, monkeypatch):
    from gl_jax.data import progress
    monkeypatch.setattr(progress, "FILE_INTERVAL_S", 0.0)   # captured: not a terminal
    scan_splits({"train": _folder(tmp_path, [3, 3])}, full_decode=True, progress=True)
    assert "data scan (full)" in capsys.readouterr().err


def test_bad_arguments_are_errors_naming_them(tmp_path):
    splits = {"train": _folder(tmp_path, [3, 3])}
    with pytest.raises(ValueError, match=r"undrawable='ignore' is not 'error' or 'warn'"):
        scan_splits(splits, undrawable="ignore")
    with pytest.raises(ValueError, match=r"sampled_split='fit' is not one of the splits"):
        scan_splits(splits, sampler_config=_sampler(), sampled_split="fit")
    with pytest.raises(ValueError, match=r"sampler.mode='random' is not one of"):
        scan_splits(splits, sampler_config=_sampler(mode="random"), progress=False)


def test_skip_corrupt_with_nothing_readable_in_a_split_is_still_an_error(tmp_path):
    for i in range(2):
        (tmp_path / f"{i}.jpg").write_text("junk")
    source = FileSource("t/test", [tmp_path / f"{i}.jpg" for i in range(2)], [0, 1], ["a", "b"])
    with pytest.raises(DataCheckError, match=r"test: all 2 records are unreadable"):
        scan_splits({"test": source}, skip_corrupt=True, progress=False)
