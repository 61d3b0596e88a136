"""Dataset layouts as published (and as the original Group Loss code reads them) -> splits.

Each loader returns a dict of sources: 'train', 'test', and 'val' when
`val_classes > 0`; In-Shop and the re-id datasets give 'query' and 'gallery' instead of
'test'. Splits are class-disjoint (the paper's protocol: train and test classes never overlap). Within each split the labels
are dense 0..m-1 in sorted class order; query and gallery share one mapping.
"""
from __future__ import annotations

import os
import re
from typing import Sequence

import numpy as np

from gl_jax.data.sources import IMAGE_EXTENSIONS, ArraySource, EncodedSource, FileSource, Source
from gl_jax.data.sources import SubsetSource, file_problem

# --------------------------------------------------------------------------- helpers

def _is_image(name: str) -> bool:
    return not name.startswith("._") and name.lower().endswith(IMAGE_EXTENSIONS)


def _require_file(path: str, what: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: list file {path!r} does not exist")


def _require_dir(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what}: folder {path!r} does not exist")


def _read_table(path: str, num_columns: int, header: Sequence[str] = ()
                ) -> list[tuple[int, list[str]]]:
    """Whitespace-separated lines -> [(line number, columns)]; a bad line -> ValueError.

    ``header``: what each header line starts with ('<count>': a number), checked, so that
    a file that lost its header does not lose its first images as header lines instead."""
    rows = []
    with open(path) as f:
        for line_number, line in enumerate(f, start=1):
            if line_number <= len(header):
                first = (line.split() or [""])[0]
                expected = header[line_number - 1]
                if not (first.isdigit() if expected == "<count>" else first == expected):
                    raise ValueError(f"{path}:{line_number}: expected the header line "
                                     f"starting {expected!r}, got {line.rstrip()!r}")
                continue
            if not line.strip():
                continue
            columns = line.split()
            if len(columns) != num_columns:
                raise ValueError(f"{path}:{line_number}: expected {num_columns} columns, got "
                                 f"{len(columns)}: {line.rstrip()!r}")
            rows.append((line_number, columns))
    return rows


def _int_column(path: str, line_number: int, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{path}:{line_number}: expected an integer, got {value!r}") from None


def split_by_classes(full: Source, train_classes: Sequence[int], test_classes: Sequence[int],
                     val_classes: int, dataset: str) -> dict[str, Source]:
    """Class-disjoint train / val / test splits of `full` (labels = global class indices).

    Validation takes the LAST `val_classes` of the (sorted) training classes, so the
    test split is untouched and the choice is deterministic.
    """
    train_classes = np.asarray(sorted(train_classes), dtype=np.int64)
    if val_classes < 0 or val_classes >= len(train_classes):
        raise ValueError(f"{dataset}: val_classes={val_classes} must be in [0, "
                         f"{len(train_classes)}) (the number of training classes)")
    val = train_classes[len(train_classes) - val_classes:]
    train = train_classes[:len(train_classes) - val_classes]
    splits = {}
    for split, classes in (("train", train), ("val", val), ("test", test_classes)):
        if split == "val" and val_classes == 0:
            continue
        indices = np.flatnonzero(np.isin(full.labels, np.asarray(classes)))
        splits[split] = SubsetSource(f"{dataset}/{split}", full, indices)
    return splits


def _carve_val(splits: dict[str, Source], val_classes: int, dataset: str) -> dict[str, Source]:
    """Adds 'val' (the last `val_classes` training classes) to splits that have their own test."""
    if val_classes == 0:
        return splits
    train = splits["train"]
    parts = split_by_classes(train, range(train.num_classes), [], val_classes, dataset)
    splits = dict(splits)
    splits["train"], splits["val"] = parts["train"], parts["val"]
    return splits


# --------------------------------------------------------------------------- digits

DIGITS_TRAIN_CLASSES = (0, 1, 2, 3, 4)
DIGITS_TEST_CLASSES = (5, 6, 7, 8, 9)


def digits_source() -> ArraySource:
    """scikit-learn's bundled 8x8 digits (1,797 images, values 0..16) as uint8 RGB 0..255."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn: nothing downloaded.
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # [1797, 8, 8]
    return ArraySource("digits", images, digits.target, [str(d) for d in range(10)])


def load_digits_splits(val_classes: int = 0) -> dict[str, Source]:
    """Digits 0-4 train, 5-9 test (class-disjoint); val = the last `val_classes` of 0-4."""
    return split_by_classes(digits_source(), DIGITS_TRAIN_CLASSES, DIGITS_TEST_CLASSES,
                            val_classes, "digits")


# --------------------------------------------------------------------------- image folder

def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # a link that resolves to itself raises ELOOP; file_problem names it
        return False


def _is_file(entry: os.DirEntry) -> bool:
    try:
        return entry.is_file()
    except OSError:
        return False


def _walk_class_folders(root: str, name: str) -> tuple[dict[str, list[str]], list[str]]:
    """-> ({class (relative folder, '/'-separated): sorted image paths}, empty class folders).

    Symlinks are followed, to files and to folders anywhere, but a folder link that
    resolves to one of its own ancestors (`class/loop -> ..`) would repeat the tree
    forever: such links, links that resolve to themselves, and image-named entries that
    are not regular files (FIFO, socket, device) -> one ValueError naming each. A
    dangling image-named link is kept: `gl_jax.data.scan` reports it with the other
    unreadable files.
    """
    classes: dict[str, list[str]] = {}
    empty: list[str] = []
    refused: list[str] = []

    def visit(folder: str, rel: str, ancestors: tuple[str, ...]) -> None:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
        images, subfolders = [], []
        for entry in entries:
            if _is_dir(entry):  # follows a link; False for a dangling or looping one
                real = os.path.realpath(entry.path)
                if real in ancestors:
                    refused.append(f"{entry.path}: symlink loop (resolves to its ancestor "
                                   f"folder {real!r})")
                else:
                    subfolders.append((entry, real))
            elif _is_file(entry):
                if _is_image(entry.name):
                    images.append(entry.path)
            elif entry.is_symlink() or _is_image(entry.name):
                problem = file_problem(entry.path)
                if problem is not None and (problem.startswith("symlink loop") or
                                            problem.startswith("not a regular file")):
                    refused.append(f"{entry.path}: {problem}")
                elif _is_image(entry.name):  # dangling: left to the scan
                    images.append(entry.path)
        if images and rel:
            classes[rel] = images
        elif not images and not subfolders and rel:
            empty.append(folder)
        for entry, real in subfolders:
            visit(entry.path, f"{rel}/{entry.name}" if rel else entry.name, ancestors + (real,))

    visit(root, "", (os.path.realpath(root),))
    if refused:
        lines = [f"  {line}" for line in refused[:10]] + (["  ..."] if len(refused) > 10 else [])
        raise ValueError("\n".join(
            [f"{name}: {len(refused)} path(s) under {root!r} are neither image files nor "
             "folders (links to regular files and to folders outside their own ancestors are "
             "fine); remove or fix them:"] + lines))
    return classes, empty


# What a dataset read as class folders may hold instead, named when it holds none.
_FOLDER_LAYOUTS = {"cub200": "images.txt and image_class_labels.txt, or images/<class>/",
                   "cars196": "images/<class>/"}


def image_folder_source(root: str, name: str = "image_folder") -> FileSource:
    """One folder per class; class = path of the folder relative to `root`, sorted.

    Nested folders are allowed (Omniglot's `Alphabet/characterNN/`): every folder that
    directly holds image files is a class. Files starting with `._` and non-images are
    ignored. A class folder with no image (only `._` files or none) -> ValueError; so is
    a symlink loop or an image-named FIFO / socket / device (see `_walk_class_folders`).
    """
    _require_dir(root, name)
    classes, empty = _walk_class_folders(root, name)
    if empty:
        raise ValueError(f"{name}: class folder(s) without any image: {empty[:5]}"
                         f"{' ...' if len(empty) > 5 else ''}")
    if not classes:
        hint = _FOLDER_LAYOUTS.get(name)
        raise ValueError(f"{name}: no class folder with images under {root!r}"
                         + (f" (expected {hint})" if hint else ""))
    class_names = sorted(classes)
    paths, labels = [], []
    for label, class_name in enumerate(class_names):
        paths += classes[class_name]
        labels += [label] * len(classes[class_name])
    return FileSource(name, paths, labels, class_names)


def load_image_folder_splits(root: str, val_classes: int = 0, train_classes: int = 0,
                             name: str = "image_folder") -> dict[str, Source]:
    """Sorted classes: the first `train_classes` (0 -> half, rounded down) train, the rest test."""
    full = image_folder_source(root, name)
    n = full.num_classes
    n_train = n // 2 if train_classes == 0 else train_classes
    if not 0 < n_train < n:
        if name == "image_folder":
            raise ValueError(f"config.data.train_classes = {n_train} must be in (0, {n}) for "
                             f"the {n} classes under {root}")
        raise ValueError(f"{name} trains on its first {n_train} classes and tests on the "
                         f"others, but {root} has {n} class folders")
    return split_by_classes(full, range(n_train), range(n_train, n), val_classes, name)


def _images_dir(root: str) -> str:
    """The original code's `<root>/images/<class>/`; a bare `<root>/<class>/` also works."""
    images = os.path.join(root, "images")
    return images if os.path.isdir(images) else root


# --------------------------------------------------------------------------- CUB-200-2011

def load_cub_splits(root: str, val_classes: int = 0) -> dict[str, Source]:
    """CUB-200-2011 as released: images.txt + image_class_labels.txt; classes 1-100 / 101-200.

    Without the list files, `<root>/images/<class>/` is read as an image folder (the
    class folders `001.Black_footed_Albatross`, ... sort into the same order).
    """
    images_txt = os.path.join(root, "images.txt")
    labels_txt = os.path.join(root, "image_class_labels.txt")
    if not os.path.exists(images_txt) and not os.path.exists(labels_txt):
        _require_dir(root, "cub200")
        return load_image_folder_splits(_images_dir(root), val_classes, 100, "cub200")
    _require_file(images_txt, "cub200")
    _require_file(labels_txt, "cub200")
    paths = {}
    for line, (image_id, rel) in _read_table(images_txt, 2):
        paths[_int_column(images_txt, line, image_id)] = os.path.join(root, "images", rel)
    class_of = {}
    for line, (image_id, class_id) in _read_table(labels_txt, 2):
        class_of[_int_column(labels_txt, line, image_id)] = _int_column(labels_txt, line,
                                                                        class_id)
    if set(paths) != set(class_of):
        missing = sorted(set(paths) ^ set(class_of))[:5]
        raise ValueError(f"cub200: {images_txt} and {labels_txt} list different image ids, "
                         f"e.g. {missing}")
    ids = sorted(paths)
    class_ids = np.asarray([class_of[i] for i in ids])
    kept = np.unique(class_ids)
    names = {}
    for i in ids:  # the class folder name, e.g. '001.Black_footed_Albatross'
        names.setdefault(class_of[i], os.path.dirname(os.path.relpath(paths[i],
                                                      os.path.join(root, "images"))))
    full = FileSource("cub200", [paths[i] for i in ids], np.searchsorted(kept, class_ids),
                      [names[k] for k in kept])
    n_train = int(np.sum(kept <= 100))
    return split_by_classes(full, range(n_train), range(n_train, len(kept)), val_classes,
                            "cub200")


def load_cars_splits(root: str, val_classes: int = 0) -> dict[str, Source]:
    """Cars196 as the original code reads it: `<root>/images/<class>/`; classes 1-98 / 99-196."""
    return load_image_folder_splits(_images_dir(root), val_classes, 98, "cars196")


# --------------------------------------------------------------------------- SOP

def _sop_list(root: str, file_name: str, split: str) -> FileSource:
    path = os.path.join(root, file_name)
    _require_file(path, "sop")
    rows = _read_table(path, 4, header=("image_id",))  # image_id class_id super_class_id path
    class_ids = np.asarray([_int_column(path, line, cols[1]) for line, cols in rows])
    kept = np.unique(class_ids)
    return FileSource(f"sop/{split}", [os.path.join(root, cols[3]) for _, cols in rows],
                      np.searchsorted(kept, class_ids), [str(k) for k in kept])


def load_sop_splits(root: str, val_classes: int = 0) -> dict[str, Source]:
    """Stanford Online Products: Ebay_train.txt (11,318 classes) / Ebay_test.txt (11,316)."""
    splits = {"train": _sop_list(root, "Ebay_train.txt", "train"),
              "test": _sop_list(root, "Ebay_test.txt", "test")}
    return _carve_val(splits, val_classes, "sop")


# --------------------------------------------------------------------------- In-Shop

def load_inshop_splits(root: str, val_classes: int = 0) -> dict[str, Source]:
    """In-Shop: Eval/list_eval_partition.txt -> 'train', 'query', 'gallery' (no 'test').

    Paths in the list (`img/WOMEN/...`) are looked up under `<root>/Img/` first (the
    released archive layout), then under `<root>/`. Query and gallery share one label
    mapping (sorted item ids), so equal labels mean the same item.
    """
    path = os.path.join(root, "Eval", "list_eval_partition.txt")
    _require_file(path, "inshop")
    rows = _read_table(path, 3, header=("<count>", "image_name"))  # the count, the names
    base = os.path.join(root, "Img")
    if not os.path.isdir(base):
        base = root
    by_status: dict[str, list] = {"train": [], "query": [], "gallery": []}
    for line, (image, item, status) in rows:
        if status not in by_status:
            raise ValueError(f"{path}:{line}: evaluation_status {status!r} is not one of "
                             f"{sorted(by_status)}")
        by_status[status].append((os.path.join(base, image), item))
    splits = {}
    eval_items = sorted({item for s in ("query", "gallery") for _, item in by_status[s]})
    for status, records in by_status.items():
        if not records:
            raise ValueError(f"{path}: no line with evaluation_status {status!r}")
        items = sorted({item for _, item in records}) if status == "train" else eval_items
        labels = np.searchsorted(np.asarray(items), np.asarray([item for _, item in records]))
        splits[status] = FileSource(f"inshop/{status}", [p for p, _ in records], labels, items)
    return _carve_val(splits, val_classes, "inshop")


# --------------------------------------------------------------------------- re-id

_REID_NAME = re.compile(r"^(-?\d+)_c(\d+)")


def _reid_folder(root: str, folder: str, dataset: str, drop_junk: bool,
                 drop_distractors: bool) -> tuple[list[str], np.ndarray, np.ndarray]:
    directory = os.path.join(root, folder)
    _require_dir(directory, dataset)
    paths, ids, cameras = [], [], []
    for file_name in sorted(os.listdir(directory)):
        if not _is_image(file_name):
            continue
        match = _REID_NAME.match(file_name)
        if match is None:
            raise ValueError(f"{dataset}: file name {os.path.join(directory, file_name)!r} does "
                             "not start with PERSON_cCAMERA (e.g. 0002_c1s1_000451_03.jpg)")
        person, camera = int(match.group(1)), int(match.group(2))
        if (person == -1 and drop_junk) or (person == 0 and drop_distractors):
            continue
        paths.append(os.path.join(directory, file_name))
        ids.append(person)
        cameras.append(camera)
    if not paths:
        raise ValueError(f"{dataset}: no image in {directory!r}")
    return paths, np.asarray(ids), np.asarray(cameras)


def load_reid_splits(root: str, dataset: str, val_classes: int = 0) -> dict[str, Source]:
    """Market-1501 / DukeMTMC-reID: bounding_box_train/, query/, bounding_box_test/.

    Person id and camera come from the file name `PPPP_cC...`. Junk images (id -1: the
    official protocol ignores them) are dropped; distractors (id 0000) stay in the
    gallery as an identity no query has. The training split drops both. Cameras are
    the dataset's own numbers (1-based). Query and gallery share one label mapping.
    """
    train_paths, train_ids, train_cams = _reid_folder(root, "bounding_box_train", dataset,
                                                      True, True)
    kept = np.unique(train_ids)
    splits = {"train": FileSource(f"{dataset}/train", train_paths,
                                  np.searchsorted(kept, train_ids), [str(k) for k in kept],
                                  train_cams)}
    query = _reid_folder(root, "query", dataset, True, True)
    gallery = _reid_folder(root, "bounding_box_test", dataset, True, False)
    ids = np.unique(np.concatenate([query[1], gallery[1]]))
    for split, (paths, person, cameras) in (("query", query), ("gallery", gallery)):
        splits[split] = FileSource(f"{dataset}/{split}", paths, np.searchsorted(ids, person),
                                   [str(k) for k in ids], cameras)
    return _carve_val(splits, val_classes, dataset)


# --------------------------------------------------------------------------- TFDS

def load_tfds_splits(builder_name: str, root: str, n_train_classes: int, dataset: str,
                     val_classes: int = 0) -> dict[str, Source]:
    """A prepared TFDS dataset read through `tfds.data_source` (no TensorFlow needed).

    All of the builder's splits are pooled and re-split by class (the TFDS train/test
    splits of CUB and Cars are not class-disjoint). Images are read as encoded bytes
    (`SkipDecoding`) and decoded with PIL; the labels are read once at load time.
    """
    import tensorflow_datasets as tfds

    data_dir = root or None
    try:
        builder = tfds.builder(builder_name, data_dir=data_dir)
        split_names = sorted(builder.info.splits.keys())
    except Exception as err:  # unknown builder, unreadable dataset_info.json, ...
        raise FileNotFoundError(f"{dataset}: TFDS dataset {builder_name!r} could not be opened "
                                f"under data_dir={data_dir!r}: {err}") from err
    if not split_names:
        raise FileNotFoundError(f"{dataset}: TFDS dataset {builder_name!r} is not prepared under "
                                f"data_dir={data_dir!r} (prepare it with `tfds build "
                                f"{builder_name} --data_dir=...`; Cars196: bring the files)")
    decoders = {"image": tfds.decode.SkipDecoding()}
    parts = [tfds.data_source(builder_name, split=s, data_dir=data_dir, decoders=decoders)
             for s in split_names]
    offsets = np.cumsum([0] + [len(p) for p in parts])
    labels = np.concatenate([
        np.asarray([int(p[i]["label"]) for i in range(len(p))], dtype=np.int64) for p in parts])
    reader = _TfdsReader(parts, offsets)
    num = builder.info.features["label"].num_classes
    names = (builder.info.features["label"].names if hasattr(builder.info.features["label"],
                                                              "names") else None)
    full = EncodedSource(dataset, reader, labels, names or [str(k) for k in range(num)])
    return split_by_classes(full, range(n_train_classes), range(n_train_classes, num),
                            val_classes, dataset)


class _TfdsReader:
    """Global index -> encoded image bytes across the pooled TFDS splits (picklable)."""

    def __init__(self, parts, offsets):
        self.parts = parts
        self.offsets = offsets

    def __call__(self, index: int) -> bytes:
        part = int(np.searchsorted(self.offsets, index, side="right") - 1)
        return self.parts[part][index - int(self.offsets[part])]["image"]


def reid_junk_labels(source) -> tuple[int, ...]:
    """Dense labels of the re-id ids that are never matches: Market/Duke person 0000 (the
    distractors) and -1 (junk). Splits carry dense labels 0..C-1, so the raw ids are
    looked up in ``class_names``; dense label 0 is a real person when a set has no
    distractor."""
    return tuple(i for i, name in enumerate(source.class_names) if name.strip() in ("0", "-1"))
