"""Omniglot, the embedded default dataset: shipped inside the package, nothing to download.

Handwritten characters from 50 alphabets (Lake, Salakhutdinov and Tenenbaum, "Human-level
concept learning through probabilistic program induction", Science 2015; MIT licence,
`assets/omniglot/LICENSE` beside the data, from github.com/brendenlake/omniglot). Two of
its "small" background sets ship with gl_jax (2.9 MB): 105 x 105 black-and-white PNGs, 20
drawers per character, class = `Alphabet/characterNN`.

Splits (class-disjoint AND alphabet-disjoint):
- train: all of `images_background_small1.zip`: Balinese, Early_Aramaic, Greek, Korean,
  Latin (136 characters, 2,720 images);
- test: the alphabets of `images_background_small2.zip` that small1 lacks:
  Japanese_(katakana), Sanskrit, Tagalog (106 characters, 2,120 images). Greek and Latin
  are in both zips (identical images) and are never tested;
- val (`val_classes > 0`): the LAST `val_classes` training characters in sorted order
  (`Alphabet/characterNN`), as every other layout carves it. The sorted order ends with
  Latin (26 characters), then Korean (40): `val_classes=26` is exactly the Latin
  alphabet and 66 Korean + Latin, i.e. alphabet-disjoint from train; other values cut
  the last alphabet in two (still class-disjoint).

The PNG bytes are read from the zips once, into memory (2,720 + 2,120 small files, about
2.8 MB), and decoded per access by `EncodedSource`: no cache directory, nothing written,
and it starts faster than unpacking (see `load_omniglot_splits`).
"""
from __future__ import annotations

import importlib.resources
import io
import logging
import os
import zipfile
from typing import Sequence

from gl_jax.data.sources import EncodedSource, Source

ASSET_DIR = ("assets", "omniglot")   # under the gl_jax.data package
TRAIN_ZIP = "images_background_small1.zip"
TEST_ZIP = "images_background_small2.zip"
ZIPS = (TRAIN_ZIP, TEST_ZIP)
TEST_ALPHABETS = ("Japanese_(katakana)", "Sanskrit", "Tagalog")
DRAWERS = 20


def packaged_dir():
    """The packaged folder holding the two zips and LICENSE (an importlib.resources
    Traversable; a plain directory for any normal or editable install)."""
    return importlib.resources.files("gl_jax.data").joinpath(*ASSET_DIR)


def packaged_files() -> dict[str, object]:
    """{file name: Traversable} of the packaged zips and licence; FileNotFoundError if one
    is missing (a broken install)."""
    folder = packaged_dir()
    files = {name: folder.joinpath(name) for name in (*ZIPS, "LICENSE")}
    missing = [name for name, f in files.items() if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"omniglot: packaged file(s) {missing} missing from {folder} "
                                "(reinstall gl_jax, or pass a folder holding the zips as root)")
    return files


def _read_zip_bytes(root: str, name: str) -> bytes:
    if not root:
        return packaged_files()[name].read_bytes()
    path = os.path.join(os.path.expanduser(root), name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"omniglot: {path!r} does not exist (data.root must be a folder "
                                f"holding {' and '.join(ZIPS)}; empty = the packaged copy)")
    with open(path, "rb") as f:
        return f.read()


def read_zip(data: bytes, label: str) -> dict[str, list[tuple[str, bytes]]]:
    """Zip bytes -> {'Alphabet/characterNN': [(member name, PNG bytes), ...] sorted by name}.

    Members are `<top>/<Alphabet>/<characterNN>/<id>_<drawer>.png`; folders, `._` files and
    non-PNG members are skipped.
    """
    classes: dict[str, list[tuple[str, bytes]]] = {}
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        for info in z.infolist():
            parts = info.filename.split("/")
            if (info.is_dir() or len(parts) != 4 or parts[-1].startswith("._")
                    or not parts[-1].lower().endswith(".png")):
                continue
            classes.setdefault(f"{parts[1]}/{parts[2]}", []).append(
                (info.filename, z.read(info)))
    if not classes:
        raise ValueError(f"omniglot: {label} holds no <top>/<Alphabet>/<characterNN>/*.png")
    return {name: sorted(files) for name, files in sorted(classes.items())}


