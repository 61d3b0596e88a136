"""k-reciprocal re-ranking (Zhong, Zheng, Cao, Li, CVPR 2017), memory-bounded.

The method, on the set of all N items (queries then gallery; or one set when query =
gallery), with d(i, j) = squared Euclidean distance divided by the largest squared distance
from i (as the authors' code):

1. N(i, k): the k+1 nearest items of i (itself included), ties by smaller index.
2. R(i, k) = {j in N(i, k) : i in N(j, k)}, the k-reciprocal set.
3. Expansion: R*(i) = R(i, k1) united with every R(c, round(k1/2)), c in R(i, k1), that
      shares more than 2/3 of its members with R(i, k1).
4. V[i, j] = exp(-d(i, j)) / sum_{j' in R*(i)} exp(-d(i, j')) for j in R*(i), else 0.
5. Local query expansion (k2 > 1): V[i] <- mean of V[j] over the k2 nearest j of i.
6. Jaccard distance d_J(i, j) = 1 - m / (2 - m), m = sum_k min(V[i, k], V[j, k])
      (rows of V sum to 1, so 2 - m is the sum of the maxima).
7. Final distance (1 - lambda) * d_J(i, j) + lambda * d(i, j), for query rows and gallery
      columns.

Group Loss++ settings (Elezi et al., TPAMI, arXiv 2204.01509; the co-author's code): retrieval, query = gallery = test set,
k1=50, k2=20, lambda=0.94; In-Shop k1=6, k2=2, lambda=0.4. Zhong's re-id default: k1=20,
k2=6, lambda=0.3. Query = gallery here means the set is used once (N = n, not 2n).

Complexity (N items, d dims, S = largest |R*|, S2 <= k2 * S = largest row of V after
expansion, c = mean number of rows sharing a column of V):
* exact top-(k1+1) kNN in blocks: O(N^2 d) time, O(block_size * N) memory;
* reciprocal sets and expansion: O(N k1^3) time, O(N * k1^2) memory per row chunk;
* V and its query expansion are sparse: O(N * S2) memory, O(N * S2 log) time;
* Jaccard by an inverted index, only for pairs that share a support column:
    O(n_query * S2 * c) time, O(block_size * n_gallery + pair_budget) memory;
* the output: (n_query, n_gallery) dense (4 bytes each) or its top-k only (``top_k``).
No N x N matrix is ever held. Market-1501 (3,368 + 19,732 = 23,100 items, k1=20, k2=6)
fits in well under 2 GiB, the dense output (266 MB) included.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from gl_jax.evaluation import _checks
from gl_jax.evaluation import exact_knn as knn_lib

DEFAULT_PAIR_BUDGET = 1 << 23  # ~0.6 GiB of temporaries per step


def _reciprocal_members(forward: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """forward (N, m) neighbour lists -> the same array with non-reciprocal entries set to -1."""
    n, m = forward.shape
    out = np.full_like(forward, -1)
    for start in range(0, n, chunk):
        rows = np.arange(start, min(start + chunk, n))
        back = forward[forward[rows]]                      # (b, m, m) neighbours of neighbours
        recip = (back == rows[:, None, None]).any(axis=2)
        out[rows] = np.where(recip, forward[rows], -1)
    return out


def _expanded_sets(recip: np.ndarray, recip_half: np.ndarray, chunk: int = 1024):
    """COO (rows, cols), sorted and unique, of the expanded sets R*(i)."""
    n = recip.shape[0]
    all_rows, all_cols = [], []
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        own = recip[start:stop]                              # (b, m1), -1 = empty slot
        cand = np.where(own[:, :, None] >= 0, recip_half[np.maximum(own, 0)], -1)  # (b, m1, m2)
        cand_size = (cand >= 0).sum(axis=2)
        shared = ((cand[:, :, :, None] == own[:, None, None, :]) & (cand[:, :, :, None] >= 0))
        shared = shared.any(axis=3).sum(axis=2)
        # Zhong: |R(c, k1/2) & R(i, k1)| > 2/3 |R(c, k1/2)|, in integers.
        take = (own >= 0) & (3 * shared > 2 * cand_size)
        members = np.concatenate(
            [own, np.where(take[:, :, None], cand, -1).reshape(stop - start, -1)], axis=1)
        rows = np.broadcast_to(np.arange(start, stop)[:, None], members.shape)
        valid = members >= 0
        keys = np.unique(rows[valid].astype(np.int64) * n + members[valid])
        all_rows.append(keys // n)
        all_cols.append(keys % n)
    return np.concatenate(all_rows), np.concatenate(all_cols)


def _pair_sq_distances(x: np.ndarray, rows: np.ndarray, cols: np.ndarray,
                       chunk: int = 1 << 16) -> np.ndarray:
    out = np.empty(rows.shape[0], np.float32)
    sq = np.sum(x * x, axis=1)
    for start in range(0, rows.shape[0], chunk):
        r, c = rows[start:start + chunk], cols[start:start + chunk]
        dots = np.einsum("ij,ij->i", x[r], x[c])
        out[start:start + chunk] = np.maximum(sq[r] + sq[c] - 2.0 * dots, 0.0)
    out[rows == cols] = 0.0
    return out


class _Csr:
    """Row-compressed sparse matrix (indptr, cols, vals) with rows in increasing order."""

    def __init__(self, n: int, rows: np.ndarray, cols: np.ndarray, vals: np.ndarray):
        self.n = n
        self.indptr = np.zeros(n + 1, np.int64)
        np.cumsum(np.bincount(rows, minlength=n), out=self.indptr[1:])
        self.rows, self.cols, self.vals = rows, cols, vals

    def gather_rows(self, src: np.ndarray):
        """Entries of rows `src` (1-D, repeats allowed): (position in src, cols, vals)."""
        starts, lens = self.indptr[src], self.indptr[src + 1] - self.indptr[src]
        total = int(lens.sum())
        owner = np.repeat(np.arange(src.shape[0]), lens)
        pos = np.arange(total) - np.repeat(np.cumsum(lens) - lens, lens) + np.repeat(starts, lens)
        return owner, self.cols[pos], self.vals[pos]


def _row_chunks(cost: np.ndarray, budget: int, max_rows: int):
    """Consecutive [start, stop) row ranges of at most max_rows rows and (unless a single row
    exceeds it) at most `budget` total cost."""
    n = cost.shape[0]
    start = 0
    while start < n:
        stop = start + 1
        total = int(cost[start])
        while stop < min(start + max_rows, n) and total + int(cost[stop]) <= budget:
            total += int(cost[stop])
            stop += 1
        yield start, stop
        start = stop


def _query_expansion(v: _Csr, nearest: np.ndarray, budget: int) -> _Csr:
    """V'[i] = mean of V[j] over j in nearest[i] (N, k2); returns V' as CSR."""
    n, k2 = nearest.shape
    row_len = np.diff(v.indptr)
    rows_out, cols_out, vals_out = [], [], []
    for start, stop in _row_chunks(row_len[nearest].sum(axis=1), budget, n):
        owner, cols, vals = v.gather_rows(nearest[start:stop].reshape(-1))
        dest = start + owner // k2
        keys, inverse = np.unique(dest.astype(np.int64) * n + cols, return_inverse=True)
        rows_out.append(keys // n)
        cols_out.append(keys % n)
        vals_out.append(np.bincount(inverse.reshape(-1), weights=vals) / k2)
    return _Csr(n, np.concatenate(rows_out), np.concatenate(cols_out),
                np.concatenate(vals_out))


def _min_overlap_block(v: _Csr, col_order: np.ndarray, col_ptr: np.ndarray, row_start: int,
                       row_stop: int, gallery_start: int, n_gallery: int) -> np.ndarray:
    """m[i, j] = sum_k min(V[i, k], V[j, k]) for rows [row_start, row_stop), gallery cols."""
    lo, hi = v.indptr[row_start], v.indptr[row_stop]
    e_rows, e_cols, e_vals = v.rows[lo:hi], v.cols[lo:hi], v.vals[lo:hi]
    starts, lens = col_ptr[e_cols], col_ptr[e_cols + 1] - col_ptr[e_cols]
    total = int(lens.sum())
    pos = np.arange(total) - np.repeat(np.cumsum(lens) - lens, lens) + np.repeat(starts, lens)
    partner = col_order[pos]
    partner_rows = v.rows[partner] - gallery_start
    mins = np.minimum(np.repeat(e_vals, lens), v.vals[partner])
    keep = (partner_rows >= 0) & (partner_rows < n_gallery)
    flat = (np.repeat(e_rows - row_start, lens)[keep].astype(np.int64) * n_gallery
            + partner_rows[keep])
    b = row_stop - row_start
    return np.bincount(flat, weights=mins[keep], minlength=b * n_gallery).reshape(b, n_gallery)


@functools.partial(jax.jit, static_argnames=("k", "exclude_self"))
def _final_block(query_block, overlap, row_max_sq, row_offset, gallery, gallery_sq,
                 *, lambda_value, k, exclude_self):
    """Final distances of a block; their top-k (ties: smaller index first) when k > 0."""
    d_orig = knn_lib.block_sq_distances(query_block, gallery, gallery_sq) / row_max_sq[:, None]
    jaccard = 1.0 - overlap / (2.0 - overlap)
    final = (1.0 - lambda_value) * jaccard + lambda_value * d_orig
    if exclude_self:
        rows = row_offset + jnp.arange(query_block.shape[0], dtype=jnp.int32)
        final = jnp.where(rows[:, None] == jnp.arange(gallery.shape[0])[None, :], jnp.inf, final)
    if k == 0:
        return (final,)
    neg, idx = jax.lax.top_k(-final, k)
    return -neg, idx


def k_reciprocal_rerank(query_embeddings, gallery_embeddings=None, *, k1: int = 20,
                        k2: int = 6, lambda_value: float = 0.3, top_k: int | None = None,
                        normalize: bool = True, block_size: int = 512,
                        pair_budget: int = DEFAULT_PAIR_BUDGET):
    """k-reciprocal re-ranked distances of queries to a gallery (see the module docstring).

    Args:
        query_embeddings: (n_query, d) finite array.
        gallery_embeddings: (n_gallery, d), or None for query = gallery (one set of n items).
        k1: size of the k-reciprocal neighbourhoods, 1 <= k1 <= N - 1.
        k2: local query expansion size, 1 <= k2 <= N (1 = no expansion).
        lambda_value: weight of the original distance, in [0, 1].
        top_k: None -> the dense (n_query, n_gallery) float32 matrix (query = gallery: the
            diagonal is included; metrics exclude it). An int -> only the top_k re-ranked
            neighbours ``(distances, indices)`` of shape (n_query, top_k), increasing, ties by
            smaller gallery index, the query itself excluded when query = gallery.
        normalize: L2-normalise rows first.
        block_size: query rows per block of the Jaccard/final step.
        pair_budget: most sparse pairs expanded at once in the query expansion and Jaccard
            steps (about 80 bytes each): bounds their temporary memory.
    Returns:
        the dense matrix, or (distances, indices) when ``top_k`` is given.
    """
    same_set = gallery_embeddings is None
    if same_set:
        q = _checks.as_embeddings("query_embeddings", query_embeddings)
        x, n_query, gallery_start, n_gallery = q, q.shape[0], 0, q.shape[0]
    else:
        q, g = _checks.as_query_gallery(query_embeddings, gallery_embeddings)
        x = np.concatenate([q, g])
        n_query, gallery_start, n_gallery = q.shape[0], q.shape[0], g.shape[0]
    n = x.shape[0]
    k1 = _checks.check_positive_int("k1", k1)
    k2 = _checks.check_positive_int("k2", k2)
    if k1 > n - 1:
        raise ValueError(f"k1 = {k1} needs at least k1 + 1 = {k1 + 1} items; there are {n}.")
    if k2 > n:
        raise ValueError(f"k2 = {k2} exceeds the number of items ({n}).")
    if not 0.0 <= float(lambda_value) <= 1.0:
        raise ValueError(f"lambda_value must be in [0, 1]; got {lambda_value}.")
    if top_k is not None:
        limit = n_gallery - 1 if same_set else n_gallery
        (top_k,) = _checks.as_ks("top_k", (top_k,), limit, "the number of gallery items")
    block_size = _checks.check_positive_int("block_size", block_size)
    pair_budget = _checks.check_positive_int("pair_budget", pair_budget)
    if normalize:
        x = knn_lib.l2_normalize(x)

    num_nearest = max(k1 + 1, k2)
    _, nearest, row_max = knn_lib.knn_arrays(x, x, num_nearest, mode=knn_lib.SELF_ZERO,
                                             with_row_max=True)
    row_max_sq = (row_max.astype(np.float64) ** 2)
    # All items identical: every distance is 0; any positive scale leaves them 0.
    row_max_sq = np.where(row_max_sq > 0, row_max_sq, 1.0).astype(np.float32)

    half = int(np.around(k1 / 2.0))
    recip = _reciprocal_members(nearest[:, :k1 + 1])
    recip_half = _reciprocal_members(nearest[:, :half + 1])
    rows, cols = _expanded_sets(recip, recip_half)
    weights = np.exp(-_pair_sq_distances(x, rows, cols).astype(np.float64) / row_max_sq[rows])
    weights /= np.bincount(rows, weights=weights, minlength=n)[rows]
    v = _Csr(n, rows, cols, weights)
    if k2 > 1:
        v = _query_expansion(v, nearest[:, :k2], pair_budget)

    col_order = np.argsort(v.cols, kind="stable")
    col_ptr = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(v.cols, minlength=n), out=col_ptr[1:])
    col_count = np.diff(col_ptr)
    pairs_per_row = np.bincount(v.rows, weights=col_count[v.cols], minlength=n).astype(np.int64)

    gallery = x[gallery_start:]
    gallery_sq = np.sum(gallery * gallery, axis=1)
    gallery_dev = jax.device_put(gallery)
    gallery_sq_dev = jax.device_put(gallery_sq)
    pad_rows = min(block_size, n_query)
    width = n_gallery if top_k is None else top_k
    outs = [np.empty((n_query, width), np.float32)]  # filled block by block: no second copy
    if top_k is not None:
        outs.append(np.empty((n_query, top_k), np.int32))
    # Rows of a block: at most block_size, and at most pair_budget expanded pairs.
    for start, stop in _row_chunks(pairs_per_row[:n_query], pair_budget, block_size):
        overlap = _min_overlap_block(v, col_order, col_ptr, start, stop, gallery_start,
                                     n_gallery).astype(np.float32)
        b = stop - start
        qb, ob, rb = x[start:stop], overlap, row_max_sq[start:stop]
        if b < pad_rows:  # pad to one shape: one compilation
            qb = np.concatenate([qb, np.zeros((pad_rows - b, x.shape[1]), np.float32)])
            ob = np.concatenate([ob, np.zeros((pad_rows - b, n_gallery), np.float32)])
            rb = np.concatenate([rb, np.ones(pad_rows - b, np.float32)])
        out = _final_block(qb, ob, rb, jnp.int32(start), gallery_dev, gallery_sq_dev,
                           lambda_value=jnp.float32(lambda_value), k=top_k or 0,
                           exclude_self=same_set and top_k is not None)
        for target, o in zip(outs, out):
            target[start:stop] = np.asarray(o)[:b]
    return outs[0] if top_k is None else (outs[0], outs[1])
