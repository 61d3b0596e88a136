"""Random-access image sources: the objects every layout loader returns.

A source is grain `RandomAccessDataSource`-compatible: `len(src)` and `src[i]` give
`dict(image=uint8 [H, W, 3], label=int, camera=int (-1 when unknown), index=i)`.
Labels and cameras are also held as arrays (`src.labels`, `src.cameras`) so that the
sampler and the evaluation never need to decode an image.
"""
from __future__ import annotations

import errno
import io
import logging
import os
import stat
from typing import Callable, Sequence

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff",
                    ".webp")


_NON_REGULAR = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                (stat.S_ISDIR, "a folder"))


def file_problem(path: str) -> str | None:
    """Why `path` cannot be an image file, or None for an existing, non-empty regular file.

    Follows symlinks (datasets are often trees of links). Never opens the file: reading a
    FIFO would block forever, reading a device could be endless.
    """
    try:
        info = os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "symlink loop (the link resolves to itself)"
        if os.path.islink(path):
            return f"dangling symlink to {os.readlink(path)!r}"
        if err.errno == errno.ENOENT:
            return "missing (no such file)"
        return f"cannot stat: {err.strerror}"
    for test, kind in _NON_REGULAR:
        if test(info.st_mode):
            return f"not a regular file: {kind}"
    if info.st_size == 0:
        return "empty file (0 bytes)"
    return None


class CorruptImageError(ValueError):
    """An image file that exists but does not decode (truncated, not an image, ...)."""

    def __init__(self, path: str, cause: BaseException | None = None):
        self.path = path
        # found while training or evaluating: say how to go on and how to find the others.
        super().__init__(f"corrupt or unreadable image file {path!r}: {cause!r} (with "
                         "--config.data.skip_corrupt=True training uses another image of its "
                         "class and evaluation leaves it out; gl_jax.data.scan_splits lists "
                         "every such file before training)")


# Modes PIL converts to RGB without losing range: 8 bits per channel already (alpha is
# dropped, as the reference's torchvision loader `convert('RGB')` does), palette, 1-bit,
# CMYK and YCbCr (PIL's own formulas).
_DIRECT_MODES = ("RGB", "RGBA", "RGBX", "RGBa", "L", "LA", "P", "PA", "1", "CMYK",
                 "YCbCr", "HSV")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
RGB_MODES = _DIRECT_MODES + _SIXTEEN_BIT_MODES + ("I", "F")


def _integer_bit_depth(img: Image.Image, values: np.ndarray) -> int:
    """Bits per sample of an 'I' (int32) image: what the file declares, else what fits.

    A 16-bit PNG opens as 'I' in some Pillow versions; a TIFF says its depth in tag 258
    (BitsPerSample). Without either, the smallest of 16 / 32 that holds the values.
    """
    if img.format == "PNG":
        return 16
    tags = getattr(img, "tag_v2", None)
    if tags is not None and 258 in tags:
        bits = tags[258]
        return int(bits[0] if isinstance(bits, tuple) else bits)
    return 16 if values.size == 0 or int(values.max()) < 1 << 16 else 32