class _Blobs:
    """index -> encoded bytes, from a list held in memory (picklable for grain workers)."""

    def __init__(self, blobs: Sequence[bytes]):
        self.blobs = list(blobs)

    def __call__(self, index: int) -> bytes:
        return self.blobs[index]


class OmniglotSource(EncodedSource):
    """PNG bytes in memory, decoded on access; `describe(i)` names the zip member."""

    def __init__(self, name: str, classes: dict[str, list[tuple[str, bytes]]], zip_name: str,
                 drawers: int = 0):
        class_names = sorted(classes)
        members, blobs, labels = [], [], []
        for label, class_name in enumerate(class_names):
            files = classes[class_name][:drawers] if drawers else classes[class_name]
            for member, blob in files:
                members.append(member)
                blobs.append(blob)
                labels.append(label)
        super().__init__(name, _Blobs(blobs), labels, class_names)
        self.zip_name = zip_name
        self.members = members

    def describe(self, index: int) -> str:
        return f"{self.zip_name}:{self.members[index]}"


def load_omniglot_splits(root: str = "", val_classes: int = 0,
                         drawers: int = 0) -> dict[str, Source]:
    """The alphabet-disjoint Omniglot splits (see the module docstring).

    Args:
      root: a folder holding `images_background_small1.zip` and
        `images_background_small2.zip`; empty = the copy shipped in the package.
      val_classes: > 0 carves the last `val_classes` training characters (sorted
        `Alphabet/characterNN`; 26 = Latin, 66 = Korean + Latin) off as 'val'.
      drawers: > 0 keeps only the first `drawers` (1..20) drawings of each TRAINING (and
        val) character, e.g. for few-shot experiments; the test split always has all 20.

    Returns {'train', 'test'[, 'val']} of `OmniglotSource` / `SubsetSource`; labels dense
    0..m-1 in sorted class order within each split.

    Reading both zips into memory took 0.1-0.2 s on the shared 2-core machine; unpacking
    them into a folder instead took 0.4-0.5 s (then 0.01 s to list on later starts) and
    every image read then opens a file (decoding all training images: 0.19-0.21 s from
    files against 0.16-0.17 s from memory). Memory also writes nothing and cannot go stale.
    """
    from gl_jax.data.layouts import _carve_val  # layouts may dispatch here: import late.
    if not 0 <= int(drawers) <= DRAWERS:
        raise ValueError(f"omniglot: drawers={drawers} must be in [0, {DRAWERS}] (0 = all)")
    train_classes = read_zip(_read_zip_bytes(root, TRAIN_ZIP), TRAIN_ZIP)
    small2 = read_zip(_read_zip_bytes(root, TEST_ZIP), TEST_ZIP)
    train_alphabets = {name.split("/")[0] for name in train_classes}
    test_classes = {k: v for k, v in small2.items() if k.split("/")[0] not in train_alphabets}
    if not test_classes:
        raise ValueError(f"omniglot: {TEST_ZIP} has no alphabet that {TRAIN_ZIP} lacks")
    if not 0 <= int(val_classes) < len(train_classes):
        raise ValueError(f"omniglot: val_classes={val_classes} must be in [0, "
                         f"{len(train_classes)}) (the number of training characters)")
    splits = {"train": OmniglotSource("omniglot/train", train_classes, TRAIN_ZIP, int(drawers)),
              "test": OmniglotSource("omniglot/test", test_classes, TEST_ZIP)}
    splits = _carve_val(splits, int(val_classes), "omniglot")
    for source in splits.values():
        logging.info("data %s: %d images, %d classes", source.name, len(source),
                     source.num_classes)
    return splits


def alphabets(source: Source) -> list[str]:
    """The sorted alphabets of a split (class names are `Alphabet/characterNN`)."""
    return sorted({name.split("/")[0] for name in source.class_names})


__all__ = ["ASSET_DIR", "DRAWERS", "OmniglotSource", "TEST_ALPHABETS", "TRAIN_ZIP", "TEST_ZIP",
           "alphabets", "load_omniglot_splits", "packaged_dir", "packaged_files", "read_zip"]
