"""Default `config.data` and `config.sampler` sections (configs/common.py copies them)."""
from __future__ import annotations

import ml_collections

from gl_jax.data import registry


def default_config(name: str = "digits") -> ml_collections.ConfigDict:
    """`config.data` with the recommended values for dataset `name`.

    The paper's 227 px random-resized-crop + flip for training, resize 256 + center crop
    227 for evaluation, Caffe BGR normalisation (BN-Inception); a dataset's registry entry
    may override these (digits: 16 px, 'unit' normalisation, no augmentation).
    """
    c = ml_collections.ConfigDict()
    c.name = name
    c.root = ""                    # dataset folder (or TFDS data_dir); unused for digits
    c.val_classes = 0              # training classes carved off as a class-disjoint 'val'
    c.train_classes = 0            # image_folder only: 0 = first half of the sorted classes
    c.image_size = 227
    c.resize_size = 256            # eval: shorter side resized to this, then crop
    c.interpolation = "bilinear"   # 'bilinear' | 'nearest' | 'bicubic'
    c.normalization = "caffe_bgr"  # | "imagenet" | "tf_lite" | "unit"
    c.augment = True               # False: the eval transform also for training
    c.crop_scale = (0.08, 1.0)     # torchvision RandomResizedCrop defaults
    c.crop_ratio = (3.0 / 4.0, 4.0 / 3.0)
    c.flip = True
    c.skip_corrupt = False         # True: unreadable files are logged and left out
    c.scan = "header"              # before training, every file: 'header' | 'full' | 'off'
                                   # (gl_jax.data.scan: 'header' decodes cheaply)
    c.worker_count = 0             # grain worker processes; 0 = decode in this process
    c.read_threads = 2             # threads per process that prepare whole batches ahead
    c.prefetch_batches = 2         # batches prepared ahead per process
    c.seed = 0                     # sampler order and augmentation
    c.update(registry.get(name).data_overrides)
    return c


def default_sampler_config(name: str = "digits") -> ml_collections.ConfigDict:
    """`config.sampler`: the dataset's P x K (the published recipe's), mode 'official'."""
    c = ml_collections.ConfigDict()
    c.classes_per_batch, c.samples_per_class = registry.get(name).batch
    c.mode = "official"            # | 'balanced'
    c.undrawable = "error"         # classes the sampler can never draw: 'error' | 'warn'
    return c
