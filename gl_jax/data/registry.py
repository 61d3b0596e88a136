"""Every dataset gl_jax knows, in one table: how to load it and how to use it.

One `Dataset` entry holds all that the rest of the package needs to know about a
dataset: its loader (`config.data` -> class-disjoint splits), whether it needs
`data.root`, the P x K batch of the published recipe, how it is evaluated
('retrieval': the test split against itself; 'query_gallery'; 'reid': query/gallery with
cameras and junk ids), its Group Loss++ inference defaults, and any `config.data` values
that differ from the common ones. Adding a dataset = one entry here + one config file.

Imports nothing of gl_jax outside gl_jax.data.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping

import logging

from gl_jax.data import layouts
from gl_jax.data import omniglot

EVAL_KINDS = ("retrieval", "query_gallery", "reid")


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str
    # (root, val_classes, data_config) -> {'train', 'test' | ('query', 'gallery'), ['val']}
    load: Callable[[str, int, Any], dict]
    needs_root: bool = True
    batch: tuple[int, int] = (6, 9)          # classes x samples per batch (the recipe's)
    eval_kind: str = "retrieval"
    # Group Loss++ switches (gl_jax.strategies.Settings fields) and where they come from;
    # None = no published values (the strategies module's fallback).
    strategies: Mapping[str, Any] | None = None
    data_overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)


_REFERENCE = "Group Loss++ paper / co-author's code"
_RETRIEVAL_RERANK = dict(rerank_k1=50, rerank_k2=20, rerank_lambda=0.94)
_CUB_STRATEGIES = dict(pool_mix=0.5, leak=0.75, beta=0.004, **_RETRIEVAL_RERANK,
                       source=_REFERENCE)
_CARS_STRATEGIES = dict(pool_mix=0.5, leak=0.0, beta=0.004, **_RETRIEVAL_RERANK,
                        source=_REFERENCE)
# No published re-id values: CUB's switches with Zhong et al.'s re-id re-ranking.
_REID_STRATEGIES = dict(pool_mix=0.5, leak=0.75, beta=0.004, rerank_k1=20, rerank_k2=6,
                        rerank_lambda=0.3,
                        source="not published: CUB values, Zhong et al.'s re-id re-ranking")


def _tfds(builder: str, num_train_classes: int, name: str):
    return lambda root, val, c: layouts.load_tfds_splits(builder, root, num_train_classes,
                                                         name, val)


def _reid(name: str):
    return lambda root, val, c: layouts.load_reid_splits(root, name, val)


_ENTRIES = (
    Dataset("digits", lambda root, val, c: layouts.load_digits_splits(val), needs_root=False,
            batch=(4, 8),
            # 8 x 8 images: upsampled to 16 px, pixel values scaled to [0, 1], no crops.
            data_overrides=dict(image_size=16, resize_size=16, normalization="unit",
                                augment=False)),
    # The embedded default: two Omniglot zips shipped in the package (`root` = another
    # folder holding them); train and test alphabets disjoint.
    Dataset("omniglot", lambda root, val, c: omniglot.load_omniglot_splits(
        root, val, int(c.get("drawers", 0))), needs_root=False, batch=(16, 4)),
    Dataset("image_folder", lambda root, val, c: layouts.load_image_folder_splits(
        root, val, int(c.get("train_classes", 0)))),
    Dataset("cub200", lambda root, val, c: layouts.load_cub_splits(root, val),
            batch=(6, 9), strategies=_CUB_STRATEGIES),
    Dataset("cars196", lambda root, val, c: layouts.load_cars_splits(root, val),
            batch=(5, 7), strategies=_CARS_STRATEGIES),
    Dataset("sop", lambda root, val, c: layouts.load_sop_splits(root, val), batch=(10, 6),
            strategies=dict(pool_mix=0.6, leak=1.0, beta=0.0005, **_RETRIEVAL_RERANK,
                            source=_REFERENCE)),
    Dataset("inshop", lambda root, val, c: layouts.load_inshop_splits(root, val),
            eval_kind="query_gallery",
            strategies=dict(pool_mix=0.57, leak=1.0, beta=0.002, rerank_k1=6, rerank_k2=2,
                            rerank_lambda=0.4, source=_REFERENCE)),
    Dataset("market1501", _reid("market1501"), eval_kind="reid", batch=(8, 4),
            strategies=_REID_STRATEGIES),
    Dataset("dukemtmc", _reid("dukemtmc"), eval_kind="reid", batch=(8, 4),
            strategies=_REID_STRATEGIES),
    # TFDS builders: `root` is the TFDS data_dir (empty = TFDS's default).
    Dataset("tfds_cub200", _tfds("caltech_birds2011", 100, "tfds_cub200"), needs_root=False,
            batch=(6, 9), strategies=_CUB_STRATEGIES),
    Dataset("tfds_cars196", _tfds("cars196", 98, "tfds_cars196"), needs_root=False,
            batch=(5, 7), strategies=_CARS_STRATEGIES),
)
DATASETS: Mapping[str, Dataset] = {d.name: d for d in _ENTRIES}
for _d in _ENTRIES:
    assert _d.eval_kind in EVAL_KINDS, _d


def get(name: str) -> Dataset:
    """The entry of `name`; ValueError naming the known datasets otherwise."""
    if name not in DATASETS:
        raise ValueError(f"data.name = {name!r} is not one of the known datasets "
                         f"{tuple(DATASETS)}.")
    return DATASETS[name]


def load_splits(data_config) -> dict:
    """`config.data` -> {'train', 'test' | ('query', 'gallery'), ['val']} sources.

    Raises ValueError for an unknown name, FileNotFoundError for a missing root or list
    file and NotADirectoryError for a root that is a file, before any training starts.
    """
    dataset = get(data_config.name)
    root = os.path.expanduser(str(data_config.get("root", "") or ""))
    if dataset.needs_root:
        if not root:
            raise ValueError(f"data.root must be set for data.name={dataset.name!r}")
        if os.path.exists(root) and not os.path.isdir(root):
            raise NotADirectoryError(f"{dataset.name}: data.root {root!r} is a file, not a "
                                     "folder")
        if not os.path.isdir(root):
            raise FileNotFoundError(f"{dataset.name}: folder {root!r} does not exist")
    splits = dataset.load(root, int(data_config.get("val_classes", 0)), data_config)
    for source in splits.values():
        logging.info("data %s: %d images, %d classes", source.name, len(source),
                     source.num_classes)
    return splits
