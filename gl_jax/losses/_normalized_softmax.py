"""Normalised softmax (Zhai & Wu, BMVC 2019): a temperature-scaled cosine classifier."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from gl_jax.losses import _pairwise


def normalized_softmax_loss(embeddings: jax.Array,
                            labels: jax.Array,
                            proxies: jax.Array,
                            *,
                            temperature: float | jax.Array = 0.05) -> jax.Array:
    r"""Per-example cross-entropy of a cosine classifier with temperature.

    With L2-normalised embedding :math:`\hat x_i` and class weights :math:`\hat w_c`
    (the `proxies`, normalised, no bias):

    .. math::
        \ell_i = -\log \frac{\exp(\hat w_{y_i}^\top \hat x_i / T)}
                            {\sum_{c=1}^{m} \exp(\hat w_c^\top \hat x_i / T)}.

    Which variant is the default, and why: there is one, the paper's. It equals
    pytorch-metric-learning's `NormalizedSoftmaxLoss` (its `W` is `proxies.T`, `[d, m]`)
    with its mean over the batch (tests/test_pml_parity.py). The paper's other training
    choices belong to the model and the sampler, not to the loss.

    Args:
        embeddings: `[n, d]` floating array (normalised inside).
        labels: `[n]` integers in `[0, m)`.
        proxies: `[m, d]` class weights (in the gl_jax trainer: the classifier's
            `kernel.T`; its bias is not used).
        temperature: T > 0 (paper: 0.05).

    Returns:
        `[n]` per-example loss, float32 (float64 for float64 input); reduce with `jnp.mean`.

    Raises:
        ValueError: on wrong ranks or shapes (n = 0 included), non-integer labels, a
            non-positive temperature or, when concrete, labels outside `[0, m)`. Under jit an
            out-of-range label (negative ones included) gives NaN for its row.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from gl_jax import losses
        >>> k1, k2 = jax.random.split(jax.random.key(0))
        >>> feats, proxies = jax.random.normal(k1, (4, 8)), jax.random.normal(k2, (3, 8))
        >>> losses.normalized_softmax_loss(feats, jnp.array([0, 2, 1, 2]), proxies).shape
        (4,)

    References:
        A. Zhai, H.-Y. Wu. Classification is a Strong Baseline for Deep Metric Learning.
        BMVC 2019 (arXiv:1811.12649).
    """
    _pairwise.check_embeddings_and_labels(embeddings, labels)
    _pairwise.check_proxies(proxies, embeddings, labels)
    _pairwise.check_positive("temperature", temperature)
    dtype = _pairwise.compute_dtype(embeddings, proxies)
    x = _pairwise.l2_normalize(jnp.asarray(embeddings, dtype))
    w = _pairwise.l2_normalize(jnp.asarray(proxies, dtype))
    logits = (x @ w.T) / jnp.asarray(temperature, dtype)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return -_pairwise.take_label_column(log_probs, labels)
