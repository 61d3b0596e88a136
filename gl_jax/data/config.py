"""Default `config.data` and `config.sampler` sections (configs/common.py copies them)."""
from __future__ import annotations

import ml_collections

# Reference section 2: classes x samples per batch of the official recipe.
PAPER_PK = {"cub200": (6, 9), "tfds_cub200": (6, 9), "cars196": (5, 7), "tfds_cars196": (5, 7),
            "sop": (10, 6), "digits": (4, 8)}


def default_config(name: str = "digits") -> ml_collections.ConfigDict:
    """`config.data` with the recommended values for dataset `name`.

    digits: 16 px (8x8 upsampled bilinearly), 'unit' normalisation, no augmentation.
    Every other dataset: the paper's 227 px random-resized-crop + flip for training,
    resize 256 + center crop 227 for evaluation, Caffe BGR normalisation (BN-Inception).
    """
    digits = name == "digits"
    c = ml_collections.ConfigDict()
    c.name = name
    c.root = ""                    # dataset folder (or TFDS data_dir); unused for digits
    c.val_classes = 0              # training classes carved off as a class-disjoint 'val'
    c.train_classes = 0            # image_folder only: 0 = first half of the sorted classes
    c.image_size = 16 if digits else 227
    c.resize_size = 16 if digits else 256   # eval: shorter side resized to this, then crop
    c.interpolation = "bilinear"   # 'bilinear' | 'nearest' | 'bicubic'
    c.normalization = "unit" if digits else "caffe_bgr"   # | "imagenet" | "tf_lite"
    c.augment = not digits         # False: the eval transform also for training
    c.crop_scale = (0.08, 1.0)     # torchvision RandomResizedCrop defaults
    c.crop_ratio = (3.0 / 4.0, 4.0 / 3.0)
    c.flip = True
    c.skip_corrupt = False         # True: log a corrupt file, use another image of its class
    c.worker_count = 0             # grain worker processes; 0 = decode in this process
    c.read_threads = 2             # threads per process that prepare whole batches ahead
    c.prefetch_batches = 2         # batches prepared ahead per process
    c.seed = 0                     # sampler order and augmentation
    return c


def default_sampler_config(name: str = "digits") -> ml_collections.ConfigDict:
    """`config.sampler`: P x K from the paper's table (reference section 2), mode 'official'."""
    c = ml_collections.ConfigDict()
    c.classes_per_batch, c.samples_per_class = PAPER_PK.get(name, (6, 9))
    c.mode = "official"            # | 'balanced'
    return c
