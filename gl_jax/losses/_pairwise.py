"""Shared pieces of the pair-, triplet- and proxy-based baseline losses.

Argument checks, the compute dtype, safe L2 normalisation, pairwise distances with a
finite gradient at zero distance, and the same-class masks. Imports nothing of gl_jax.
"""
from __future__ import annotations

import numpy as np

import jax
import jax.numpy as jnp

# Norms below this are treated as zero: a zero embedding normalises to zero instead of
# 0/0, and 1/_NORM_EPS = 1e12 keeps the gradient finite in float32.
_NORM_EPS = 1e-12

# Squared distances at or below this count as zero: sqrt has an infinite derivative at 0,
# so such pairs get distance 0 and gradient 0 (a subgradient of |x_i - x_j|).
_SQDIST_EPS = 1e-16


def compute_dtype(*arrays) -> jnp.dtype:
    """float32 for bfloat16/float16/float32 inputs; float64 only if an input is float64."""
    dtype = jnp.float32
    for a in arrays:
        if a is not None:
            dtype = jnp.promote_types(dtype, jnp.asarray(a).dtype)
    return dtype


def concrete(x):
    """The value of `x` as numpy when it is known at trace time, else None (under jit/vmap)."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def check_embeddings_and_labels(embeddings, labels) -> None:
    """`embeddings` float [n, d] with n >= 1, `labels` int [n]; ValueError naming the
    argument otherwise."""
    if jnp.ndim(embeddings) != 2:
        raise ValueError(f"embeddings must have rank 2 ([n, d]), got shape {jnp.shape(embeddings)}.")
    if not jnp.issubdtype(jnp.result_type(embeddings), jnp.floating):
        raise ValueError(
            f"embeddings must be floating point, got dtype {jnp.result_type(embeddings)}.")
    n = jnp.shape(embeddings)[0]
    if n == 0:
        # Shapes are static, so this holds under jit too; a loss over no pair is undefined.
        raise ValueError(f"embeddings must have at least one row ([n, d] with n >= 1), "
                         f"got shape {jnp.shape(embeddings)}.")
    if jnp.shape(labels) != (n,):
        raise ValueError(
            f"labels must have shape [n] = ({n},) to match embeddings {jnp.shape(embeddings)}; "
            f"got {jnp.shape(labels)}.")
    check_integer_labels(labels)


def check_integer_labels(labels) -> None:
    if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
        raise ValueError(f"labels must be integers, got dtype {jnp.result_type(labels)}.")


def check_proxies(proxies, embeddings, labels) -> None:
    """`proxies` float [m, d] with m >= 1 and d = embeddings.shape[1]; labels (when
    concrete) in [0, m)."""
    if jnp.ndim(proxies) != 2:
        raise ValueError(f"proxies must have rank 2 ([m, d]), got shape {jnp.shape(proxies)}.")
    if not jnp.issubdtype(jnp.result_type(proxies), jnp.floating):
        raise ValueError(f"proxies must be floating point, got dtype {jnp.result_type(proxies)}.")
    m, d = jnp.shape(proxies)
    if m == 0:
        raise ValueError(f"proxies must have at least one row ([m, d] with m >= 1 classes), "
                         f"got shape {jnp.shape(proxies)}.")
    if d != jnp.shape(embeddings)[1]:
        raise ValueError(
            f"proxies must be [m, d] with d = embeddings.shape[1] = {jnp.shape(embeddings)[1]}; "
            f"got proxies {jnp.shape(proxies)} and embeddings {jnp.shape(embeddings)}.")
    check_label_range(labels, m, "proxies")


def check_label_range(labels, m: int, source: str) -> None:
    """Labels in [0, m) when their values are known at trace time (not under jit/vmap);
    `source` names the argument that fixes m (e.g. "logits", "proxies")."""
    values = concrete(labels)
    if values is not None and values.size:
        bad = (values < 0) | (values >= m)
        if bad.any():
            raise ValueError(
                f"labels must lie in [0, {m}) ({source} have m = {m} classes); got "
                f"{values[bad][:5].tolist()} at positions {np.flatnonzero(bad)[:5].tolist()}.")


def labels_in_range(labels: jax.Array, m: int) -> jax.Array:
    """bool `[n]`: the label lies in [0, m)."""
    labels = jnp.asarray(labels)
    return (labels >= 0) & (labels < m)


def take_label_column(values: jax.Array, labels: jax.Array) -> jax.Array:
    """`values[i, labels[i]]` for `values` `[n, m]`, NaN where the label is outside [0, m).

    Concrete labels are checked up front (`check_label_range`); this is what is left under
    jit, where a bad label must show up as NaN. Indexing alone would not do it: jnp wraps
    negative indices like Python, so -1 would silently pick the last class."""
    m = values.shape[1]
    labels = jnp.asarray(labels)
    index = jnp.clip(labels, 0, max(m - 1, 0)).astype(jnp.int32)
    picked = jnp.take_along_axis(values, index[:, None], axis=1)[:, 0]
    return jnp.where(labels_in_range(labels, m), picked, jnp.nan)


def check_positive(name: str, value) -> None:
    """A hyperparameter that must be finite and > 0 (checked when concrete)."""
    v = concrete(value)
    if v is not None and not (np.all(np.isfinite(v)) and np.all(v > 0)):
        raise ValueError(f"{name} must be finite and > 0, got {v}.")


def check_nonnegative(name: str, value) -> None:
    """A hyperparameter that must be finite and >= 0 (checked when concrete)."""
    v = concrete(value)
    if v is not None and not (np.all(np.isfinite(v)) and np.all(v >= 0)):
        raise ValueError(f"{name} must be finite and >= 0, got {v}.")


def check_finite(name: str, value) -> None:
    v = concrete(value)
    if v is not None and not np.all(np.isfinite(v)):
        raise ValueError(f"{name} must be finite, got {v}.")


def l2_normalize(x: jax.Array) -> jax.Array:
    """Rows divided by their L2 norm; an all-zero row stays zero (finite gradient)."""
    sqnorm = jnp.sum(x * x, axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sqnorm, _NORM_EPS ** 2))


def pairwise_sqdist(x: jax.Array) -> jax.Array:
    """`[n, n]` squared Euclidean distances, clipped at 0, exact zeros on the diagonal."""
    sq = jnp.sum(x * x, axis=1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
    n = x.shape[0]
    return jnp.where(jnp.eye(n, dtype=bool), 0.0, jnp.maximum(d2, 0.0))


def safe_sqrt(d2: jax.Array) -> jax.Array:
    """sqrt with value and gradient 0 at (near) zero instead of an infinite gradient.

    NaN stays NaN: `NaN > eps` is False, and mapping it to 0 would make a broken
    embedding look like a perfect match."""
    positive = d2 > _SQDIST_EPS
    root = jnp.sqrt(jnp.where(positive, d2, 1.0))
    return jnp.where(positive, root, jnp.where(jnp.isnan(d2), d2, 0.0))


def pairwise_distances(x: jax.Array, squared: bool = False) -> jax.Array:
    d2 = pairwise_sqdist(x)
    return d2 if squared else safe_sqrt(d2)


def class_masks(labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(positives, negatives), both bool `[n, n]`: same label with j != i; different label."""
    labels = jnp.asarray(labels)
    same = labels[:, None] == labels[None, :]
    n = labels.shape[0]
    return same & ~jnp.eye(n, dtype=bool), ~same


def distances_and_masks(embeddings, labels, *, normalize: bool, squared: bool = False):
    """(compute dtype, [n, n] distances of the (L2-normalised) embeddings, positive and
    negative pair masks): the common start of the pair-based losses."""
    dtype = compute_dtype(embeddings)
    x = jnp.asarray(embeddings, dtype)
    if normalize:
        x = l2_normalize(x)
    positives, negatives = class_masks(labels)
    return dtype, pairwise_distances(x, squared=squared), positives, negatives
