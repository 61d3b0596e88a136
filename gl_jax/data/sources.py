"""Random-access image sources: the objects every layout loader returns.

A source is grain `RandomAccessDataSource`-compatible: `len(src)` and `src[i]` give
`dict(image=uint8 [H, W, 3], label=int, camera=int (-1 when unknown), index=i)`.
Labels and cameras are also held as arrays (`src.labels`, `src.cameras`) so that the
sampler and the evaluation never need to decode an image.
"""
from __future__ import annotations

import io
import logging
import os
from typing import Callable, Sequence

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff",
                    ".webp")


class CorruptImageError(ValueError):
    """An image file that exists but does not decode (truncated, not an image, ...)."""

    def __init__(self, path: str, cause: BaseException | None = None):
        self.path = path
        super().__init__(f"corrupt or unreadable image file {path!r}: {cause!r}")


def decode_image(data: bytes, path: str) -> np.ndarray:
    """Decodes encoded image bytes to uint8 [H, W, 3] RGB.

    Grey, palette and RGBA images become 3 RGB channels. `path` only names the file in
    the error: a truncated or non-image file raises `CorruptImageError` naming it, because
    PIL's lazy decoding would otherwise fail much later or, for truncated JPEGs, silently
    return a half-grey image.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # forces the full decode; a truncated file raises here.
            if img.mode != "RGB":
                img = img.convert("RGB")
            array = np.asarray(img, dtype=np.uint8)
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ...
        raise CorruptImageError(path, err) from err
    if array.ndim != 3 or array.shape[2] != 3 or array.shape[0] == 0 or array.shape[1] == 0:
        raise CorruptImageError(path, ValueError(f"decoded to shape {array.shape}"))
    return array


def read_image_file(path: str) -> np.ndarray:
    """Reads and decodes one image file; missing -> FileNotFoundError, corrupt -> CorruptImageError."""
    with open(path, "rb") as f:
        data = f.read()
    return decode_image(data, path)


class Source:
    """Base class: a split of a dataset with labels (and cameras) known without decoding.

    Attributes:
      name: e.g. 'cub200/train'.
      labels: int64 [N]; dense 0..num_classes-1 within the split (query and gallery of
        In-Shop / re-id share one mapping, see the layout loaders).
      cameras: int64 [N] or None.
      class_names: list of str, class_names[label] is the dataset's own class name.
    """

    def __init__(self, name: str, labels: Sequence[int], cameras: Sequence[int] | None,
                 class_names: Sequence[str]):
        self.name = name
        self.labels = np.asarray(labels, dtype=np.int64)
        self.cameras = None if cameras is None else np.asarray(cameras, dtype=np.int64)
        if self.cameras is not None and self.cameras.shape != self.labels.shape:
            raise ValueError(f"{name}: cameras shape {self.cameras.shape} != labels shape "
                             f"{self.labels.shape}")
        self.class_names = list(class_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def load_image(self, index: int) -> np.ndarray:
        raise NotImplementedError

    def describe(self, index: int) -> str:
        """A human-readable name of record `index` for error messages (a file path)."""
        return f"{self.name}[{index}]"

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"{self.name}: index {index} out of range [0, {len(self)})")
        camera = -1 if self.cameras is None else int(self.cameras[index])
        return dict(image=self.load_image(index), label=int(self.labels[index]), camera=camera,
                    index=index)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, size={len(self)}, "
                f"classes={self.num_classes})")


class FileSource(Source):
    """Images stored as individual files on disk."""

    def __init__(self, name: str, paths: Sequence[str], labels: Sequence[int],
                 class_names: Sequence[str], cameras: Sequence[int] | None = None):
        super().__init__(name, labels, cameras, class_names)
        self.paths = [os.fspath(p) for p in paths]
        if len(self.paths) != len(self.labels):
            raise ValueError(f"{name}: {len(self.paths)} paths but {len(self.labels)} labels")

    def load_image(self, index: int) -> np.ndarray:
        return read_image_file(self.paths[index])

    def describe(self, index: int) -> str:
        return self.paths[index]


class ArraySource(Source):
    """Images already in memory as uint8 [N, H, W, 3] (or [N, H, W] grey)."""

    def __init__(self, name: str, images: np.ndarray, labels: Sequence[int],
                 class_names: Sequence[str], cameras: Sequence[int] | None = None):
        super().__init__(name, labels, cameras, class_names)
        images = np.asarray(images)
        if images.dtype != np.uint8:
            raise ValueError(f"{name}: images must be uint8, got {images.dtype}")
        if images.ndim == 3:
            images = np.repeat(images[..., None], 3, axis=-1)
        if images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] != len(self.labels):
            raise ValueError(f"{name}: images shape {images.shape} is not [N={len(self.labels)}, "
                             "H, W, 3]")
        self.images = images

    def load_image(self, index: int) -> np.ndarray:
        return self.images[index]


class EncodedSource(Source):
    """Records whose image is encoded bytes fetched by `read_bytes(i)` (e.g. TFDS)."""

    def __init__(self, name: str, read_bytes: Callable[[int], bytes], labels: Sequence[int],
                 class_names: Sequence[str], cameras: Sequence[int] | None = None):
        super().__init__(name, labels, cameras, class_names)
        self.read_bytes = read_bytes

    def load_image(self, index: int) -> np.ndarray:
        return decode_image(self.read_bytes(index), self.describe(index))


class SubsetSource(Source):
    """Records `indices` of `parent`, with labels remapped to 0..m-1 in sorted label order."""

    def __init__(self, name: str, parent: Source, indices: Sequence[int]):
        indices = np.asarray(indices, dtype=np.int64)
        parent_labels = parent.labels[indices]
        kept = np.unique(parent_labels)
        labels = np.searchsorted(kept, parent_labels)
        cameras = None if parent.cameras is None else parent.cameras[indices]
        super().__init__(name, labels, cameras, [parent.class_names[k] for k in kept])
        self.parent = parent
        self.indices = indices

    def load_image(self, index: int) -> np.ndarray:
        return self.parent.load_image(int(self.indices[index]))

    def describe(self, index: int) -> str:
        return self.parent.describe(int(self.indices[index]))


def num_classes(source: Source) -> int:
    """Number of classes of a split (the classifier width for the training split)."""
    return source.num_classes


def load_with_fallback(source: Source, index: int, skip_corrupt: bool,
                       members_of_class: Callable[[int], np.ndarray] | None = None) -> tuple:
    """Decodes record `index`; on a corrupt file either raises or uses another image of its class.

    Returns (image uint8 [H, W, 3], the index actually decoded). With `skip_corrupt`, the
    replacement is the next record of the same class in index order (cycling), which keeps
    the P x K composition of the batch and is deterministic.
    """
    try:
        return source.load_image(index), index
    except CorruptImageError as err:
        if not skip_corrupt:
            raise
        logging.warning("skip_corrupt: %s; using another image of the same class", err)
    label = source.labels[index]
    members = (np.flatnonzero(source.labels == label) if members_of_class is None
               else members_of_class(int(label)))
    start = int(np.searchsorted(members, index))
    for other in np.roll(members, -start - 1):
        if other == index:
            continue
        try:
            return source.load_image(int(other)), int(other)
        except CorruptImageError as err:
            logging.warning("skip_corrupt: %s", err)
    raise CorruptImageError(source.describe(index),
                            ValueError(f"every image of class {label} is corrupt"))
