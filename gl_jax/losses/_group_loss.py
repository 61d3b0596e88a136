"""The Group Loss (Elezi et al., ECCV 2020) as pure JAX functions.

A mini-batch is treated as a group. Every sample starts from a prior over all training
classes (a softmax of its logits); a few labelled "anchors" are fixed to their class; a
similarity matrix built from the embeddings drives a few steps of replicator dynamics
(a differentiable label propagation); the loss is the negative log-likelihood of the
true class under the propagated labels.

Everything here is a pure function of arrays: it works under `jax.jit`, `jax.grad` and
`jax.vmap`, and imports nothing else of gl_jax.
"""
from __future__ import annotations

import numpy as np

import jax
import jax.numpy as jnp

from gl_jax.losses._pairwise import compute_dtype as _compute_dtype
from gl_jax.losses._pairwise import check_integer_labels, check_label_range
from gl_jax.losses._pairwise import concrete as _concrete
from gl_jax.losses._pairwise import take_label_column

# Centred rows whose squared norm is below this are treated as constant (their
# correlation with anything else is undefined, 0/0). 1e-20 keeps every realistic
# embedding, and 1/sqrt(1e-20) = 1e10 keeps gradients finite in float32.
_CONSTANT_ROW_SQNORM = 1e-20

# The original adds 1e-12 inside the log so that anchors (probability exactly 1) and
# underflowed probabilities give a finite loss and gradient.
_LOG_EPS = 1e-12


def _check_rank(name: str, x, rank: int, what: str) -> None:
    if jnp.ndim(x) != rank:
        raise ValueError(
            f"{name} must have rank {rank} ({what}), got shape {jnp.shape(x)}.")


def pearson_similarity(embeddings: jax.Array) -> jax.Array:
    """Pearson correlation between samples with negative values clipped to zero.

    For rows `f_i` of `embeddings` ([n, d]), with `c_i = f_i - mean(f_i)`:

            W_ij = max(0, <c_i, c_j> / (|c_i| |c_j|)),     W_ii = 1.

    The correlation is scale-invariant, so the raw (un-normalised) embedding is used, as
    in the paper. A constant row (zero-norm after centring, e.g. an all-zero embedding)
    has no defined correlation: it gets 0 with every other sample and 1 with itself, so
    the replicator dynamics leave its prior unchanged apart from its own reinforcement.
    The original code has no such guard and returns NaN there.

    Args:
        embeddings: `[n, d]` floating array. bfloat16/float16 are computed in float32.

    Returns:
        `[n, n]` symmetric matrix with entries in [0, 1] and ones on the diagonal.
    """
    _check_rank("embeddings", embeddings, 2, "[n, d]")
    x = jnp.asarray(embeddings, _compute_dtype(embeddings))
    centred = x - jnp.mean(x, axis=1, keepdims=True)
    sqnorm = jnp.sum(centred * centred, axis=1, keepdims=True)
    is_constant = sqnorm <= _CONSTANT_ROW_SQNORM
    # Double `where`: keep sqrt away from 0 so the gradient of the unused branch is finite.
    norm = jnp.sqrt(jnp.where(is_constant, 1.0, sqnorm))
    unit = jnp.where(is_constant, 0.0, centred / norm)
    correlation = unit @ unit.T
    n = x.shape[0]
    return jnp.where(jnp.eye(n, dtype=bool), 1.0, jnp.maximum(correlation, 0.0))


def replicator_dynamics(similarity: jax.Array, probs: jax.Array,
                        num_iterations: int = 1) -> jax.Array:
    """Discrete replicator dynamics, `num_iterations` steps of `X <- X * (W X)`, rows renormalised.

    Each step multiplies a sample's class distribution by the support its neighbours give
    each class, then renormalises the row to sum to 1. A one-hot row (an anchor) stays
    one-hot: entries at zero stay zero, and the true class keeps support `>= W_ii = 1`.

    Args:
        similarity: `[n, n]` non-negative matrix `W`.
        probs: `[n, m]` rows are probability distributions over the m classes.
        num_iterations: a Python int >= 0 (static under jit).

    Returns:
        `[n, m]` propagated distributions.
    """
    _check_rank("similarity", similarity, 2, "[n, n]")
    _check_rank("probs", probs, 2, "[n, m]")
    n = jnp.shape(probs)[0]
    if jnp.shape(similarity) != (n, n):
        raise ValueError(
            f"similarity must be [n, n] with n = probs.shape[0] = {n}; got similarity "
            f"{jnp.shape(similarity)} and probs {jnp.shape(probs)}.")
    if not isinstance(num_iterations, (int, np.integer)) or num_iterations < 0:
        raise ValueError(f"num_iterations must be a Python int >= 0, got {num_iterations!r}.")
    dtype = _compute_dtype(similarity, probs)
    w = jnp.asarray(similarity, dtype)
    x = jnp.asarray(probs, dtype)
    for _ in range(int(num_iterations)):
        x = x * (w @ x)
        # The row sum is >= sum_k x_ik^2 > 0 for a distribution and W_ii >= 1; the floor only
        # protects callers who pass a similarity with a zero diagonal.
        x = x / jnp.maximum(jnp.sum(x, axis=1, keepdims=True), jnp.finfo(dtype).tiny)
    return x