def to_rgb(img: Image.Image, path: str = "<image>") -> Image.Image:
    """Any PIL mode -> 8-bit RGB, scaling high bit depths instead of clipping them.

    PIL's `convert('RGB')` clips 16-bit grey ('I;16', 'I') at 255, which turns a 16-bit
    PNG white. Here an n-bit sample v becomes v >> (n - 8) (16-bit: v >> 8), negative
    values 0. 'F' (float) is read as [0, 1] when its largest finite value is <= 1, else
    as [0, 255]; NaN becomes 0. Alpha is dropped (not composited), as the reference's
    loader does. An unknown mode -> ValueError naming `path` and the mode.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _DIRECT_MODES:
        if mode in ("P", "PA"):  # a palette may carry transparency: expand it first.
            img = img.convert("RGBA")
        return img.convert("RGB")
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        values = np.asarray(img).astype(np.int64)
        bits = 16 if mode in _SIXTEEN_BIT_MODES else _integer_bit_depth(img, values)
        grey = np.clip(values, 0, None) >> max(bits - 8, 0)
        grey = np.clip(grey, 0, 255).astype(np.uint8)
    elif mode == "F":
        values = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=0.0,
                               neginf=0.0)
        scale = 255.0 if values.size and values.max() <= 1.0 else 1.0
        grey = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
    else:
        raise ValueError(f"{path}: image mode {mode!r} has no conversion to RGB "
                         f"(supported: {', '.join(RGB_MODES)})")
    return Image.fromarray(np.repeat(grey[..., None], 3, axis=-1))


def decode_pil(data: bytes, path: str) -> Image.Image:
    """Decodes encoded image bytes to an RGB PIL image, fully loaded.

    Every PIL mode becomes 8-bit RGB (see `to_rgb`). `path` only names the file in the error:
    a truncated or non-image file raises `CorruptImageError` naming it, because PIL's
    lazy decoding would otherwise fail much later (in a worker) or, with
    LOAD_TRUNCATED_IMAGES, silently return a half-grey image.
    """
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # forces the full decode; a truncated file raises here.
        img = to_rgb(img, path)
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ...
        raise CorruptImageError(path, err) from err
    if img.width == 0 or img.height == 0:
        raise CorruptImageError(path, ValueError(f"decoded to size {img.size}"))
    return img


def decode_image(data: bytes, path: str) -> np.ndarray:
    """Decodes encoded image bytes to uint8 [H, W, 3] RGB (see `decode_pil`)."""
    return np.asarray(decode_pil(data, path))


def read_image_file(path: str) -> np.ndarray:
    """Reads and decodes one image file.

    Raises FileNotFoundError (missing) or CorruptImageError (does not decode).
    """
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
        """uint8 [H, W, 3] RGB of record `index`."""
        return np.asarray(self.load_pil(index))

    def load_pil(self, index: int) -> Image.Image:
        """Record `index` as an RGB PIL image (the transforms' fast path: no array copy of
        the full-size image)."""
        return Image.fromarray(self.load_image(index))

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

    def load_pil(self, index: int) -> Image.Image:
        path = self.paths[index]
        with open(path, "rb") as f:
            data = f.read()
        return decode_pil(data, path)

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

    def load_pil(self, index: int) -> Image.Image:
        return decode_pil(self.read_bytes(index), self.describe(index))


class SubsetSource(Source):
    """Records `indices` of `parent`, with labels remapped to 0..m-1 in sorted label order.

    `relabel=False` keeps the parent's labels and class names instead: the subset of a
    query or gallery split must keep the mapping the two share.
    """

    def __init__(self, name: str, parent: Source, indices: Sequence[int], relabel: bool = True):
        indices = np.asarray(indices, dtype=np.int64)
        parent_labels = parent.labels[indices]
        cameras = None if parent.cameras is None else parent.cameras[indices]
        if relabel:
            kept = np.unique(parent_labels)
            labels = np.searchsorted(kept, parent_labels)
            class_names = [parent.class_names[k] for k in kept]
        else:
            labels, class_names = parent_labels, parent.class_names
        super().__init__(name, labels, cameras, class_names)
        self.parent = parent
        self.indices = indices

    def load_image(self, index: int) -> np.ndarray:
        return self.parent.load_image(int(self.indices[index]))

    def load_pil(self, index: int) -> Image.Image:
        return self.parent.load_pil(int(self.indices[index]))

    def describe(self, index: int) -> str:
        return self.parent.describe(int(self.indices[index]))


def num_classes(source: Source) -> int:
    """Number of classes of a split (the classifier width for the training split)."""
    return source.num_classes


def load_with_fallback(source: Source, index: int, skip_corrupt: bool,
                       members_of_class: Callable[[int], np.ndarray] | None = None,
                       known_bad: set | None = None) -> tuple:
    """Decodes record `index`; on a corrupt file either raises or uses another image of its class.

    Returns (RGB PIL image, the index actually decoded). With `skip_corrupt`, the
    replacement is the next record of the same class in index order (cycling), which keeps
    the P x K composition of the batch and is deterministic. `known_bad` (a set kept by
    the caller) makes each corrupt file logged and re-tried only once per process.
    """
    known_bad = set() if known_bad is None else known_bad
    if index not in known_bad:
        try:
            return source.load_pil(index), index
        except CorruptImageError as err:
            if not skip_corrupt:
                raise
            known_bad.add(index)
            logging.warning("skip_corrupt: %s; using another image of the same class", err)
    elif not skip_corrupt:
        return source.load_pil(index), index
    label = source.labels[index]
    members = (np.flatnonzero(source.labels == label) if members_of_class is None
               else members_of_class(int(label)))
    start = int(np.searchsorted(members, index))
    for other in np.roll(members, -start - 1):
        other = int(other)
        if other in known_bad:
            continue
        try:
            return source.load_pil(other), other
        except CorruptImageError as err:
            known_bad.add(other)
            logging.warning("skip_corrupt: %s", err)
    raise CorruptImageError(source.describe(index),
                            ValueError(f"every image of class {label} is corrupt"))
