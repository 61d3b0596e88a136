"""Retrieval metrics: Recall@K, precision@1, R-precision, MAP@R (and NMI on request).

Definitions (Musgrave et al., "A Metric Learning Reality Check", ECCV 2020), for a query q
with label y_q whose ranked neighbours (itself excluded) carry labels y_1, y_2, ...:

    R          = number of other items with label y_q (in the gallery, for query/gallery).
    recall@K   = 1 if any of y_1..y_K equals y_q, else 0 (the usual "Recall@K" of the
                              deep-metric-learning tables, which is a hit rate).
    precision@1 = [y_1 = y_q]   (equal to recall@1).
    r_precision = |{i <= R : y_i = y_q}| / R.
    map@r      = (1/R) * sum_{i <= R} [y_i = y_q] * P(i),  P(i) = |{j <= i : y_j = y_q}| / i.

Every value is the mean over queries. Queries with R = 0 (no other item of their label)
are excluded from every metric and counted in ``excluded_queries``; ``num_queries`` is the
number averaged over. Neighbours are exact Euclidean neighbours of the L2-normalised
embeddings; ties go to the smaller gallery index (see ``gl_jax.evaluation.exact_knn``).

Memory and time: metrics are computed inside each jitted block of queries and only
per-query scalars leave it: peak memory is O(block_size * n) whatever K and R are, and
nothing of size n x k is stored. Recall@K comes from the rank of the first same-label item,
found by counting the items ordered before it (no sort, so K = 1000 costs nothing extra);
MAP@R and R-precision use the block's top-k with k = max R.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gl_jax.evaluation import _checks
from gl_jax.evaluation import clustering
from gl_jax.evaluation import exact_knn as knn_lib


def per_query_from_hits(hits, r_counts):
    """Per-query quantities from a ranked hit matrix.

    Args:
        hits: (b, k) bool, ``hits[i, j]`` = the (j+1)-th neighbour of query i has its label.
        r_counts: (b,) int, R of each query; the caller guarantees k >= R.
    Returns:
        first_hit: (b,) int32 0-based rank of the first hit, k when there is none.
        r_precision: (b,) float32, 0 where R = 0.
        ap_at_r: (b,) float32 average precision at R, 0 where R = 0.
    """
    k = hits.shape[1]
    first_hit = jnp.where(hits.any(axis=1), jnp.argmax(hits, axis=1), k).astype(jnp.int32)
    rank = jnp.arange(1, k + 1, dtype=jnp.int32)
    hits_in_r = hits & (rank[None, :] <= r_counts[:, None])
    r_safe = jnp.maximum(r_counts, 1).astype(jnp.float32)
    r_precision = jnp.sum(hits_in_r, axis=1) / r_safe
    precision_at = jnp.cumsum(hits_in_r, axis=1) / rank[None, :].astype(jnp.float32)
    ap_at_r = jnp.sum(jnp.where(hits_in_r, precision_at, 0.0), axis=1) / r_safe
    return first_hit, r_precision, ap_at_r


def first_hit_by_counting(dist, is_positive):
    """0-based rank of the first positive without sorting: the number of items ordered before
    it by (distance, index). Returns n (the row length) when a row has no positive.

    Args:
        dist: (b, n) distances, +inf for excluded items (the query itself).
        is_positive: (b, n) bool.
    """
    n = dist.shape[1]
    col = jnp.arange(n, dtype=jnp.int32)[None, :]
    best = jnp.min(jnp.where(is_positive, dist, jnp.inf), axis=1, keepdims=True)
    best_idx = jnp.min(jnp.where(is_positive & (dist == best), col, n), axis=1, keepdims=True)
    before = (dist < best) | ((dist == best) & (col < best_idx))
    count = jnp.sum(before & jnp.isfinite(dist), axis=1, dtype=jnp.int32)
    return jnp.where(jnp.any(is_positive, axis=1), count, n)


@functools.partial(jax.jit, static_argnames=("k", "mode"))
def _fused_block(query_block, query_labels, query_r, row_offset, gallery, gallery_sq,
                 gallery_labels, *, k, mode):
    """Per-query metrics of a block. Recall@K needs only the rank of the first positive,
    found by counting (O(b n), no sort); MAP@R and R-precision need the top-k with
    k = max R, which is small on the usual benchmarks (11 on SOP)."""
    dist = knn_lib.block_distances(query_block, gallery, gallery_sq, row_offset, mode)
    is_positive = gallery_labels[None, :] == query_labels[:, None]
    if mode != knn_lib.CROSS:  # the query itself (at +inf) is not its own positive
        is_positive &= jnp.isfinite(dist)
    first_hit = first_hit_by_counting(dist, is_positive)
    _, idx = jax.lax.top_k(-dist, k)
    _, r_precision, ap_at_r = per_query_from_hits(
        gallery_labels[idx] == query_labels[:, None], query_r)
    return first_hit, r_precision, ap_at_r


@jax.jit
def _neighbour_block(neighbour_idx, query_labels, query_r, row_offset, gallery_labels):
    del row_offset
    return per_query_from_hits(gallery_labels[neighbour_idx] == query_labels[:, None], query_r)


def _summarise(per_query, r_counts, ks) -> dict[str, Any]:
    first_hit, r_precision, ap_at_r = per_query
    valid = r_counts > 0
    num_valid = int(valid.sum())
    if num_valid == 0:
        raise ValueError(
            f"no query has another item with its label (all {r_counts.size} queries would be "
            "excluded); retrieval metrics are undefined.")
    out: dict[str, Any] = {}
    for k in ks:
        out[f"recall@{k}"] = float(np.mean(first_hit[valid] < k))
    out["precision@1"] = float(np.mean(first_hit[valid] == 0))
    out["r_precision"] = float(np.mean(r_precision[valid], dtype=np.float64))
    out["map@r"] = float(np.mean(ap_at_r[valid], dtype=np.float64))
    out["num_queries"] = num_valid
    out["excluded_queries"] = int(r_counts.size - num_valid)
    return out


def _check_neighbours(neighbours, n_query: int, n_gallery: int, k_needed: int) -> np.ndarray:
    neighbours = np.asarray(neighbours)
    if neighbours.ndim != 2 or neighbours.shape[0] != n_query:
        raise ValueError(
            f"neighbours must have shape ({n_query}, k); got shape {neighbours.shape}.")
    if not np.issubdtype(neighbours.dtype, np.integer):
        raise ValueError(f"neighbours must hold integer indices; got dtype {neighbours.dtype}.")
    if neighbours.shape[1] < k_needed:
        raise ValueError(
            f"neighbours has {neighbours.shape[1]} columns but these metrics need the "
            f"{k_needed} nearest (max(ks) and the largest R).")
    neighbours = neighbours[:, :k_needed].astype(np.int32)
    if neighbours.min() < 0 or neighbours.max() >= n_gallery:
        raise ValueError(
            f"neighbours holds indices outside [0, {n_gallery}): min {neighbours.min()}, "
            f"max {neighbours.max()}.")
    return neighbours


def _compute(query, query_codes, query_r, gallery, gallery_codes, ks, *, mode, normalize,
             block_size, neighbours, rerank, gallery_given):
    k_needed = int(max(max(ks), query_r.max()))  # neighbours a precomputed ranking must hold
    if rerank is not None:
        from gl_jax.evaluation import reranking  # local: reranking imports knn only
        _, neighbours = reranking.k_reciprocal_rerank(
            query, gallery if gallery_given else None, top_k=k_needed, normalize=normalize,
            block_size=block_size, **dict(rerank))
    if neighbours is not None:
        neighbours = _check_neighbours(neighbours, query.shape[0], gallery.shape[0], k_needed)
        per_query = knn_lib.run_blocked(
            _neighbour_block, neighbours, (gallery_codes,), query_extras=(query_codes, query_r),
            block_size=block_size)
    else:
        if normalize:
            query = knn_lib.l2_normalize(query)
            gallery = query if not gallery_given else knn_lib.l2_normalize(gallery)
        gallery_sq = np.sum(gallery ** 2, axis=1)
        per_query = knn_lib.run_blocked(
            _fused_block, query, (gallery, gallery_sq, gallery_codes),
            query_extras=(query_codes, query_r), block_size=block_size,
            k=max(int(query_r.max()), 1), mode=mode)
    return _summarise(per_query, query_r, ks)


def retrieval_metrics(embeddings, labels, ks: Sequence[int] = (1, 2, 4, 8), *,
                      nmi: bool = True, normalize: bool = True,
                      block_size: int = knn_lib.DEFAULT_BLOCK_SIZE, neighbours=None,
                      rerank: Mapping[str, Any] | None = None, seed: int = 0,
                      nmi_backend: str = "sklearn") -> dict[str, Any]:
    """Retrieval metrics where every item queries all the others (CUB, Cars, SOP protocol).

    Args:
        embeddings: (n, d) numpy or jax array, finite; any real dtype (bfloat16 included),
            computed in float32.
        labels: (n,) class labels (any dtype np.unique can sort).
        ks: cut-offs for recall@K, each <= n - 1. CUB/Cars (1, 2, 4, 8); SOP (1, 10, 100, 1000).
        nmi: also compute NMI (k-means with k = number of classes, see
            ``gl_jax.evaluation.clustering.nmi`` for its cost: at SOP size, 11,316 clusters, it
            takes far longer than the retrieval metrics; switch it off for per-epoch checks).
        normalize: L2-normalise the embeddings before the Euclidean kNN (and k-means).
        block_size: queries per jitted block; peak memory about 4 * block_size * n bytes.
        neighbours: optional precomputed (n, k) ranked neighbour indices, self excluded
            (e.g. from ``k_reciprocal_rerank(..., top_k=k)``); k >= max(max(ks), max R).
        rerank: optional dict of ``k_reciprocal_rerank`` arguments (``k1``, ``k2``,
            ``lambda_value``): rank by k-reciprocal re-ranked distances instead (query = gallery =
            the whole set). NMI always uses the embeddings.
        seed: k-means seed.
        nmi_backend: "sklearn" (default), "faiss" or "auto".
    Returns:
        dict with float ``recall@K`` per K, ``precision@1``, ``r_precision``, ``map@r``,
        ``nmi`` (if requested) and int ``num_queries``, ``excluded_queries``.
    Raises:
        ValueError: non-finite embeddings, length mismatch, K > n - 1, all queries excluded.
    """
    x = _checks.as_embeddings("embeddings", embeddings)
    y = _checks.as_labels("labels", labels, x.shape[0], "embeddings")
    ks = _checks.as_ks("ks", ks, x.shape[0] - 1, "n - 1, the number of other items")
    if neighbours is not None and rerank is not None:
        raise ValueError("give either neighbours or rerank, not both.")
    (codes,) = _checks.encode_labels(y)
    r_counts = (np.bincount(codes)[codes] - 1).astype(np.int32)
    out = _compute(x, codes, r_counts, x, codes, ks, mode=knn_lib.EXCLUDE_SELF,
                   normalize=normalize, block_size=block_size, neighbours=neighbours,
                   rerank=rerank, gallery_given=False)
    if nmi:
        out["nmi"] = clustering.nmi(x, y, seed=seed, normalize=normalize, backend=nmi_backend)
    return out


def retrieval_metrics_query_gallery(query_embeddings, query_labels, gallery_embeddings,
                                    gallery_labels,
                                    ks: Sequence[int] = (1, 10, 20, 30, 40, 50), *,
                                    normalize: bool = True,
                                    block_size: int = knn_lib.DEFAULT_BLOCK_SIZE,
                                    neighbours=None,
                                    rerank: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Retrieval metrics of queries against a separate gallery (In-Shop protocol).

    Same definitions as ``retrieval_metrics``, with R = number of gallery items carrying the
    query's label; queries whose label is absent from the gallery are excluded and counted.
    No item is excluded from the gallery (query and gallery are disjoint image sets).

    Args:
        query_embeddings, gallery_embeddings: (n_query, d) and (n_gallery, d), finite.
        query_labels, gallery_labels: (n_query,), (n_gallery,).
        ks: cut-offs, each <= n_gallery; In-Shop uses (1, 10, 20, 30, 40, 50).
        neighbours: optional precomputed (n_query, k) ranked gallery indices.
        rerank: optional ``k_reciprocal_rerank`` arguments to rank by re-ranked distances.
    Returns:
        dict as ``retrieval_metrics`` without ``nmi``.
    """
    q, g = _checks.as_query_gallery(query_embeddings, gallery_embeddings)
    qy = _checks.as_labels("query_labels", query_labels, q.shape[0], "query_embeddings")
    gy = _checks.as_labels("gallery_labels", gallery_labels, g.shape[0], "gallery_embeddings")
    ks = _checks.as_ks("ks", ks, g.shape[0], "the gallery size")
    if neighbours is not None and rerank is not None:
        raise ValueError("give either neighbours or rerank, not both.")
    q_codes, g_codes = _checks.encode_labels(qy, gy)
    class_counts = np.bincount(g_codes, minlength=int(max(q_codes.max(), g_codes.max())) + 1)
    r_counts = class_counts[q_codes].astype(np.int32)
    return _compute(q, q_codes, r_counts, g, g_codes, ks, mode=knn_lib.CROSS,
                    normalize=normalize, block_size=block_size, neighbours=neighbours,
                    rerank=rerank, gallery_given=True)
