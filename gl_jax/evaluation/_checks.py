"""Input validation shared by the evaluation modules.

Every public function funnels its arguments through these helpers so that bad input fails
early with a ValueError naming the argument, its shape and the offending value.
"""
from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np


def as_embeddings(name: str, x) -> np.ndarray:
    """Returns `x` as a finite float32 host array of shape (n, d), n >= 1, d >= 1.

    Any real floating dtype (bfloat16 included) or integer dtype is accepted; metrics are
    computed in float32."""
    if x is None:
        raise ValueError(f"{name} is None; expected an array of shape (n, d).")
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape (n, d); got shape {x.shape}.")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {x.shape}); at least one row is needed.")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has zero dimensions (shape {x.shape}).")
    x = to_float32(name, x)
    finite = np.isfinite(x)
    if not finite.all():
        bad_rows = np.flatnonzero(~finite.all(axis=1))
        raise ValueError(
            f"{name} (shape {x.shape}) contains {int((~finite).sum())} NaN or inf values, in "
            f"{bad_rows.size} rows (first: {bad_rows[:5].tolist()}).")
    return x


def to_float32(name: str, x: np.ndarray) -> np.ndarray:
    """`x` as float32: real floats of any width (bfloat16 and float16 from a model run in
    low precision included) and integers; ValueError naming the dtype otherwise."""
    # np.issubdtype does not know ml_dtypes' bfloat16 (its numpy kind is 'V');
    # jnp.issubdtype does.
    if not (jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)):
        raise ValueError(f"{name} must be numeric; got dtype {x.dtype}.")
    return x.astype(np.float32, copy=False)


def as_query_gallery(query, gallery) -> tuple[np.ndarray, np.ndarray]:
    """Both as `as_embeddings`, and of the same dimension."""
    q = as_embeddings("query_embeddings", query)
    g = as_embeddings("gallery_embeddings", gallery)
    if q.shape[1] != g.shape[1]:
        raise ValueError(
            f"query_embeddings has dimension {q.shape[1]} but gallery_embeddings has "
            f"{g.shape[1]} (shapes {q.shape} and {g.shape}).")
    return q, g


def as_labels(name: str, y, n: int, n_name: str) -> np.ndarray:
    """Returns `y` as a 1-D host array of length `n` (the rows of `n_name`)."""
    if y is None:
        raise ValueError(f"{name} is None; expected an array of shape ({n},).")
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D; got shape {y.shape}.")
    if y.shape[0] != n:
        raise ValueError(
            f"{name} has length {y.shape[0]} but {n_name} has {n} rows; they must match.")
    return y


def as_ks(name: str, ks: Sequence[int], limit: int, limit_what: str) -> tuple[int, ...]:
    """Validates the cut-offs K: positive integers no larger than `limit`."""
    if isinstance(ks, (int, np.integer)):
        ks = (int(ks),)
    ks = tuple(ks)
    if not ks:
        raise ValueError(f"{name} is empty; give at least one K.")
    for k in ks:
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise ValueError(f"{name} must hold positive integers; got {k!r} in {ks}.")
        if k > limit:
            raise ValueError(
                f"{name} holds K = {k}, larger than {limit_what} ({limit}); "
                "K must not exceed the number of items that can be retrieved.")
    return tuple(int(k) for k in ks)


def check_positive_int(name: str, value) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}.")
    return int(value)


def encode_labels(*arrays: np.ndarray) -> list[np.ndarray]:
    """Maps labels of any comparable dtype to dense int32 codes shared across `arrays`."""
    sizes = [a.shape[0] for a in arrays]
    _, codes = np.unique(np.concatenate(arrays), return_inverse=True)
    codes = codes.astype(np.int32).reshape(-1)
    return np.split(codes, np.cumsum(sizes)[:-1])
