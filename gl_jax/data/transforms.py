"""Image transforms (NumPy + PIL): random resized crop, flip, resize + center crop, normalise.

All randomness comes from a `np.random.Generator` the caller derives from (seed, step,
position in the global batch), so an augmented batch is reproducible and independent
of the number of hosts and workers.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

NORMALIZATIONS = ("caffe_bgr", "imagenet", "unit")
# BN-Inception (Caffe): 0-255 BGR, mean [104, 117, 128] in BGR order, std 1.
CAFFE_BGR_MEAN = np.asarray([104.0, 117.0, 128.0], np.float32)
IMAGENET_MEAN = np.asarray([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.asarray([0.229, 0.224, 0.225], np.float32)

_RESAMPLE = {"bilinear": Image.BILINEAR, "nearest": Image.NEAREST, "bicubic": Image.BICUBIC}


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


def _resize(image: np.ndarray, height: int, width: int, interpolation: str) -> np.ndarray:
    if image.shape[0] == height and image.shape[1] == width:
        return image
    pil = Image.fromarray(image).resize((width, height), _RESAMPLE[interpolation])
    return np.asarray(pil)


def train_transform(image: np.ndarray, rng: np.random.Generator, image_size: int,
                    scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip: bool = True,
                    interpolation: str = "bilinear") -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [S, S, 3]: random resized crop, then horizontal flip (p = .5)."""
    top, left, h, w = random_resized_crop_box(image.shape[0], image.shape[1], rng, scale, ratio)
    out = _resize(image[top:top + h, left:left + w], image_size, image_size, interpolation)
    # always draw, so the stream of random numbers does not depend on `flip`.
    if rng.random() < 0.5 and flip:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def eval_transform(image: np.ndarray, image_size: int, resize_size: int,
                   interpolation: str = "bilinear") -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [S, S, 3]: shorter side to `resize_size`, center crop S."""
    height, width = image.shape[:2]
    if height <= width:
        new_h, new_w = resize_size, max(1, int(resize_size * width / height))
    else:
        new_h, new_w = max(1, int(resize_size * height / width)), resize_size
    image = _resize(image, new_h, new_w, interpolation)
    if image_size > min(new_h, new_w):
        raise ValueError(f"image_size={image_size} is larger than resize_size={resize_size}")
    # torchvision's CenterCrop offsets: round((size_in - size_out) / 2).
    top = int(round((new_h - image_size) / 2.0))
    left = int(round((new_w - image_size) / 2.0))
    return np.ascontiguousarray(image[top:top + image_size, left:left + image_size])


def normalize(images: np.ndarray, normalization: str) -> np.ndarray:
    """uint8 [..., 3] RGB -> float32 network input.

    caffe_bgr: x[..., ::-1] - [104, 117, 128] (0-255 range, BGR, BN-Inception);
    imagenet: (x / 255 - mean) / std with torchvision's RGB mean/std;
    unit: x / 255.
    """
    x = images.astype(np.float32)
    if normalization == "caffe_bgr":
        return x[..., ::-1] - CAFFE_BGR_MEAN
    if normalization == "imagenet":
        return (x / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    if normalization == "unit":
        return x / 255.0
    raise ValueError(f"normalization={normalization!r} is not one of {NORMALIZATIONS}")
