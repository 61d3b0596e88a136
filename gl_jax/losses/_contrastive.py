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
                     normalize: bool = True,
                     squared: bool = True,
                     average: str = "per_anchor") -> jax.Array:
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

    pytorch-metric-learning's default `ContrastiveLoss` is another variant, available
    here with `squared=False, average="nonzero_pairs"`: plain hinges on the distance,
    :math:`[D_{ip} - m_+]_+` and :math:`[m_- - D_{ik}]_+` (no square, no 1/2), and each
    kind of pair averaged over the batch's pairs of that kind with a non-zero loss
    (its `AvgNonZeroReducer`):

    .. math::
        L = \frac{\sum_{(i, p)} c^+_{ip}}{|\{(i, p): c^+_{ip} > 0\}|}
          + \frac{\sum_{(i, k)} c^-_{ik}}{|\{(i, k): c^-_{ik} > 0\}|}.

    That is not a sum over anchors, so with `average="nonzero_pairs"` each anchor returns
    its share (its pairs' costs times `n` over the counts) and `jnp.mean` of the output
    is `L`. `squared` and `average` can be combined freely.

    Which variant is the default, and why: Hadsell et al.'s squared hinges, averaged per
    anchor (above): the paper's loss, with a balance of positives and negatives that does
    not depend on how many pairs happen to be violated. PML cannot compute the squared
    negative term (`[m - D]_+^2`; squaring its distance gives `[m - D^2]_+`), so the
    default is tested against the NumPy reference in tests/test_baseline_losses.py and
    the PML variant against PML in tests/test_pml_parity.py.

    Args:
        embeddings: `[n, d]` floating array (bfloat16/float16 are computed in float32).
        labels: `[n]` integer labels (only equality is used).
        pos_margin: m+ >= 0, positive pairs closer than this cost nothing.
        neg_margin: m- > 0, negative pairs farther than this cost nothing. 0.5 suits
            L2-normalised embeddings (distances in [0, 2]).
        normalize: L2-normalise the embeddings first (a zero row stays zero).
        squared: True: Hadsell et al.'s :math:`\tfrac12 [\cdot]_+^2`; False: the plain
            hinge :math:`[\cdot]_+` (PML's).
        average: "per_anchor" (default, above) or "nonzero_pairs" (PML's reduction).

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
    if average not in ("per_anchor", "nonzero_pairs"):
        raise ValueError(f"average must be 'per_anchor' or 'nonzero_pairs', got {average!r}.")
    dtype, dist, positives, negatives = _pairwise.distances_and_masks(
        embeddings, labels, normalize=normalize)

    def hinge(x):
        h = jax.nn.relu(x)
        return 0.5 * jnp.square(h) if squared else h

    pos_cost = hinge(dist - jnp.asarray(pos_margin, dtype))
    neg_cost = hinge(jnp.asarray(neg_margin, dtype) - dist)

    if average == "nonzero_pairs":
        n = dist.shape[0]

        def share(cost, mask):
            cost = jnp.where(mask, cost, 0.0)
            # Which pairs are non-zero is piecewise constant: no gradient through the count.
            nonzero = jax.lax.stop_gradient(jnp.sum(mask & (cost > 0)))
            return n * jnp.sum(cost, axis=1) / jnp.maximum(nonzero, 1).astype(dtype)

        return share(pos_cost, positives) + share(neg_cost, negatives)

    def masked_mean(cost, mask):
        count = jnp.sum(mask, axis=1)
        total = jnp.sum(jnp.where(mask, cost, 0.0), axis=1)
        return jnp.where(count > 0, total / jnp.maximum(count, 1), 0.0)

    return masked_mean(pos_cost, positives) + masked_mean(neg_cost, negatives)