def anchor_mask(labels: jax.Array, anchors_per_class: int) -> jax.Array:
    """The first `anchors_per_class` occurrences of each class, in batch order.

    This is how the original code picks anchors; the sampler already shuffles the images
    within a class, so "first" is a random choice. `labels` `[n]` int; returns bool `[n]`.
    """
    _check_rank("labels", labels, 1, "[n]")
    labels = jnp.asarray(labels)
    same = labels[:, None] == labels[None, :]
    # Number of earlier samples (j < i) with the same label as sample i.
    earlier_same = jnp.sum(jnp.tril(same, k=-1), axis=1)
    return earlier_same < anchors_per_class


def random_anchor_mask(key: jax.Array, labels: jax.Array, anchors_per_class: int) -> jax.Array:
    """`anchors_per_class` samples of each class chosen uniformly at random with `key`.

    A class with fewer samples than `anchors_per_class` has all of them as anchors.
    `labels` `[n]` int; returns bool `[n]`.
    """
    _check_rank("labels", labels, 1, "[n]")
    labels = jnp.asarray(labels)
    n = labels.shape[0]
    # A random permutation gives distinct priorities; a sample's rank within its class is
    # the number of same-class samples with a smaller priority.
    priority = jax.random.permutation(key, n)
    same = labels[:, None] == labels[None, :]
    rank_in_class = jnp.sum(same & (priority[None, :] < priority[:, None]), axis=1)
    return rank_in_class < anchors_per_class


def _validate(logits, labels, anchors, embeddings, temperature) -> None:
    _check_rank("logits", logits, 2, "[n, m]")
    n, m = jnp.shape(logits)
    if n == 0:
        raise ValueError(f"logits must have at least one row ([n, m] with n >= 1 samples), "
                         f"got shape {jnp.shape(logits)}.")
    if not jnp.issubdtype(jnp.result_type(logits), jnp.floating):
        raise ValueError(f"logits must be floating point, got dtype {jnp.result_type(logits)}.")
    for name, x in (("labels", labels), ("anchors", anchors)):
        if jnp.shape(x) != (n,):
            raise ValueError(
                f"{name} must have shape [n] = ({n},) to match logits {jnp.shape(logits)}; "
                f"got {jnp.shape(x)}.")
    check_integer_labels(labels)
    if jnp.result_type(anchors) != jnp.bool_:
        raise ValueError(f"anchors must be boolean, got dtype {jnp.result_type(anchors)}.")
    if embeddings is not None:
        _check_rank("embeddings", embeddings, 2, "[n, d]")
        if jnp.shape(embeddings)[0] != n:
            raise ValueError(
                f"embeddings must have n = {n} rows to match logits {jnp.shape(logits)}; "
                f"got {jnp.shape(embeddings)}.")
        if not jnp.issubdtype(jnp.result_type(embeddings), jnp.floating):
            raise ValueError(
                f"embeddings must be floating point, got dtype {jnp.result_type(embeddings)}.")
    check_label_range(labels, m, "logits")
    t = _concrete(temperature)
    if t is not None and not (np.all(np.isfinite(t)) and np.all(t > 0)):
        raise ValueError(f"temperature must be finite and > 0, got {t}.")


