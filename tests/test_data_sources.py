"""Dataset layouts written by the tests, decoding, transforms and normalisation."""
import os
import shutil
import zipfile

import ml_collections
import numpy as np
import pytest
from PIL import Image

from gl_jax import data as gdata
from gl_jax.data import layouts
from gl_jax.data.sources import CorruptImageError, decode_image, read_image_file, to_rgb
from gl_jax.data.transforms import random_resized_crop_box

_RNG = np.random.default_rng(0)


def _image(path, size=(12, 10), mode="RGB", fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    array = _RNG.integers(0, 255, (size[0], size[1], 3), dtype=np.uint8)
    Image.fromarray(array).convert(mode).save(path, format=fmt)


def _config(name, root="", **kw):
    config = gdata.default_config(name)
    config.root = str(root)
    config.update(kw)
    return config


# ------------------------------------------------------------------ decoding

def test_decode_grey_palette_rgba_become_rgb(tmp_path):
    for mode in ("L", "P", "RGBA", "RGB"):
        path = tmp_path / f"x_{mode}.png"
        _image(str(path), mode=mode)
        image = read_image_file(str(path))
        assert image.shape == (12, 10, 3) and image.dtype == np.uint8
    grey = read_image_file(str(tmp_path / "x_L.png"))
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()


def _mode_image(mode, values):
    """A 1-row image of `mode` holding `values` (one per pixel)."""
    if mode in ("I;16", "I", "F"):
        dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
        image = Image.fromarray(np.asarray([values], dtype=dtype))
        assert image.mode == mode
        return image
    image = Image.new(mode, (len(values), 1))
    image.putdata(values)
    return image


# mode, file format (None: converted in memory), pixel values, expected RGB per pixel.
_MODE_CASES = [
    ("L", "PNG", [0, 77, 255], [(0, 0, 0), (77, 77, 77), (255, 255, 255)]),
    ("1", "PNG", [0, 255], [(0, 0, 0), (255, 255, 255)]),
    ("LA", "PNG", [(77, 0), (200, 255)], [(77, 77, 77), (200, 200, 200)]),
    ("RGBA", "PNG", [(10, 20, 30, 0), (40, 50, 60, 255)], [(10, 20, 30), (40, 50, 60)]),
    ("CMYK", "TIFF", [(0, 0, 0, 0), (255, 0, 0, 0), (0, 0, 0, 255)],
     [(255, 255, 255), (0, 255, 255), (0, 0, 0)]),
    # 16-bit: v >> 8, not clipped at 255 (PIL's convert('RGB') makes all but 0 white).
    ("I;16", "PNG", [0, 255, 256, 4000, 65535], [(0,) * 3, (0,) * 3, (1,) * 3, (15,) * 3,
                                                  (255,) * 3]),
    # 'I' of unknown origin holding 16-bit values: 16 bits; negative values are 0.
    ("I", None, [-5, 256, 65535], [(0,) * 3, (1,) * 3, (255,) * 3]),
    ("I", None, [1 << 24, (1 << 31) - 1], [(1,) * 3, (127,) * 3]),  # beyond 16 bits: 32
    ("F", "TIFF", [0.0, 0.25, 1.0], [(0,) * 3, (64,) * 3, (255,) * 3]),  # [0, 1] scale
    ("F", "TIFF", [0.0, 100.0, 300.0], [(0,) * 3, (100,) * 3, (255,) * 3]),  # [0, 255] scale
]


@pytest.mark.parametrize("mode,fmt,values,want", _MODE_CASES,
                         ids=[f"{c[0]}-{c[1]}-{i}" for i, c in enumerate(_MODE_CASES)])
def test_every_mode_becomes_uint8_rgb_with_its_values(tmp_path, mode, fmt, values, want):
    image = _mode_image(mode, values)
    if fmt is None:
        rgb = np.asarray(to_rgb(image))
    else:
        path = tmp_path / f"x.{fmt.lower()}"
        image.save(path, format=fmt)
        with Image.open(path) as reread:
            assert reread.mode == mode  # the file really holds this mode
        rgb = read_image_file(str(path))
    assert rgb.dtype == np.uint8 and rgb.shape == (1, len(values), 3)
    assert [tuple(int(v) for v in px) for px in rgb[0]] == want


def test_palette_with_transparency_and_16_bit_png_read_from_disk(tmp_path):
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putdata([0, 1])
    palette.save(tmp_path / "p.png", transparency=0)
    assert read_image_file(str(tmp_path / "p.png"))[0].tolist() == [[255, 0, 0], [0, 0, 255]]
    # a 12-bit-in-16 PNG keeps its relative brightness: 4095 >> 8 = 15, not white.
    _mode_image("I;16", [4095, 2048]).save(tmp_path / "g.png")
    assert read_image_file(str(tmp_path / "g.png"))[0, :, 0].tolist() == [15, 8]


def test_unknown_mode_is_an_error_naming_file_and_mode():
    with pytest.raises(ValueError, match=r"scan\.tif: image mode 'LAB' has no conversion"):
        to_rgb(Image.new("LAB", (1, 1)), "scan.tif")


def test_truncated_jpeg_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "t.jpg"
    _image(str(path), size=(64, 64))
    data = path.read_bytes()
    with pytest.raises(CorruptImageError, match="t.jpg"):
        decode_image(data[: len(data) // 2], str(path))
    with pytest.raises(CorruptImageError, match="garbage.png") as err:
        decode_image(b"not an image", "garbage.png")
    assert "--config.data.skip_corrupt=True" in str(err.value)
    assert "scan_splits lists every such file" in str(err.value)
    with pytest.raises(FileNotFoundError):
        read_image_file(str(tmp_path / "missing.jpg"))


# ------------------------------------------------------------------ image folder

def _write_folder(root):
    """Nested classes (Omniglot-like), PNG and JPEG, a `._` file and a non-image."""
    for alphabet in ("Greek", "Latin"):
        for char in ("character01", "character02"):
            for i in range(3):
                _image(os.path.join(root, alphabet, char, f"{i}.{'png' if i else 'jpg'}"))
    (root / "Greek" / "character01" / "._0.jpg").write_bytes(b"\x00resource fork")
    (root / "Greek" / "character01" / "notes.txt").write_text("not an image")


def test_image_folder_nested_classes_sorted_and_split(tmp_path):
    _write_folder(tmp_path)
    source = gdata.image_folder_source(str(tmp_path))
    assert source.class_names == ["Greek/character01", "Greek/character02", "Latin/character01",
                                  "Latin/character02"]
    assert len(source) == 12 and np.bincount(source.labels).tolist() == [3, 3, 3, 3]
    assert not any(os.path.basename(p).startswith("._") or p.endswith(".txt")
                   for p in source.paths)
    record = source[4]
    assert record["label"] == 1 and record["camera"] == -1 and record["index"] == 4
    assert record["image"].shape == (12, 10, 3)
    splits = gdata.load_splits(_config("image_folder", tmp_path))
    assert set(splits) == {"train", "test"}
    assert splits["train"].class_names == ["Greek/character01", "Greek/character02"]
    assert splits["test"].class_names == ["Latin/character01", "Latin/character02"]
    assert splits["test"].labels.tolist() == [0] * 3 + [1] * 3
    # 'val' is carved from the training classes, class-disjoint.
    splits = gdata.load_splits(_config("image_folder", tmp_path, val_classes=1))
    assert splits["train"].class_names == ["Greek/character01"]
    assert splits["val"].class_names == ["Greek/character02"]
    np.testing.assert_array_equal(splits["val"][0]["image"], source[3]["image"])


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        gdata.load_splits(_config("image_folder", tmp_path / "nowhere"))
    _write_folder(tmp_path)
    os.makedirs(tmp_path / "Latin" / "character03")
    (tmp_path / "Latin" / "character03" / "._x.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="character03"):
        gdata.image_folder_source(str(tmp_path))
    with pytest.raises(ValueError, match="root must be set"):
        gdata.load_splits(_config("image_folder"))
    with pytest.raises(ValueError, match="is not one of"):
        gdata.load_splits(_config("mnist"))


def test_image_folder_refuses_a_symlink_loop_naming_it(tmp_path):
    _write_folder(tmp_path)
    loop = tmp_path / "Greek" / "character01" / "loop"
    os.symlink("..", loop)  # Greek/character01/loop -> Greek: followed, the tree never ends
    with pytest.raises(ValueError, match=r"1 path\(s\) under .* are neither image files") as err:
        gdata.image_folder_source(str(tmp_path))
    assert f"{loop}: symlink loop (resolves to its ancestor folder" in str(err.value)
    os.remove(loop)
    os.symlink("itself.jpg", tmp_path / "Greek" / "character01" / "itself.jpg")
    with pytest.raises(ValueError, match=r"itself\.jpg: symlink loop \(the link resolves to"):
        gdata.image_folder_source(str(tmp_path))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_image_folder_refuses_a_fifo_named_like_an_image(tmp_path):
    _write_folder(tmp_path)
    os.mkfifo(tmp_path / "Latin" / "character02" / "pipe.jpg")
    os.mkfifo(tmp_path / "Latin" / "character02" / "pipe.log")  # not image-named: ignored
    with pytest.raises(ValueError, match=r"character02/pipe\.jpg: not a regular file: a FIFO"):
        gdata.image_folder_source(str(tmp_path))


def test_image_folder_follows_links_to_files_and_outside_folders(tmp_path):
    store = tmp_path / "store"
    _image(str(store / "a.jpg"))
    _image(str(store / "kept" / "b.png"))
    root = tmp_path / "root"
    os.makedirs(root / "c0")
    os.symlink(store / "a.jpg", root / "c0" / "link.jpg")
    os.symlink(store / "kept", root / "c1")  # a class folder that is a link
    os.symlink(store / "gone.jpg", root / "c0" / "dangling.jpg")  # left to the scan
    source = gdata.image_folder_source(str(root))
    assert source.class_names == ["c0", "c1"]
    assert [os.path.basename(p) for p in source.paths] == ["dangling.jpg", "link.jpg", "b.png"]
    assert source[1]["image"].shape == (12, 10, 3) and source[2]["label"] == 1


def test_cars196_folder_split_98_98(tmp_path):
    for c in range(196):
        _image(str(tmp_path / "images" / f"{c + 1:03d}" / "0.png"), size=(4, 4))
    splits = gdata.load_splits(_config("cars196", tmp_path, val_classes=8))
    assert (splits["train"].num_classes, splits["val"].num_classes,
            splits["test"].num_classes) == (90, 8, 98)
    assert splits["test"].class_names[0] == "099" and splits["val"].class_names[0] == "091"
    (tmp_path / "empty").mkdir()
    for name, expected in (("cars196", r"no class folder with images under .*empty' "
                                       r"\(expected images/<class>/\)"),
                           ("cub200", r"no class folder with images under .*empty' \(expected "
                                      r"images.txt and image_class_labels.txt, or "
                                      r"images/<class>/\)")):
        with pytest.raises(ValueError, match=expected):
            gdata.load_splits(_config(name, tmp_path / "empty"))
    for c in range(49, 196):   # 49 classes left: the 98 / 98 split is the dataset's own
        shutil.rmtree(tmp_path / "images" / f"{c + 1:03d}")
    with pytest.raises(ValueError, match="cars196 trains on its first 98 classes and tests "
                                         "on the others, but .*images has 49 class folders"):
        gdata.load_splits(_config("cars196", tmp_path))
    with pytest.raises(ValueError, match=r"config.data.train_classes = 60 must be in \(0, 49\) "
                                         "for the 49 classes under"):
        gdata.load_splits(_config("image_folder", tmp_path / "images", train_classes=60))


# ------------------------------------------------------------------ CUB

def test_cub_list_files(tmp_path):
    rows, labels = [], []
    for image_id, (class_id, name) in enumerate([(1, "001.A"), (1, "001.A"), (2, "002.B"),
                                                 (101, "101.C"), (200, "200.D")], start=1):
        rel = f"{name}/img_{image_id}.jpg"
        _image(str(tmp_path / "images" / rel))
        rows.append(f"{image_id} {rel}")
        labels.append(f"{image_id} {class_id}")
    (tmp_path / "images.txt").write_text("\n".join(rows) + "\n")
    (tmp_path / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    splits = gdata.load_splits(_config("cub200", tmp_path))
    assert splits["train"].class_names == ["001.A", "002.B"]
    assert splits["train"].labels.tolist() == [0, 0, 1]
    assert splits["test"].class_names == ["101.C", "200.D"]
    assert splits["test"][1]["image"].shape == (12, 10, 3)
    (tmp_path / "image_class_labels.txt").write_text("1 1\n2 one\n")
    with pytest.raises(ValueError, match=r"image_class_labels.txt:2: expected an integer"):
        gdata.load_splits(_config("cub200", tmp_path))
    os.remove(tmp_path / "image_class_labels.txt")
    with pytest.raises(FileNotFoundError, match="image_class_labels.txt"):
        gdata.load_splits(_config("cub200", tmp_path))


# ------------------------------------------------------------------ SOP

def test_sop_list_files(tmp_path):
    lines = {"Ebay_train.txt": [(1, 1, "bicycle_final/1_0.JPG"), (2, 1, "bicycle_final/1_1.JPG"),
                                (3, 3, "chair_final/3_0.JPG"), (4, 3, "chair_final/3_1.JPG")],
             "Ebay_test.txt": [(5, 7, "sofa_final/7_0.JPG"), (6, 9, "sofa_final/9_0.JPG")]}
    for file_name, rows in lines.items():
        text = "image_id class_id super_class_id path\n"
        for image_id, class_id, rel in rows:
            _image(str(tmp_path / rel), fmt="JPEG")
            text += f"{image_id} {class_id} 1 {rel}\n"
        (tmp_path / file_name).write_text(text)
    splits = gdata.load_splits(_config("sop", tmp_path, val_classes=1))
    assert set(splits) == {"train", "val", "test"}
    assert splits["train"].class_names == ["1"] and splits["val"].class_names == ["3"]
    assert splits["test"].labels.tolist() == [0, 1] and splits["test"].class_names == ["7", "9"]
    assert splits["val"][1]["image"].shape == (12, 10, 3)
    headless = (tmp_path / "Ebay_test.txt").read_text().split("\n", 1)[1]
    (tmp_path / "Ebay_test.txt").write_text(headless)   # its first image is not a header
    with pytest.raises(ValueError, match=r"Ebay_test.txt:1: expected the header line starting "
                                         r"'image_id', got '5 7 1 sofa_final/7_0.JPG'"):
        gdata.load_splits(_config("sop", tmp_path))
    (tmp_path / "Ebay_test.txt").write_text("image_id class_id super_class_id path\n" + headless)
    with open(tmp_path / "Ebay_test.txt", "a") as f:
        f.write("7 9 1\n")
    with pytest.raises(ValueError, match=r"Ebay_test.txt:4: expected 4 columns"):
        gdata.load_splits(_config("sop", tmp_path))
    os.remove(tmp_path / "Ebay_train.txt")
    with pytest.raises(FileNotFoundError, match="Ebay_train.txt"):
        gdata.load_splits(_config("sop", tmp_path))


# ------------------------------------------------------------------ In-Shop

def test_inshop_partition(tmp_path):
    entries = [("img/WOMEN/a/id_00000001/01_1_front.jpg", "id_00000001", "train"),
               ("img/WOMEN/a/id_00000001/01_2_side.jpg", "id_00000001", "train"),
               ("img/MEN/b/id_00000004/01_1_front.jpg", "id_00000004", "train"),
               ("img/MEN/c/id_00000007/01_1_front.jpg", "id_00000007", "query"),
               ("img/MEN/c/id_00000007/01_2_side.jpg", "id_00000007", "gallery"),
               ("img/MEN/c/id_00000009/01_1_front.jpg", "id_00000009", "gallery"),
               ("img/MEN/c/id_00000009/01_2_side.jpg", "id_00000009", "query")]
    text = f"{len(entries)}\nimage_name item_id evaluation_status\n"
    for rel, item, status in entries:
        _image(str(tmp_path / "Img" / rel))
        text += f"{rel}   {item}   {status}\n"
    os.makedirs(tmp_path / "Eval")
    (tmp_path / "Eval" / "list_eval_partition.txt").write_text(text)
    splits = gdata.load_splits(_config("inshop", tmp_path))
    assert set(splits) == {"train", "query", "gallery"}
    assert splits["train"].labels.tolist() == [0, 0, 1]
    # query and gallery share one mapping: equal labels = the same item.
    assert splits["query"].labels.tolist() == [0, 1]
    assert splits["gallery"].labels.tolist() == [0, 1]
    assert splits["query"].class_names == splits["gallery"].class_names
    assert splits["gallery"][1]["image"].shape == (12, 10, 3)
    for cut, line, got in ((1, 1, "image_name item_id"), (2, 1, "img/WOMEN")):
        (tmp_path / "Eval" / "list_eval_partition.txt").write_text(
            "".join(text.splitlines(keepends=True)[cut:]))   # header lines lost
        with pytest.raises(ValueError, match=rf"list_eval_partition.txt:{line}: expected the "
                                             rf"header line starting .*, got '{got}"):
            gdata.load_splits(_config("inshop", tmp_path))
    (tmp_path / "Eval" / "list_eval_partition.txt").write_text(
        text + "img/x.jpg id_1 validation\n")
    with pytest.raises(ValueError, match=r"list_eval_partition.txt:10: .*'validation'"):
        gdata.load_splits(_config("inshop", tmp_path))


# ------------------------------------------------------------------ re-id

@pytest.mark.parametrize("dataset", ["market1501", "dukemtmc"])
def test_reid_folders(tmp_path, dataset):
    def name(person, camera, i):
        if dataset == "market1501":
            return f"{person}_c{camera}s1_{i:06d}_01.jpg"
        return f"{person}_c{camera}_f{i:07d}.jpg"

    files = {"bounding_box_train": [("0002", 1), ("0002", 3), ("0007", 2)],
             "query": [("0005", 1), ("0011", 2)],
             "bounding_box_test": [("0005", 2), ("0005", 1), ("0011", 4), ("0000", 3),
                                   ("-1", 1)]}
    for folder, entries in files.items():
        for i, (person, camera) in enumerate(entries):
            _image(str(tmp_path / folder / name(person, camera, i)))
    (tmp_path / "query" / "Thumbs.db").write_text("not an image")
    splits = gdata.load_splits(_config(dataset, tmp_path))
    assert set(splits) == {"train", "query", "gallery"}
    train, query, gallery = splits["train"], splits["query"], splits["gallery"]
    assert train.labels.tolist() == [0, 0, 1] and train.cameras.tolist() == [1, 3, 2]
    # junk (-1) dropped; the distractor 0000 stays with a label no query has.
    assert len(gallery) == 4
    assert query.class_names == gallery.class_names == ["0", "5", "11"]
    assert query.labels.tolist() == [1, 2]
    assert sorted(gallery.labels.tolist()) == [0, 1, 1, 2]
    assert query[1]["camera"] == 2 and query[1]["label"] == 2
    _image(str(tmp_path / "query" / "bad_name.jpg"))
    with pytest.raises(ValueError, match="bad_name.jpg"):
        gdata.load_splits(_config(dataset, tmp_path))


# ------------------------------------------------------------------ digits

def test_digits_split_is_class_disjoint():
    splits = gdata.load_splits(_config("digits", val_classes=2))
    train, val, test = splits["train"], splits["val"], splits["test"]
    assert train.class_names == ["0", "1", "2"] and val.class_names == ["3", "4"]
    assert test.class_names == ["5", "6", "7", "8", "9"]
    assert len(train) + len(val) + len(test) == 1797
    record = test[0]
    assert record["image"].shape == (8, 8, 3) and record["image"].dtype == np.uint8
    assert record["image"].max() <= 255 and record["label"] == test.labels[0]
    assert train.cameras is None


# ------------------------------------------------------------------ TFDS (optional)

def test_tfds_missing_dataset_is_a_clear_error(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(FileNotFoundError, match="caltech_birds2011"):
        gdata.load_splits(_config("tfds_cub200", tmp_path))


def test_tfds_prepared_dataset_pooled_and_split_by_class(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    import io

    def png(seed):
        buffer = io.BytesIO()  # encoded bytes: encoding arrays would need TensorFlow
        Image.fromarray(np.full((6, 5, 3), seed, np.uint8)).save(buffer, format="PNG")
        buffer.seek(0)
        return buffer

    class GlJaxTinyBirds(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.ClassLabel(names=["a", "b", "c", "d"])}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(0), "test": self._generate_examples(1)}

        def _generate_examples(self, split):
            for i in range(4):  # both TFDS splits hold every class (not class-disjoint)
                yield f"{split}_{i}", {"image": png(10 * split + i), "label": i}

    GlJaxTinyBirds(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    splits = layouts.load_tfds_splits("gl_jax_tiny_birds", str(tmp_path), 2, "tiny")
    train, test = splits["train"], splits["test"]
    assert train.class_names == ["a", "b"] and test.class_names == ["c", "d"]
    assert len(train) == 4 and sorted(train.labels.tolist()) == [0, 0, 1, 1]
    # pixel value 10 * split + class identifies the record: check label and decoding.
    values = sorted(int(train[i]["image"][0, 0, 0]) for i in range(4))
    assert values == [0, 1, 10, 11] and train[0]["image"].shape == (6, 5, 3)
    for i in range(4):
        record = test[i]
        assert record["image"][0, 0, 0] % 10 == record["label"] + 2


# ------------------------------------------------- Omniglot unzipped, as an image folder

OMNIGLOT = os.path.join(os.path.dirname(gdata.__file__), "assets", "omniglot",
                        "images_background_small1.zip")


def test_omniglot_image_folder(tmp_path):
    with zipfile.ZipFile(OMNIGLOT) as archive:
        archive.extractall(tmp_path)
    (root,) = [p for p in tmp_path.iterdir() if p.is_dir() and not p.name.startswith("__")]
    splits = gdata.load_splits(_config("image_folder", root))
    n = splits["train"].num_classes + splits["test"].num_classes
    assert splits["train"].num_classes == n // 2 and "/character" in splits["train"].class_names[0]
    assert splits["train"][0]["image"].shape == (105, 105, 3)


# ------------------------------------------------------------------ transforms

def test_random_resized_crop_box_follows_scale_and_ratio():
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = random_resized_crop_box(300, 200, rng, (0.2, 0.5), (0.5, 2.0))
        assert 0 <= top and top + h <= 300 and 0 <= left and left + w <= 200
        # rounding of h and w moves area and aspect by at most about a pixel.
        assert 0.2 * 0.95 <= h * w / 60000 <= 0.5 * 1.05
        assert 0.5 * 0.95 <= w / h <= 2.0 * 1.05
    a = random_resized_crop_box(300, 200, np.random.default_rng(3))
    assert a == random_resized_crop_box(300, 200, np.random.default_rng(3))


def test_random_resized_crop_fallback_is_clamped_center_crop():
    # a 10 x 100 image cannot hold a square of 90% of its area: center square 10 x 10.
    box = random_resized_crop_box(10, 100, np.random.default_rng(0), (0.9, 1.0), (1.0, 1.0))
    assert box == (0, 45, 10, 10)


def test_train_transform_flip_and_crop_reproducible():
    image = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
    # scale (1, 1) and ratio (1, 1) -> the whole image, so only the flip remains.
    outs = [gdata.train_transform(image, np.random.default_rng(s), 8, (1.0, 1.0), (1.0, 1.0))
            for s in range(20)]
    flipped = [np.array_equal(o, image[:, ::-1]) for o in outs]
    same = [np.array_equal(o, image) for o in outs]
    assert all(f or s for f, s in zip(flipped, same)) and any(flipped) and any(same)
    no_flip = [gdata.train_transform(image, np.random.default_rng(s), 8, (1.0, 1.0), (1.0, 1.0),
                                     flip=False) for s in range(20)]
    assert all(np.array_equal(o, image) for o in no_flip)


def test_eval_transform_resize_shorter_side_then_center_crop():
    # 2 x 2 constant blocks: halving with any resampling gives one value per block.
    blocks = _RNG.integers(0, 255, (10, 20, 3), dtype=np.uint8)
    image = np.repeat(np.repeat(blocks, 2, axis=0), 2, axis=1)  # 20 x 40
    out = gdata.eval_transform(image, 8, 10, interpolation="nearest")
    # shorter side 20 -> 10: 10 x 20; center crop 8: top 1, left 6.
    np.testing.assert_array_equal(out, blocks[1:9, 6:14])
    tall = gdata.eval_transform(np.zeros((40, 20, 3), np.uint8), 8, 10)
    assert tall.shape == (8, 8, 3)
    with pytest.raises(ValueError, match="image_size=12 is larger than resize_size=10"):
        gdata.eval_transform(image, 12, 10)


def test_normalisation_presets_golden():
    pixel = np.asarray([[[10, 20, 30]]], np.uint8)  # RGB
    np.testing.assert_allclose(gdata.normalize(pixel, "caffe_bgr")[0, 0],
                               [30 - 104, 20 - 117, 10 - 128])
    np.testing.assert_allclose(gdata.normalize(pixel, "imagenet")[0, 0],
                               [(10 / 255 - .485) / .229, (20 / 255 - .456) / .224,
                                (30 / 255 - .406) / .225], rtol=1e-6)
    np.testing.assert_allclose(gdata.normalize(pixel, "unit")[0, 0], [10 / 255, 20 / 255,
                                                                       30 / 255])
    np.testing.assert_allclose(gdata.normalize(pixel, "tf_lite")[0, 0],
                               [(10 - 127) / 128, (20 - 127) / 128, (30 - 127) / 128],
                               rtol=1e-6)
    with pytest.raises(ValueError, match="normalization='bgr'"):
        gdata.normalize(pixel, "bgr")


def test_default_configs():
    digits = gdata.default_config("digits")
    assert (digits.image_size, digits.normalization, digits.augment) == (16, "unit", False)
    cub = gdata.default_config("cub200")
    assert (cub.image_size, cub.resize_size, cub.normalization) == (227, 256, "caffe_bgr")
    sampler = gdata.default_sampler_config("cub200")
    assert (sampler.classes_per_batch, sampler.samples_per_class, sampler.mode) == (6, 9,
                                                                                      "official")
    assert isinstance(cub, ml_collections.ConfigDict)
    assert set(gdata.DATASETS) >= {"digits", "sop", "inshop", "market1501", "tfds_cars196"}


def test_data_package_imports_nothing_else_of_gl_jax():
    import ast
    import gl_jax.data

    folder = os.path.dirname(gl_jax.data.__file__)
    for file_name in sorted(os.listdir(folder)):
        if not file_name.endswith(".py"):
            continue
        with open(os.path.join(folder, file_name)) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert not name.startswith("gl_jax") or name.startswith("gl_jax.data"), (
                    f"{file_name} imports {name}")
