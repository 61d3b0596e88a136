"""Input pipeline: dataset sources and splits, the P x K sampler, transforms, grain iterators.

Imports nothing else of gl_jax (in particular not gl_jax.models).
"""
from gl_jax.data.config import default_config, default_sampler_config
from gl_jax.data.layouts import digits_source, image_folder_source, reid_junk_labels
from gl_jax.data.registry import DATASETS, Dataset, load_splits
from gl_jax.data.pipeline import (eval_steps, make_eval_iterator, make_sampler,
                                  make_train_iterator, steps_per_epoch, validate_data_config)
from gl_jax.data.sampler import PKSampler, host_slice
from gl_jax.data.scan import DataCheckError, ScanReport, scan_splits
from gl_jax.data.sources import (ArraySource, CorruptImageError, EncodedSource, FileSource,
                                 Source, SubsetSource, decode_image, num_classes)
from gl_jax.data.transforms import (eval_transform, normalization_table, normalize,
                                    train_transform)

__all__ = [
    "ArraySource", "CorruptImageError", "DATASETS", "DataCheckError", "Dataset", "EncodedSource",
    "FileSource", "PKSampler", "ScanReport", "Source", "SubsetSource", "decode_image",
    "default_config", "default_sampler_config", "digits_source", "eval_steps", "eval_transform",
    "host_slice", "image_folder_source", "load_splits", "make_eval_iterator", "make_sampler",
    "make_train_iterator", "normalization_table", "normalize", "num_classes",
    "reid_junk_labels", "scan_splits", "steps_per_epoch", "train_transform",
    "validate_data_config",
]
