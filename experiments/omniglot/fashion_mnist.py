"""Fashion-MNIST as an image folder, for `compare.py:fashion_mnist`.

Read from the Debian package dataset-fashion-mnist (`/usr/share/datasets/fashion-mnist`,
idx files, read with NumPy): classes 0-4 of the training file train, classes 5-9 of the
test file test, the first `per_class` images of each, written once as PNGs.
"""
from __future__ import annotations

import gzip
import os

import numpy as np

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
         "Bag", "Ankle boot")


def read_idx(path: str) -> np.ndarray:
    """An idx file (gzip): big-endian header, magic 0x08 (uint8) + rank, then the sizes."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file (header {data[:4]!r})")
    rank = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(rank))
    array = np.frombuffer(data, np.uint8, offset=4 + 4 * rank)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but holds {array.size} values")
    return array.reshape(shape)


def image_folder(cache_dir: str, per_class: int, source_dir: str = FASHION_DIR) -> str:
    """The folder `<cache_dir>/fashion_mnist_<per_class>` (made once): `0_train/<class>/`
    (5 classes) and `1_test/<class>/` (the other 5), PNGs."""
    from PIL import Image
    root = os.path.join(cache_dir, f"fashion_mnist_{per_class}")
    if os.path.isdir(root):
        return root
    files = {k: os.path.join(source_dir, f"{k}-ubyte.gz") for k in
             ("train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1")}
    for path in files.values():
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} does not exist: apt-get install dataset-fashion-mnist")
    partial = f"{root}.{os.getpid()}.tmp"    # renamed when complete: no half-written folder
    for split, prefix, classes in (("0_train", "train", range(5)), ("1_test", "t10k", range(5, 10))):
        images = read_idx(files[f"{prefix}-images-idx3"])
        labels = read_idx(files[f"{prefix}-labels-idx1"])
        for c in classes:
            folder = os.path.join(partial, split, f"{c}_{NAMES[c].replace('/', '-')}")
            os.makedirs(folder, exist_ok=True)
            for i in np.flatnonzero(labels == c)[:per_class]:
                Image.fromarray(images[i], "L").save(os.path.join(folder, f"{i:05d}.png"))
    os.rename(partial, root)
    return root
