"""Proxy-Anchor loss (Kim, Kim, Cho, Kwak, CVPR 2020), pure JAX."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from gl_jax.losses import _pairwise
from gl_jax.losses._multi_similarity import _log1p_sum_exp


def proxy_anchor_loss(embeddings: jax.Array,
                      labels: jax.Array,
                      proxies: jax.Array,
                      *,
                      alpha: float | jax.Array = 32.0,
                      delta: float | jax.Array = 0.1) -> jax.Array:
    r"""Proxy-Anchor loss of a batch: a SCALAR, not per-example values.

    Each of the m classes has a learnable proxy :math:`p_c`; `s(x, p)` is the cosine
    similarity. With :math:`X^+_c` the batch samples of class c, :math:`X^-_c` the others,
    and :math:`P^+` the classes present in the batch (paper eq. 4):

    .. math::
        \ell = \frac{1}{|P^+|} \sum_{c \in P^+} \log\Big[1 + \sum_{x \in X^+_c} e^{-\alpha (s(x, p_c) - \delta)}\Big]
             + \frac{1}{m} \sum_{c=1}^{m} \log\Big[1 + \sum_{x \in X^-_c} e^{\alpha (s(x, p_c) + \delta)}\Big].

    Every proxy (the anchor) pools all samples of the batch inside one log-sum-exp, so
    the loss is not a sum over examples and no per-example split would be meaningful;
    like `optax.ntxent` it returns the batch's scalar loss.

    Which variant is the default, and why: there is one. This is the paper's eq. (4) and
    its code, and pytorch-metric-learning's `ProxyAnchorLoss` (whose `margin` is δ),
    which computes the same value and gradients (tests/test_pml_parity.py).

    In the gl_jax trainer the proxies are the classifier's weights (`kernel.T`, `[m, d]`),
    so no extra parameters are needed. (The paper trains the proxies with a 100x larger
    learning rate; the trainer uses one learning rate for all parameters.)

    Args:
        embeddings: `[n, d]` floating array (normalised inside).
        labels: `[n]` integers in `[0, m)`.
        proxies: `[m, d]` floating array, one row per training class (normalised inside).
        alpha: scale α > 0 (paper: 32).
        delta: margin δ (paper: 0.1).

    Returns:
        scalar loss, float32 (float64 for float64 input).

    Raises:
        ValueError: on wrong ranks or shapes (n = 0 included), non-integer labels, a
            non-positive alpha, a non-finite delta or, when concrete, labels outside `[0, m)`.
            Under jit an out-of-range label (negative ones included) makes the loss NaN.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from gl_jax import losses
        >>> k1, k2 = jax.random.split(jax.random.key(0))
        >>> feats, proxies = jax.random.normal(k1, (6, 8)), jax.random.normal(k2, (5, 8))
        >>> losses.proxy_anchor_loss(feats, jnp.array([0, 0, 1, 1, 4, 4]), proxies).shape
        ()

    References:
        S. Kim, D. Kim, M. Cho, S. Kwak. Proxy Anchor Loss for Deep Metric Learning.
        CVPR 2020.
    """
    _pairwise.check_embeddings_and_labels(embeddings, labels)
    _pairwise.check_proxies(proxies, embeddings, labels)
    _pairwise.check_positive("alpha", alpha)
    _pairwise.check_finite("delta", delta)
    dtype = _pairwise.compute_dtype(embeddings, proxies)
    x = _pairwise.l2_normalize(jnp.asarray(embeddings, dtype))
    p = _pairwise.l2_normalize(jnp.asarray(proxies, dtype))
    num_classes = p.shape[0]
    sim = p @ x.T                                                        # [m, n]
    member = jnp.arange(num_classes)[:, None] == jnp.asarray(labels)[None, :]  # [m, n]
    alpha = jnp.asarray(alpha, dtype)
    delta = jnp.asarray(delta, dtype)
    pos = _log1p_sum_exp(-alpha * (sim - delta), member)                # [m], 0 if absent
    neg = _log1p_sum_exp(alpha * (sim + delta), ~member)                 # [m]
    num_present = jnp.sum(jnp.any(member, axis=1))
    loss = jnp.sum(pos) / jnp.maximum(num_present, 1) + jnp.mean(neg)
    # A label outside [0, m) (possible only under jit) would belong to no proxy and pass
    # unnoticed: poison the batch's loss instead.
    return jnp.where(jnp.all(_pairwise.labels_in_range(labels, num_classes)), loss, jnp.nan)
