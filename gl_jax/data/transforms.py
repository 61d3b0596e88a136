"""Image transforms (NumPy + PIL): random resized crop, flip, resize + center crop, normalise.

All randomness comes from a `np.random.Generator` the caller derives from (seed, step,
position in the global batch), so an augmented batch is reproducible and independent
of the number of hosts and workers.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

NORMALIZATIONS = ("caffe_bgr", "imagenet", "tf_lite", "unit")
# BN-Inception (Caffe): 0-255 BGR, mean [104, 117, 128] in BGR order, std 1.
CAFFE_BGR_MEAN = np.asarray([104.0, 117.0, 128.0], np.float32)
IMAGENET_MEAN = np.asarray([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.asarray([0.229, 0.224, 0.225], np.float32)

RESAMPLING = {"bilinear": Image.BILINEAR, "nearest": Image.NEAREST, "bicubic": Image.BICUBIC}


def random_resized_crop_box(height: int, width: int, rng: np.random.Generator,
                            scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a crop with area fraction ~ U(scale), log aspect ~ U(log ratio).

    torchvision's RandomResizedCrop rule: 10 tries; then a center crop with the aspect
    ratio clamped to `ratio`.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def _as_pil(image) -> Image.Image:
    return image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))


def train_transform(image, rng: np.random.Generator, image_size: int, scale=(0.08, 1.0),
                    ratio=(3 / 4, 4 / 3), flip: bool = True,
                    interpolation: str = "bilinear") -> np.ndarray:
    """RGB PIL image or uint8 [H, W, 3] -> uint8 [S, S, 3]: random resized crop, then a
    horizontal flip with probability 1/2 (torchvision's crop-then-resize order)."""
    image = _as_pil(image)
    top, left, h, w = random_resized_crop_box(image.height, image.width, rng, scale, ratio)
    out = image.crop((left, top, left + w, top + h))
    out = out.resize((image_size, image_size), RESAMPLING[interpolation])
    # always draw, so the stream of random numbers does not depend on `flip`.
    if rng.random() < 0.5 and flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(out)


def eval_transform(image, image_size: int, resize_size: int,
                   interpolation: str = "bilinear") -> np.ndarray:
    """RGB PIL image or uint8 [H, W, 3] -> uint8 [S, S, 3]: shorter side to `resize_size`
    (the longer one scaled by the same factor, truncated as torchvision does), then the
    center S x S crop."""
    if image_size > resize_size:
        raise ValueError(f"image_size={image_size} is larger than resize_size={resize_size}")
    image = _as_pil(image)
    width, height = image.size
    if height <= width:
        new_h, new_w = resize_size, max(1, int(resize_size * width / height))
    else:
        new_h, new_w = max(1, int(resize_size * height / width)), resize_size
    if (new_w, new_h) != image.size:
        image = image.resize((new_w, new_h), RESAMPLING[interpolation])
    # torchvision's CenterCrop offsets: round((size_in - size_out) / 2).
    top = int(round((new_h - image_size) / 2.0))
    left = int(round((new_w - image_size) / 2.0))
    return np.asarray(image.crop((left, top, left + image_size, top + image_size)))


# per preset: (input channel for each output channel, scale, offset): out = x * scale + offset.
_PRESETS = {
    "caffe_bgr": ((2, 1, 0), np.ones(3, np.float32), -CAFFE_BGR_MEAN),
    "imagenet": ((0, 1, 2), (1.0 / (255.0 * IMAGENET_STD)).astype(np.float32),
                 (-IMAGENET_MEAN / IMAGENET_STD).astype(np.float32)),
    "tf_lite": ((0, 1, 2), np.full(3, 1.0 / 128.0, np.float32),
                np.full(3, -127.0 / 128.0, np.float32)),
    "unit": ((0, 1, 2), np.full(3, 1.0 / 255.0, np.float32), np.zeros(3, np.float32)),
}


def normalize(images: np.ndarray, normalization: str) -> np.ndarray:
    """uint8 [..., 3] RGB -> float32 network input.

    caffe_bgr: x[..., ::-1] - [104, 117, 128] (0-255 range, BGR, BN-Inception);
    imagenet: (x / 255 - mean) / std with torchvision's RGB mean/std;
    tf_lite: (x - 127) / 128 on 0-255 RGB (TensorFlow's EfficientNet-Lite);
    unit: x / 255.
    Written channel by channel: 3x faster than the broadcast expression on a batch.
    """
    if normalization not in _PRESETS:
        raise ValueError(f"normalization={normalization!r} is not one of {NORMALIZATIONS}")
    order, scale, offset = _PRESETS[normalization]
    images = np.asarray(images)
    out = np.empty(images.shape, np.float32)
    for j, c in enumerate(order):
        channel = out[..., j]
        np.multiply(images[..., c], scale[j], out=channel, dtype=np.float32)
        channel += offset[j]
    return out


def normalization_table(normalization: str) -> tuple[tuple[int, ...], np.ndarray]:
    """(order, table [256, 3] float32) with normalize(x)[..., j] == table[x[..., order[j]], j]
    bit for bit: `normalize` expressed as a lookup, for normalising uint8 batches on the
    device (`gl_jax.runtime.normalize_images`). A multiply-add computed there may be fused
    into one rounding (XLA does so on CPU for `imagenet`) and differ by an ulp; looking up
    the host's own values cannot."""
    if normalization not in _PRESETS:
        raise ValueError(f"normalization={normalization!r} is not one of {NORMALIZATIONS}")
    levels = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)
    return _PRESETS[normalization][0], normalize(levels, normalization)
