"""Contrastive loss (Hadsell, Chopra, LeCun, 2006) over all pairs of a batch, pure JAX."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from gl_jax.losses import _pairwise


def contrastive_loss(embeddings: jax.Array,
                     labels: jax.Array,
                     *,
                     pos_margin: float | jax.Array = 0.0,
                     neg_margin: float | jax.Array = 0.5,
                     normalize: bool = True) -> jax.Array:
    r"""Per-anchor contrastive loss over every pair of the batch.

    Hadsell et al. define, for a pair at Euclidean distance `D`,
    :math:`\tfrac12 D^2` for a similar pair and :math:`\tfrac12 [m - D]_+^2` for a
    dissimilar one. With a positive margin as well (0 gives the paper's loss) and the
    pairs of anchor `i` split into positives `P_i` (same label, j != i) and negatives `N_i`:

    .. math::
        \ell_i = \frac{1}{2|P_i|} \sum_{p \in P_i} [D_{ip} - m_+]_+^2
               + \frac{1}{2|N_i|} \sum_{k \in N_i} [m_- - D_{ik}]_+^2 .

    Each sum is averaged over its own pairs so that the few positives of a P x K batch are
    not swamped by its many negatives; an empty set contributes 0. Every pair appears
    twice (once per end), which doubles both terms alike.

    Args:
        embeddings: `[n, d]` floating array (bfloat16/float16 are computed in float32).
        labels: `[n]` integer labels (only equality is used).
        pos_margin: m+ >= 0, positive pairs closer than this cost nothing.
        neg_margin: m- > 0, negative pairs farther than this cost nothing. 0.5 suits
            L2-normalised embeddings (distances in [0, 2]).
        normalize: L2-normalise the embeddings first (a zero row stays zero).

    Returns:
        `[n]` per-anchor loss, float32 (float64 for float64 input); reduce with `jnp.mean`.
        A NaN embedding is not hidden: every anchor compared with it gets NaN.

    Raises:
        ValueError: on wrong ranks or shapes (n = 0 included), non-integer labels or, when
            concrete, a negative `pos_margin` or a non-positive `neg_margin`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from gl_jax import losses
        >>> feats = jax.random.normal(jax.random.key(0), (6, 8))
        >>> losses.contrastive_loss(feats, jnp.array([0, 0, 1, 1, 2, 2])).shape
        (6,)

    References:
        R. Hadsell, S. Chopra, Y. LeCun. Dimensionality Reduction by Learning an Invariant
        Mapping. CVPR 2006.
    """
    _pairwise.check_embeddings_and_labels(embeddings, labels)
    _pairwise.check_nonnegative("pos_margin", pos_margin)
    _pairwise.check_positive("neg_margin", neg_margin)
    dtype = _pairwise.compute_dtype(embeddings)
    x = jnp.asarray(embeddings, dtype)
    if normalize:
        x = _pairwise.l2_normalize(x)
    dist = _pairwise.pairwise_distances(x)
    positives, negatives = _pairwise.class_masks(labels)

    pos_cost = jnp.square(jax.nn.relu(dist - jnp.asarray(pos_margin, dtype)))
    neg_cost = jnp.square(jax.nn.relu(jnp.asarray(neg_margin, dtype) - dist))

    def masked_mean(cost, mask):
        count = jnp.sum(mask, axis=1)
        total = jnp.sum(jnp.where(mask, cost, 0.0), axis=1)
        return jnp.where(count > 0, total / jnp.maximum(count, 1), 0.0)

    return 0.5 * masked_mean(pos_cost, positives) + 0.5 * masked_mean(neg_cost, negatives)
