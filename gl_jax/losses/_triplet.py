"""Batch-hard triplet loss (Hermans, Beyer, Leibe, 2017) as a pure JAX function."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from gl_jax.losses import _pairwise


def batch_hard_triplet_loss(embeddings: jax.Array,
                            labels: jax.Array,
                            *,
                            margin: float | jax.Array = 0.2,
                            soft_margin: bool = False,
                            normalize: bool = True,
                            squared: bool = False,
                            triplets: str = "batch_hard") -> jax.Array:
    r"""Per-anchor batch-hard triplet loss (or, with `triplets="all"`, every triplet).

    Every sample `a` of the batch is an anchor. With distances `D` between the
    (optionally L2-normalised) embeddings, its hardest positive and hardest negative are

    .. math::
        d^+_a = \max_{p \ne a,\; y_p = y_a} D_{ap}, \qquad
        d^-_a = \min_{k:\; y_k \ne y_a} D_{ak},

    and its loss is :math:`\ell_a = [m + d^+_a - d^-_a]_+` (hinge with margin m) or
    :math:`\ell_a = \log(1 + e^{d^+_a - d^-_a})` with `soft_margin` (the paper's preferred
    variant). An anchor without a positive or without a negative in the batch (a class
    with one sample, or a batch of one class) has no triplet: its loss is 0.

    The batch is expected to come from a P x K sampler (P classes, K samples each), as in
    the paper. The loss is piecewise smooth: the max/min pick one pair per anchor.

    With `triplets="all"` every valid triplet `(a, p, k)` of the batch counts, and the
    batch loss is the average over the triplets whose loss is non-zero (Hermans et al.'s
    "batch all" with their ":math:`\neq 0`" average; pytorch-metric-learning's default
    `TripletMarginLoss` with its `AvgNonZeroReducer`):

    .. math::
        L = \frac{1}{|\{t: \ell_t > 0\}|} \sum_{t = (a, p, k)} \ell_t, \qquad
        \ell_t = [m + D_{ap} - D_{ak}]_+ .

    That average is not a sum over anchors, so each anchor returns its share
    :math:`n \sum_{(p, k)} \ell_{apk} / |\{t: \ell_t > 0\}|`, and `jnp.mean` of the
    output is `L` (0 when no triplet is violated). Memory is O(n^3).

    Which variant is the default, and why: batch-hard (the paper's best variant, and
    what its P x K sampling is built for), averaged over all anchors as in the paper's
    eq. (5). pytorch-metric-learning's default is the "all" variant above; both are
    tested against it (tests/test_pml_parity.py). The default equals its
    `TripletMarginLoss(reducer=MeanReducer())` fed by a `BatchHardMiner` on batches where
    every anchor has a positive and a negative (its miner drops the other anchors; here
    they count as 0 in the mean). PML's `smooth_loss` is softplus(m + gap), this
    `soft_margin` the paper's softplus(gap): they agree at PML margin 0.

    Args:
        embeddings: `[n, d]` floating array (bfloat16/float16 are computed in float32).
        labels: `[n]` integer labels (any integer values; only equality is used).
        margin: the hinge margin m >= 0 (ignored with `soft_margin`). 0.2 suits
            L2-normalised embeddings, whose distances lie in [0, 2].
        soft_margin: softplus instead of the hinge.
        normalize: L2-normalise the embeddings first (a zero row stays zero).
        squared: use squared Euclidean distances (the paper uses plain ones).
        triplets: "batch_hard" (default) or "all" (see above).

    Returns:
        `[n]` per-anchor loss, float32 (float64 for float64 input); reduce with `jnp.mean`
        (anchors without a triplet count as 0, as in the paper's average over the batch).
        A NaN embedding is not hidden: every anchor compared with it gets NaN.

    Raises:
        ValueError: on wrong ranks or shapes (n = 0 included), non-integer labels or, when
            concrete, a negative or non-finite margin.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from gl_jax import losses
        >>> feats = jax.random.normal(jax.random.key(0), (6, 8))
        >>> labels = jnp.array([0, 0, 1, 1, 2, 2])
        >>> losses.batch_hard_triplet_loss(feats, labels, margin=0.2).shape
        (6,)

    References:
        A. Hermans, L. Beyer, B. Leibe. In Defense of the Triplet Loss for Person
        Re-Identification. arXiv:1703.07737, 2017.
    """
    _pairwise.check_embeddings_and_labels(embeddings, labels)
    _pairwise.check_nonnegative("margin", margin)
    if triplets not in ("batch_hard", "all"):
        raise ValueError(f"triplets must be 'batch_hard' or 'all', got {triplets!r}.")
    dtype, dist, positives, negatives = _pairwise.distances_and_masks(
        embeddings, labels, normalize=normalize, squared=squared)
    if triplets == "all":
        return _all_triplets(dist, positives, negatives, margin, soft_margin, dtype)
    has_positive = jnp.any(positives, axis=1)
    has_negative = jnp.any(negatives, axis=1)

    # Distances are >= 0, so 0 is a neutral fill for the max over positives; the largest
    # distance in the batch is a neutral fill for the min over negatives. Neither fill
    # matters for anchors without positives/negatives: they are zeroed below.
    hardest_positive = jnp.max(jnp.where(positives, dist, 0.0), axis=1)
    far = jax.lax.stop_gradient(jnp.max(dist))
    hardest_negative = jnp.min(jnp.where(negatives, dist, far), axis=1)
    gap = hardest_positive - hardest_negative
    if soft_margin:
        loss = jax.nn.softplus(gap)
    else:
        loss = jax.nn.relu(jnp.asarray(margin, dtype) + gap)
    return jnp.where(has_positive & has_negative, loss, 0.0)


def _all_triplets(dist, positives, negatives, margin, soft_margin, dtype):
    """Each anchor's share of the average over the non-zero triplet losses."""
    valid = positives[:, :, None] & negatives[:, None, :]           # [a, p, k]
    gap = dist[:, :, None] - dist[:, None, :]                         # D_ap - D_ak
    if soft_margin:
        loss = jax.nn.softplus(gap)
    else:
        loss = jax.nn.relu(jnp.asarray(margin, dtype) + gap)
    loss = jnp.where(valid, loss, 0.0)
    # Which triplets are non-zero is piecewise constant: no gradient through the count.
    nonzero = jax.lax.stop_gradient(jnp.sum(valid & (loss > 0)))
    n = dist.shape[0]
    return n * jnp.sum(loss, axis=(1, 2)) / jnp.maximum(nonzero, 1).astype(dtype)
