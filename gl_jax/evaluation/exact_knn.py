"""Exact k-nearest neighbours in blocks of queries, jitted, sharded over local devices.

Distances are Euclidean. With ``normalize=True`` (the default, as the Group Loss papers)
rows are L2-normalised first, so ``d(q, g)^2 = 2 - 2 <q, g>``.

Memory: one block holds a (block_size, n_gallery) distance matrix; the result holds
(n_query, k) distances and indices. The full n x n matrix is never formed, so peak memory is
O(block_size * n_gallery + n_query * k) (plus the gallery itself, replicated on each device).

Ties: neighbours are ordered by increasing float32 distance, and among exactly equal
distances the smaller gallery index comes first (``jax.lax.top_k`` keeps the lower index
first among equal values, and the ranking key is the returned distance itself, so the rule
holds for the values a caller sees). With ``gallery_embeddings=None`` (query = gallery) the
query itself is never returned as its own neighbour, even when duplicates exist.

Precision: the block matmul runs at ``Precision.HIGHEST`` (no TF32/bf16 passes on
accelerators); the float32 expansion ``|q|^2 + |g|^2 - 2 <q, g>`` leaves an absolute error
of about 1e-7 on squared distances, i.e. about 3e-4 on distances close to 0.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gl_jax.evaluation import _checks

DEFAULT_BLOCK_SIZE = 1024

# Modes for what happens on the diagonal when queries and gallery are the same set.
CROSS = "cross"              # query and gallery are different sets
EXCLUDE_SELF = "exclude_self"  # same set; the query itself gets distance +inf
SELF_ZERO = "self_zero"        # same set; the query itself gets distance exactly 0


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation of a float32 (n, d) array; all-zero rows stay zero."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, np.float32(1e-12))).astype(np.float32)


def block_sq_distances(query_block, gallery, gallery_sq_norms):
    """(b, n) squared Euclidean distances ``max(|q|^2 + |g|^2 - 2 <q, g>, 0)`` (traced)."""
    q_sq = jnp.sum(query_block * query_block, axis=1)
    dots = jnp.dot(query_block, gallery.T, precision=jax.lax.Precision.HIGHEST)
    return jnp.maximum(q_sq[:, None] + gallery_sq_norms[None, :] - 2.0 * dots, 0.0)


def block_distances(query_block, gallery, gallery_sq_norms, row_offset, mode: str):
    """Euclidean distances of a block of queries to the whole gallery (traced inside jit).

    Args:
        query_block: (b, d) float32.
        gallery: (n, d) float32.
        gallery_sq_norms: (n,) float32, ``|g|^2``.
        row_offset: int32 scalar, index of the block's first query in the gallery (same-set modes).
        mode: CROSS, EXCLUDE_SELF or SELF_ZERO.
    Returns:
        (b, n) float32 ``sqrt(max(|q|^2 + |g|^2 - 2 <q, g>, 0))``.
    """
    dist = jnp.sqrt(block_sq_distances(query_block, gallery, gallery_sq_norms))
    if mode != CROSS:
        rows = row_offset + jnp.arange(query_block.shape[0], dtype=jnp.int32)
        is_self = rows[:, None] == jnp.arange(gallery.shape[0], dtype=jnp.int32)[None, :]
        dist = jnp.where(is_self, jnp.inf if mode == EXCLUDE_SELF else 0.0, dist)
    return dist


@functools.partial(jax.jit, static_argnames=("k", "mode", "with_row_max"))
def _topk_block(query_block, row_offset, gallery, gallery_sq_norms, *, k, mode, with_row_max):
    dist = block_distances(query_block, gallery, gallery_sq_norms, row_offset, mode)
    neg_dist, idx = jax.lax.top_k(-dist, k)
    out = (-neg_dist, idx)
    if with_row_max:
        finite = jnp.where(jnp.isfinite(dist), dist, 0.0)
        out = out + (jnp.max(finite, axis=1),)
    return out


def _mesh() -> Mesh:
    # This process's devices only: in a multi-host run every process holds all the
    # embeddings (gathered) and computes the metrics itself, so nothing crosses hosts.
    return Mesh(np.asarray(jax.local_devices()), ("blocks",))


def run_blocked(block_fn: Callable, query: np.ndarray, gallery_args: Sequence,
                *, query_extras: Sequence[np.ndarray] = (), block_size: int,
                **static_kwargs) -> list[np.ndarray]:
    """Applies a jitted per-block function to all query rows and concatenates its outputs.

    ``block_fn(query_block, *extras_block, row_offset, *gallery_args, **static_kwargs)`` must
    return a tuple of arrays with leading dimension b. Blocks are padded to a fixed size (one
    compilation) and sharded over this process's devices along the query axis; the gallery
    arguments are replicated. Padded rows are dropped from the outputs.
    """
    block_size = _checks.check_positive_int("block_size", block_size)
    mesh = _mesh()
    num_devices = mesh.devices.size
    n = query.shape[0]
    # One block when everything fits; a multiple of the device count so rows split evenly.
    block = min(block_size, n)
    block = -(-block // num_devices) * num_devices
    row_sharding = NamedSharding(mesh, P("blocks"))
    replicated = NamedSharding(mesh, P())
    gallery_args = [jax.device_put(a, replicated) for a in gallery_args]
    outputs: list[list[np.ndarray]] = []
    for start in range(0, n, block):
        stop = min(start + block, n)
        pieces = []
        for arr in (query, *query_extras):
            piece = arr[start:stop]
            if stop - start < block:
                pad = np.zeros((block - (stop - start),) + arr.shape[1:], arr.dtype)
                piece = np.concatenate([piece, pad])
            pieces.append(jax.device_put(piece, row_sharding))
        result = block_fn(*pieces, jnp.int32(start), *gallery_args, **static_kwargs)
        outputs.append([np.asarray(r)[: stop - start] for r in result])
    return [np.concatenate(parts) for parts in zip(*outputs)]


def knn_arrays(query: np.ndarray, gallery: np.ndarray, k: int, *, mode: str,
               block_size: int = DEFAULT_BLOCK_SIZE, with_row_max: bool = False):
    """Blocked exact top-k on already validated (and, if wanted, normalised) float32 arrays."""
    gallery_sq = np.sum(gallery.astype(np.float32) ** 2, axis=1)
    return run_blocked(_topk_block, query, (gallery, gallery_sq), block_size=block_size,
                       k=k, mode=mode, with_row_max=with_row_max)


def knn(query_embeddings, gallery_embeddings=None, *, k: int, normalize: bool = True,
        block_size: int = DEFAULT_BLOCK_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest gallery items of every query, by Euclidean distance.

    Args:
        query_embeddings: (n_query, d) array (numpy or jax), finite.
        gallery_embeddings: (n_gallery, d) array, or None for query = gallery, in which case
            each query's own row is excluded from its neighbours.
        k: number of neighbours, 1 <= k <= n_gallery (n - 1 when query = gallery).
        normalize: L2-normalise rows first (the papers' protocol).
        block_size: queries per block; peak memory about 4 * block_size * n_gallery bytes.
    Returns:
        distances: (n_query, k) float32, non-decreasing along each row.
        indices: (n_query, k) int32 gallery indices; equal distances keep smaller index first.
    Raises:
        ValueError: non-finite or mis-shaped embeddings, mismatched dimensions, bad k.
    """
    if gallery_embeddings is None:
        query = _checks.as_embeddings("query_embeddings", query_embeddings)
        gallery, mode, limit, what = query, EXCLUDE_SELF, query.shape[0] - 1, "n - 1 (query = gallery)"
    else:
        query, gallery = _checks.as_query_gallery(query_embeddings, gallery_embeddings)
        mode, limit, what = CROSS, gallery.shape[0], "the gallery size"
    (k,) = _checks.as_ks("k", (k,), limit, what)
    if normalize:
        query = l2_normalize(query)
        gallery = query if gallery_embeddings is None else l2_normalize(gallery)
    dist, idx = knn_arrays(query, gallery, k, mode=mode, block_size=block_size)
    return dist, idx
