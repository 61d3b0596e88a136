"""The evaluation protocol: which metrics for which kind of dataset, in one place.

The dataset registry says how a dataset is evaluated ('retrieval': the test split
ranked against itself; 'query_gallery': queries against a separate gallery; 'reid': the
same with cameras, CMC and mAP). The trainer (per epoch and at the end, through
`evaluate_split`) and the evaluator (`gl_jax.ablation`, with its model variants) both
embed the parts `eval_kind` names and call `metrics`.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from gl_jax import data as gdata
from gl_jax import evaluation
from gl_jax import runtime


def eval_kind(splits: dict, dataset: str, split: str = "test") -> tuple[str, tuple[str, ...]]:
    """(kind, parts to embed) for evaluating `split` of a dataset.

    'val' (and 'test' where it exists) is 'retrieval' over that split. A dataset without a
    'test' split is evaluated query vs gallery: 'reid' when its registry entry says so and
    every query has a camera, else 'query_gallery'."""
    if split != "test" or "test" in splits:
        if split not in splits:
            raise ValueError(f"dataset {dataset!r} has no {split!r} split (has {sorted(splits)})")
        return "retrieval", (split,)
    if "query" not in splits or "gallery" not in splits:
        raise ValueError(f"dataset {dataset!r} has neither a 'test' split nor 'query' and "
                         f"'gallery' splits (has {sorted(splits)})")
    cameras = splits["query"].cameras
    registered = gdata.DATASETS.get(dataset)
    if (registered is not None and registered.eval_kind == "reid" and cameras is not None
            and np.min(cameras) >= 0):
        return "reid", ("query", "gallery")
    return "query_gallery", ("query", "gallery")


def junk_labels(splits: dict, kind: str) -> tuple[int, ...]:
    """Dense labels that are never matches in a re-id evaluation (none otherwise)."""
    return gdata.reid_junk_labels(splits["query"]) if kind == "reid" else ()


def usable_ks(config, limit: int) -> tuple[int, ...]:
    """`config.evals.ks` up to `limit` (the items a query can rank); none -> ValueError."""
    ks = tuple(int(k) for k in config.evals.ks if int(k) <= limit)
    if not ks:
        raise ValueError(f"config.evals.ks = {tuple(config.evals.ks)}: every K exceeds {limit}, "
                         "the number of items to rank")
    return ks


def metrics(kind: str, embedded: dict, config, *, normalize: bool = True, rerank=None,
            junk_ids: Sequence[int] = (), nmi: bool | None = None) -> dict:
    """The protocol's metrics of `kind` from embedded parts.

    `embedded` maps each part ('test' / 'val', or 'query' and 'gallery') to a dict with
    'embedding' [n, d], 'label' [n] and, for re-id, 'camera' [n]. `nmi` None follows
    `config.evals.nmi` (retrieval only); `rerank` ranks by k-reciprocal re-ranked
    distances."""
    nmi = bool(config.evals.nmi) if nmi is None else nmi
    if kind == "retrieval":
        (part,) = embedded.values()
        n = len(part["label"])
        return evaluation.retrieval_metrics(
            part["embedding"], part["label"], ks=usable_ks(config, n - 1), nmi=nmi,
            normalize=normalize, rerank=rerank, seed=int(config.seed))
    query, gallery = embedded["query"], embedded["gallery"]
    ks = usable_ks(config, len(gallery["label"]))
    if kind == "reid":
        return evaluation.reid_metrics(
            query["embedding"], query["label"], query["camera"], gallery["embedding"],
            gallery["label"], gallery["camera"], ranks=ks, normalize=normalize, rerank=rerank,
            junk_ids=junk_ids)
    return evaluation.retrieval_metrics_query_gallery(
        query["embedding"], query["label"], gallery["embedding"], gallery["label"], ks=ks,
        normalize=normalize, rerank=rerank)


def evaluate_split(embedder: runtime.Embedder, params, model_state, splits: dict, split: str,
                   config, mesh, features: dict | None = None) -> dict:
    """Embeds what evaluating `split` needs ('test' = query vs gallery where the dataset has
    no test split) with one model and returns the protocol's metrics. `features`: split
    name -> pooled backbone features, for an embedder that runs only the head."""
    kind, parts = eval_kind(splits, str(config.data.name), split)
    embedded = {}
    for part in parts:
        out = runtime.embed_source([(embedder, params, model_state)], splits[part], config, mesh,
                                   desc=f"embed {part}",
                                   features=None if features is None else features[part])
        embedded[part] = dict(out, embedding=out["embeddings"][0]["embedding"])
    return metrics(kind, embedded, config, junk_ids=junk_labels(splits, kind))


def metric_names(kind: str, ks, nmi: bool) -> set[str]:
    """The names of the metrics `metrics` reports for `kind` (without the counts)."""
    if kind == "reid":
        return {f"rank@{int(k)}" for k in ks} | {"map", "minp"}
    names = {f"recall@{int(k)}" for k in ks} | {"precision@1", "r_precision", "map@r"}
    return names | ({"nmi"} if nmi and kind == "retrieval" else set())


def selection_key(name: str, kind: str) -> str:
    """The metric name a kind reports for `name`: re-id reports CMC 'rank@K' for
    'recall@K' (and retrieval 'recall@K' for 'rank@K')."""
    if kind == "reid" and name.startswith("recall@"):
        return "rank@" + name.split("@", 1)[1]
    if kind != "reid" and name.startswith("rank@"):
        return "recall@" + name.split("@", 1)[1]
    return name
