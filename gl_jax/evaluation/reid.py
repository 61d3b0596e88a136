"""Person re-identification metrics: CMC rank@K, mAP and mINP (Market-1501 / DukeMTMC-reID).

Protocol, for each query with person id p and camera c, over the gallery ranked by
increasing distance (ties: smaller gallery index first):

* gallery items with id p AND camera c are removed from the ranking (same-camera shots
    of the same person are too easy);
* items whose id is in ``junk_ids`` (Market's 0 "junk" and -1 "distractor") are never
    matches: they stay in the ranking as non-matches, as the common Python evaluation code
    does, or are removed with ``remove_junk=True`` (the Market MATLAB kit removes -1);
* matches are the remaining items with id p (none when p itself is a junk id); a query left
    without any match is skipped and counted in ``skipped_queries``.

With matches at ranks r_1 < ... < r_P (1-based, among the kept items):
    rank@K (CMC) = [r_1 <= K];  AP = (1/P) sum_j j / r_j;  INP = P / r_P  (Ye et al., 2021).
``map`` and ``minp`` are the means of AP and INP over the evaluated queries.

Cost: the distances are computed in jitted blocks of queries; each block is fully sorted
(AP needs the whole ranking): O(n_query * n_gallery * (d + log n_gallery)) time,
O(block_size * n_gallery) memory. Market-1501 (3,368 x 19,732) takes a few seconds.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from gl_jax.evaluation import _checks
from gl_jax.evaluation import exact_knn as knn_lib

DEFAULT_REID_BLOCK_SIZE = 256


@functools.partial(jax.jit, static_argnames=())
def _distance_block(query_block, row_offset, gallery, gallery_sq):
    return (knn_lib.block_distances(query_block, gallery, gallery_sq, row_offset, knn_lib.CROSS),)


def _per_query(dist, q_ids, q_cams, g_ids, g_cams, junk, remove_junk):
    """AP, INP, first-match rank (0 if none) and match count for a block of queries."""
    same_id = q_ids[:, None] == g_ids[None, :]
    removed = same_id & (q_cams[:, None] == g_cams[None, :])
    g_junk = np.isin(g_ids, junk)
    if remove_junk:
        removed |= g_junk[None, :]
    matches = same_id & ~removed & ~g_junk[None, :]
    # Stable sort: equal distances keep the smaller gallery index first.
    order = np.argsort(dist, axis=1, kind="stable")
    kept = ~np.take_along_axis(removed, order, axis=1)
    is_match = np.take_along_axis(matches, order, axis=1)
    rank = np.cumsum(kept, axis=1)            # 1-based rank among kept items
    match_count = np.cumsum(is_match, axis=1)  # matches up to and including this position
    num_matches = match_count[:, -1]
    safe = np.maximum(num_matches, 1)
    ap = np.sum(np.where(is_match, match_count / np.maximum(rank, 1), 0.0), axis=1) / safe
    first_rank = np.where(num_matches > 0, np.take_along_axis(
        rank, np.argmax(is_match, axis=1)[:, None], axis=1)[:, 0], 0)
    last_pos = is_match.shape[1] - 1 - np.argmax(is_match[:, ::-1], axis=1)
    last_rank = np.take_along_axis(rank, last_pos[:, None], axis=1)[:, 0]
    inp = np.where(num_matches > 0, num_matches / np.maximum(last_rank, 1), 0.0)
    return ap, inp, first_rank, num_matches


def reid_metrics(query_embeddings, query_ids, query_cameras, gallery_embeddings,
                 gallery_ids, gallery_cameras, ranks: Sequence[int] = (1, 5, 10), *,
                 junk_ids: Sequence[int] = (0, -1), remove_junk: bool = False,
                 normalize: bool = True, block_size: int = DEFAULT_REID_BLOCK_SIZE,
                 distances=None, rerank: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """CMC rank@K, mAP and mINP of queries against a gallery, re-id protocol (see module doc).

    Args:
        query_embeddings: (n_query, d) finite array; may be None when ``distances`` is given.
        query_ids, query_cameras: (n_query,) integer person ids and camera ids.
        gallery_embeddings: (n_gallery, d); may be None when ``distances`` is given.
        gallery_ids, gallery_cameras: (n_gallery,).
        ranks: CMC cut-offs, each <= n_gallery.
        junk_ids: ids that are never matches.
        remove_junk: drop junk-id gallery items from the ranking instead of keeping them as
            non-matches.
        normalize: L2-normalise embeddings before the Euclidean distances.
        block_size: queries per block (memory ~ 30 bytes * block_size * n_gallery).
        distances: optional precomputed (n_query, n_gallery) distances that replace the
            Euclidean ones, e.g. ``k_reciprocal_rerank(q, g)``.
        rerank: optional dict of ``k_reciprocal_rerank`` arguments (k1, k2, lambda_value);
            the dense re-ranked matrix (4 * n_query * n_gallery bytes) is computed and used.
    Returns:
        dict with float ``rank@K`` per K, ``map``, ``minp``, int ``num_queries`` (evaluated)
        and ``skipped_queries`` (queries without any match).
    """
    if distances is not None and rerank is not None:
        raise ValueError("give either distances or rerank, not both.")
    if distances is None:
        q, g = _checks.as_query_gallery(query_embeddings, gallery_embeddings)
        n_query, n_gallery = q.shape[0], g.shape[0]
    else:
        distances = np.asarray(distances)
        if distances.ndim != 2 or distances.shape[1] == 0:
            raise ValueError(
                f"distances must have shape (n_query, n_gallery) with n_gallery >= 1; got "
                f"{distances.shape}.")
        distances = _checks.to_float32("distances", distances)
        if not np.isfinite(distances).all():
            raise ValueError(f"distances (shape {distances.shape}) contains NaN or inf values.")
        n_query, n_gallery = distances.shape
    q_ids = _checks.as_labels("query_ids", query_ids, n_query, "the queries")
    q_cams = _checks.as_labels("query_cameras", query_cameras, n_query, "the queries")
    g_ids = _checks.as_labels("gallery_ids", gallery_ids, n_gallery, "the gallery")
    g_cams = _checks.as_labels("gallery_cameras", gallery_cameras, n_gallery, "the gallery")
    ranks = _checks.as_ks("ranks", ranks, n_gallery, "the gallery size")
    block_size = _checks.check_positive_int("block_size", block_size)
    junk = np.asarray(list(junk_ids))

    if rerank is not None:
        from gl_jax.evaluation import reranking
        distances = reranking.k_reciprocal_rerank(q, g, normalize=normalize, **dict(rerank))

    if distances is None:
        if normalize:
            q, g = knn_lib.l2_normalize(q), knn_lib.l2_normalize(g)
        g_sq = np.sum(g ** 2, axis=1)

    aps, inps, firsts, counts = [], [], [], []
    for start in range(0, n_query, block_size):
        stop = min(start + block_size, n_query)
        if distances is None:
            q_block = q[start:stop]
            if n_query > block_size and stop - start < block_size:  # one shape, one compilation
                q_block = np.concatenate([q_block, np.zeros((block_size - (stop - start), q.shape[1]),
                                                            np.float32)])
            (dist,) = knn_lib.run_blocked(_distance_block, q_block, (g, g_sq), block_size=block_size)
            dist = dist[:stop - start]
        else:
            dist = distances[start:stop].astype(np.float32)
        ap, inp, first, count = _per_query(dist, q_ids[start:stop], q_cams[start:stop], g_ids,
                                           g_cams, junk, remove_junk)
        aps.append(ap), inps.append(inp), firsts.append(first), counts.append(count)
    ap, inp, first, count = map(np.concatenate, (aps, inps, firsts, counts))
    valid = count > 0
    if not valid.any():
        raise ValueError(
            f"no query has a valid match in the gallery (all {n_query} queries skipped); "
            "check ids, cameras and junk_ids.")
    out: dict[str, Any] = {f"rank@{k}": float(np.mean(first[valid] <= k)) for k in ranks}
    out["map"] = float(np.mean(ap[valid]))
    out["minp"] = float(np.mean(inp[valid]))
    out["num_queries"] = int(valid.sum())
    out["skipped_queries"] = int(n_query - valid.sum())
    return out