def group_loss(logits: jax.Array,
               labels: jax.Array,
               anchors: jax.Array,
               embeddings: jax.Array | None = None,
               *,
               temperature: float | jax.Array = 1.0,
               num_iterations: int = 1,
               batch_prior: bool = False) -> jax.Array:
    r"""Per-example Group Loss.

    With `n` samples, `m` training classes, logits `z`, labels `y`, anchor mask `a`:

    1. prior: :math:`X^0_i = \mathrm{softmax}(z_i / T)` over all m classes (with
          `batch_prior`, over the classes of the batch's labels alone), and
          :math:`X^0_i = \mathrm{onehot}(y_i)` for anchors;
    2. similarity: :math:`W = \texttt{pearson\_similarity}(f)` (Pearson correlation of the
          embeddings, negatives clipped to 0, diagonal 1);
    3. `num_iterations` replicator steps :math:`X \leftarrow X \odot (W X)`, rows renormalised;
    4. loss: :math:`\ell_i = -\log(X_{i, y_i} + 10^{-12})`.

    Gradients reach the embeddings through `W` and the logits through the prior. Anchors
    give a loss of about 0. Cost: O(n^2 d + num_iterations * n^2 m).

    The paper's total objective adds a plain cross-entropy on the logits (temperature 1),
    which this function does not include so that callers can weigh it: the reference
    uses ``mean(group_loss) + 1.0 * mean(softmax_cross_entropy(logits, labels))``; the
    gl_jax trainer's default weight (`config.loss.ce_weight`) is 0.3, with 3 replicator
    iterations, chosen on validation data (`experiments/omniglot/STUDY.md`). Dropping it
    costs about 1 point of Recall@1 according to the authors.

    Args:
        logits: `[n, m]` class scores over all m training classes (not just the batch's).
        labels: `[n]` integer class of each sample, in `[0, m)`.
        anchors: `[n]` bool, True where the sample is a labelled anchor (see `anchor_mask`).
        embeddings: `[n, d]` features the similarity is built from (the paper uses the
            backbone's pooled feature). If None, the similarity is built from the logits: this
            differs from the paper and is only meant for models without a separate embedding.
        temperature: softmax temperature T > 0 of the prior (a float or a scalar array).
        num_iterations: replicator steps, a Python int >= 0 (the original uses 1).
        batch_prior: renormalise the prior over the classes present in `labels` (the
            others get probability 0). Not the paper's: with many training classes and an
            untrained classifier the softmax over all m is nearly uniform and the labels
            then spread from the anchors alone; over the batch's few classes the same
            logits say more. The labels only choose which classes compete.

    Returns:
        `[n]` per-example loss; the caller reduces (e.g. `jnp.mean`). float32 for
        bfloat16/float16/float32 inputs (all internal arithmetic is float32), float64 if an
        input is float64.

    Raises:
        ValueError: on wrong ranks or shapes (an empty batch included), non-integer
            labels, non-boolean anchors, a non-positive temperature or, when the values are
            concrete (not under `jit`/`vmap`), labels outside `[0, m)`. Under `jit` the
            values cannot be checked: an out-of-range label (negative ones included) gives
            a NaN loss for its row (and so a NaN mean), and a non-positive or non-finite
            traced temperature NaN for every row, which a trainer's non-finite check
            catches.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from gl_jax import losses
        >>> key1, key2 = jax.random.split(jax.random.key(0))
        >>> labels = jnp.array([0, 0, 1, 1, 2, 2])
        >>> logits = jax.random.normal(key1, (6, 5))      # 5 training classes
        >>> feats = jax.random.normal(key2, (6, 16))
        >>> anchors = losses.anchor_mask(labels, anchors_per_class=1)
        >>> loss = losses.group_loss(logits, labels, anchors, feats, temperature=10.0)
        >>> loss.shape
        (6,)

    References:
        I. Elezi, S. Vascon, A. Torcinovich, M. Pelillo, L. Leal-Taixe. The Group Loss for
        Deep Metric Learning. ECCV 2020 (arXiv:1912.00385).
    """
    _validate(logits, labels, anchors, embeddings, temperature)
    dtype = _compute_dtype(logits, embeddings)
    logits = jnp.asarray(logits, dtype)
    labels = jnp.asarray(labels)
    num_classes = logits.shape[1]

    # Under jit a traced temperature cannot be checked: a non-positive or non-finite one
    # gives NaN everywhere, loudly, as an out-of-range label does for its row.
    temperature = jnp.asarray(temperature, dtype)
    temperature = jnp.where((temperature > 0) & jnp.isfinite(temperature), temperature, jnp.nan)
    scaled = logits / temperature
    one_hot = jax.nn.one_hot(labels, num_classes, dtype=dtype)
    if batch_prior:
        in_batch = jnp.any(one_hot > 0, axis=0)
        scaled = jnp.where(in_batch[None, :], scaled, -jnp.inf)
    prior = jax.nn.softmax(scaled, axis=-1)
    probs = jnp.where(jnp.asarray(anchors)[:, None], one_hot, prior)

    features = logits if embeddings is None else embeddings
    similarity = pearson_similarity(features)
    probs = replicator_dynamics(similarity, probs, num_iterations)

    # An out-of-range label (possible only under jit) gives NaN for its row, loudly.
    true_prob = take_label_column(probs, labels)
    return -jnp.log(true_prob + _LOG_EPS)
