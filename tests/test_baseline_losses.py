"""Tests of the baseline losses against NumPy references written from each paper's equations.

Every reference is a float64 loop over anchors/pairs/proxies, sharing no code with
gl_jax.losses. Then: hand-computed values, gradients (`check_grads`), jit == eager,
vmap == loop, bfloat16 inputs, degenerate batches, and argument errors.
"""
import math

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax import test_util as jtu

from gl_jax import losses


# ------------------------------------------------------------------------- references
def _unit(x):
    x = np.asarray(x, np.float64)
    out = np.zeros_like(x)
    for i, row in enumerate(x):
        norm = math.sqrt(float(row @ row))
        out[i] = row / norm if norm > 1e-12 else 0.0
    return out


def _dist(a, b, squared=False):
    d2 = float(np.sum((a - b) ** 2))
    return d2 if squared else math.sqrt(d2)


def ref_triplet(emb, labels, margin=0.2, soft_margin=False, normalize=True, squared=False,
                triplets="batch_hard"):
    """Hermans et al. eq. (5): [m + max_p D(a,p) - min_n D(a,n)]_+ (soft: log(1 + e^x)).

    triplets="all": every (a, p, k), the batch loss averaged over the non-zero ones; each
    anchor's share n * (its sum) / (number of non-zero triplets) is returned."""
    x = _unit(emb) if normalize else np.asarray(emb, np.float64)
    n = len(labels)
    out = np.zeros(n)
    if triplets == "all":
        nonzero = 0
        for a in range(n):
            for p in range(n):
                for k in range(n):
                    if p == a or labels[p] != labels[a] or labels[k] == labels[a]:
                        continue
                    gap = _dist(x[a], x[p], squared) - _dist(x[a], x[k], squared)
                    loss = math.log1p(math.exp(gap)) if soft_margin else max(0.0, margin + gap)
                    out[a] += loss
                    nonzero += loss > 0
        return n * out / max(nonzero, 1)
    for a in range(n):
        pos = [_dist(x[a], x[p], squared) for p in range(n) if p != a and labels[p] == labels[a]]
        neg = [_dist(x[a], x[k], squared) for k in range(n) if labels[k] != labels[a]]
        if not pos or not neg:
            continue
        gap = max(pos) - min(neg)
        out[a] = math.log1p(math.exp(gap)) if soft_margin else max(0.0, margin + gap)
    return out


def ref_contrastive(emb, labels, pos_margin=0.0, neg_margin=0.5, normalize=True, squared=True,
                    average="per_anchor"):
    """Hadsell et al. eq. (4) with a positive margin, each anchor's pair sets averaged.

    squared=False: plain hinges [D - m+]_+, [m- - D]_+. average="nonzero_pairs": positive
    and negative costs each summed over the batch and divided by the number of that
    kind's non-zero pairs; each anchor's share (n times its sums over the counts)."""
    x = _unit(emb) if normalize else np.asarray(emb, np.float64)
    n = len(labels)
    cost = (lambda h: 0.5 * max(0.0, h) ** 2) if squared else (lambda h: max(0.0, h))
    pos, neg = [[] for _ in range(n)], [[] for _ in range(n)]
    for i in range(n):
        for j in range(n):
            if j == i:
                continue
            d = _dist(x[i], x[j])
            if labels[j] == labels[i]:
                pos[i].append(cost(d - pos_margin))
            else:
                neg[i].append(cost(neg_margin - d))
    if average == "nonzero_pairs":
        pos_count = max(sum(c > 0 for row in pos for c in row), 1)
        neg_count = max(sum(c > 0 for row in neg for c in row), 1)
        return np.array([n * (sum(pos[i]) / pos_count + sum(neg[i]) / neg_count)
                         for i in range(n)])
    return np.array([(np.mean(pos[i]) if pos[i] else 0.0) + (np.mean(neg[i]) if neg[i] else 0.0)
                     for i in range(n)])


def ref_multi_similarity(emb, labels, alpha=2.0, beta=50.0, base=0.5, mining_margin=0.1,
                         counts=None):
    """Wang et al. eq. (7)-(8) mining and eq. (10) loss, per anchor."""
    x = _unit(emb)
    n = len(labels)
    out = np.zeros(n)
    for i in range(n):
        pos = [(j, float(x[i] @ x[j])) for j in range(n) if j != i and labels[j] == labels[i]]
        neg = [(j, float(x[i] @ x[j])) for j in range(n) if labels[j] != labels[i]]
        if not pos or not neg:
            continue
        min_pos = min(s for _, s in pos)
        max_neg = max(s for _, s in neg)
        kept_neg = [s for _, s in neg if s > min_pos - mining_margin]
        kept_pos = [s for _, s in pos if s < max_neg + mining_margin]
        if counts is not None:
            counts["dropped"] += (len(pos) - len(kept_pos)) + (len(neg) - len(kept_neg))
        out[i] = (math.log(1.0 + sum(math.exp(-alpha * (s - base)) for s in kept_pos)) / alpha
                  + math.log(1.0 + sum(math.exp(beta * (s - base)) for s in kept_neg)) / beta)
    return out


def ref_proxy_anchor(emb, labels, proxies, alpha=32.0, delta=0.1):
    """Kim et al. eq. (4): positive term over the batch's classes, negative over all."""
    x, p = _unit(emb), _unit(proxies)
    m = len(p)
    present = sorted(set(int(y) for y in labels))
    pos_total, neg_total = 0.0, 0.0
    for c in range(m):
        pos_sum = sum(math.exp(-alpha * (float(x[i] @ p[c]) - delta))
                      for i in range(len(labels)) if labels[i] == c)
        neg_sum = sum(math.exp(alpha * (float(x[i] @ p[c]) + delta))
                      for i in range(len(labels)) if labels[i] != c)
        if c in present:
            pos_total += math.log(1.0 + pos_sum)
        neg_total += math.log(1.0 + neg_sum)
    return pos_total / len(present) + neg_total / m


def ref_normalized_softmax(emb, labels, proxies, temperature=0.05):
    """Zhai & Wu: cross-entropy of cosine logits / T."""
    x, w = _unit(emb), _unit(proxies)
    out = np.zeros(len(labels))
    for i in range(len(labels)):
        z = [float(x[i] @ w[c]) / temperature for c in range(len(w))]
        top = max(z)
        log_norm = top + math.log(sum(math.exp(v - top) for v in z))
        out[i] = log_norm - z[labels[i]]
    return out


def random_batch(seed, classes=4, per_class=3, d=6, m=None, spread=1.0):
    """A P x K batch (shuffled) with class-dependent means so that losses are non-trivial."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), per_class)
    rng.shuffle(labels)
    centres = rng.normal(size=(classes, d))
    emb = centres[labels] + spread * rng.normal(size=(len(labels), d))
    proxies = rng.normal(size=(m or classes + 2, d))
    return emb, labels, proxies


# Uniform call signatures: (jax_fn, ref_fn, needs_proxies, returns_scalar).
LOSSES = {
    "triplet": (losses.batch_hard_triplet_loss, ref_triplet, False, False),
    "contrastive": (losses.contrastive_loss, ref_contrastive, False, False),
    "multi_similarity": (losses.multi_similarity_loss, ref_multi_similarity, False, False),
    "proxy_anchor": (losses.proxy_anchor_loss, ref_proxy_anchor, True, True),
    "normalized_softmax": (losses.normalized_softmax_loss, ref_normalized_softmax, True, False),
}

HPARAMS = {
    "triplet": [dict(), dict(margin=0.5, squared=True), dict(soft_margin=True),
                dict(normalize=False, margin=1.0), dict(triplets="all"),
                dict(triplets="all", margin=0.05, soft_margin=True)],
    "contrastive": [dict(), dict(pos_margin=0.3, neg_margin=1.2), dict(normalize=False,
                                                                     neg_margin=3.0),
                    dict(squared=False, average="nonzero_pairs", pos_margin=0.3,
                         neg_margin=1.2),
                    dict(average="nonzero_pairs", pos_margin=0.2, neg_margin=1.0),
                    dict(squared=False, neg_margin=1.0)],
    "multi_similarity": [dict(), dict(alpha=1.0, beta=10.0, base=0.2, mining_margin=0.3),
                         dict(mining_margin=5.0)],
    "proxy_anchor": [dict(), dict(alpha=4.0, delta=0.3)],
    "normalized_softmax": [dict(), dict(temperature=1.0)],
}


def call(name, emb, labels, proxies, **kw):
    fn, _, needs_proxies, _ = LOSSES[name]
    return fn(emb, labels, proxies, **kw) if needs_proxies else fn(emb, labels, **kw)


def call_ref(name, emb, labels, proxies, **kw):
    _, ref, needs_proxies, _ = LOSSES[name]
    return ref(emb, labels, proxies, **kw) if needs_proxies else ref(emb, labels, **kw)


CASES = [(name, i) for name in LOSSES for i in range(len(HPARAMS[name]))]


# ------------------------------------------------------------------ reference agreement
@pytest.mark.parametrize("name,variant", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_numpy_reference_float64(name, variant, seed):
    emb, labels, proxies = random_batch(seed)
    kw = HPARAMS[name][variant]
    expected = call_ref(name, emb, labels, proxies, **kw)
    with jax.enable_x64(True):
        got = call(name, jnp.asarray(emb), jnp.asarray(labels), jnp.asarray(proxies), **kw)
        assert got.dtype == jnp.float64
    assert np.shape(got) == np.shape(expected)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-10)
    assert np.any(np.asarray(expected) > 1e-3), "the case must exercise the loss"


@pytest.mark.parametrize("name", list(LOSSES))
def test_float32_close_to_reference(name):
    emb, labels, proxies = random_batch(3, classes=5, per_class=4, d=16)
    expected = call_ref(name, emb, labels, proxies)
    got = call(name, jnp.asarray(emb, jnp.float32), jnp.asarray(labels),
               jnp.asarray(proxies, jnp.float32))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-5)


def test_multi_similarity_mining_drops_pairs_in_the_reference_cases():
    """The reference cases above must actually exercise the mining rule."""
    emb, labels, _ = random_batch(0)
    counts = {"dropped": 0}
    ref_multi_similarity(emb, labels, counts=counts)
    assert counts["dropped"] > 0
    # With a huge mining margin nothing is dropped, and the loss differs.
    full = losses.multi_similarity_loss(jnp.asarray(emb), jnp.asarray(labels), mining_margin=5.0)
    mined = losses.multi_similarity_loss(jnp.asarray(emb), jnp.asarray(labels))
    assert not np.allclose(full, mined)


# ------------------------------------------------------------------------ hand-computed
def test_triplet_hand_computed():
    """1-d points 0, 1 (class 0) and 3, 1.5 (class 1), unnormalised, margin 1.

    a=0: d+ = 1, d- = min(3, 1.5) = 1.5 -> [1 + 1 - 1.5]_+ = .5
    a=1: d+ = 1, d- = min(2, .5) = .5   -> 1.5
    a=3: d+ = 1.5, d- = min(3, 2) = 2   -> .5
    a=1.5: d+ = 1.5, d- = min(1.5, .5) = .5 -> 2
    """
    emb = jnp.array([[0.0], [1.0], [3.0], [1.5]])
    got = losses.batch_hard_triplet_loss(emb, jnp.array([0, 0, 1, 1]), margin=1.0,
                                         normalize=False)
    np.testing.assert_allclose(got, [0.5, 1.5, 0.5, 2.0], rtol=1e-6)


def test_contrastive_hand_computed():
    """Unit vectors e1, e1, e2 (labels 0, 0, 1), margins 0 / 2.

    D(e1, e1) = 0, D(e1, e2) = sqrt(2). Anchor 0: positive cost 0, negative
    .5 (2 - sqrt 2)^2; anchor 2 has no positive: .5 (2 - sqrt 2)^2 averaged over 2 negatives.
    """
    emb = jnp.array([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    got = losses.contrastive_loss(emb, jnp.array([0, 0, 1]), neg_margin=2.0)
    neg = 0.5 * (2 - math.sqrt(2)) ** 2
    np.testing.assert_allclose(got, [neg, neg, neg], rtol=1e-6)


def test_proxy_anchor_hand_computed():
    """Proxies e1 (class 0), e2 (class 1), -e1 (class 2, absent); samples e1 (0), e2 (1).

    alpha = 1, delta = 0. Positive term: classes 0 and 1 each log(1 + e^{-1}), over |P+| = 2.
    Negative term: proxy 0 sees e2 (s = 0): log 2; proxy 1 sees e1 (s = 0): log 2; proxy 2
    sees e1 (s = -1) and e2 (s = 0): log(1 + e^{-1} + 1); divided by m = 3.
    """
    emb = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    proxies = jnp.array([[2.0, 0.0], [0.0, 0.5], [-1.0, 0.0]])
    got = losses.proxy_anchor_loss(emb, jnp.array([0, 1]), proxies, alpha=1.0, delta=0.0)
    expected = math.log(1 + math.exp(-1)) + (2 * math.log(2) + math.log(2 + math.exp(-1))) / 3
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_normalized_softmax_is_cross_entropy_of_cosines():
    emb = jnp.array([[3.0, 0.0], [0.0, -2.0]])
    proxies = jnp.array([[1.0, 0.0], [0.0, 5.0]])
    got = losses.normalized_softmax_loss(emb, jnp.array([0, 0]), proxies, temperature=0.5)
    # Sample 0: cosines (1, 0) -> logits (2, 0); sample 1: cosines (0, -1) -> (0, -2).
    expected = [math.log(1 + math.exp(-2)), math.log(1 + math.exp(-2))]
    np.testing.assert_allclose(got, expected, rtol=1e-6)


# --------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("name,kw", [
    ("triplet", dict(soft_margin=True)),
    ("triplet", dict(margin=0.3)),
    ("triplet", dict(triplets="all", margin=0.3)),
    ("contrastive", dict(pos_margin=0.1, neg_margin=1.5)),
    ("contrastive", dict(pos_margin=0.1, neg_margin=1.5, squared=False,
                         average="nonzero_pairs")),
    ("multi_similarity", dict(alpha=2.0, beta=10.0)),
    ("proxy_anchor", dict(alpha=4.0)),
    ("normalized_softmax", dict(temperature=0.5)),
])
@pytest.mark.slow
def test_check_grads(name, kw):
    """Away from the max/min/mining/hinge switches (random data) every loss is smooth."""
    emb, labels, proxies = random_batch(7, classes=3, per_class=3, d=4)
    _, _, needs_proxies, _ = LOSSES[name]
    with jax.enable_x64(True):
        if needs_proxies:
            f = lambda e, p: jnp.sum(call(name, e, labels, p, **kw))
            args = (jnp.asarray(emb), jnp.asarray(proxies))
        else:
            f = lambda e: jnp.sum(call(name, e, labels, None, **kw))
            args = (jnp.asarray(emb),)
        jtu.check_grads(jax.jit(f), args, order=1, modes=["fwd", "rev"], atol=1e-5, rtol=1e-5)
        grads = jax.grad(f)(*args)
        assert float(jnp.max(jnp.abs(grads))) > 1e-6, "the gradient must not vanish"


@pytest.mark.parametrize("name", list(LOSSES))
def test_jit_equals_eager(name):
    emb, labels, proxies = random_batch(9)
    args = (jnp.asarray(emb, jnp.float32), jnp.asarray(labels), jnp.asarray(proxies, jnp.float32))
    eager = call(name, *args)
    jitted = jax.jit(lambda e, l, p: call(name, e, l, p))(*args)
    np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(LOSSES))
def test_vmap_equals_loop(name):
    problems = [random_batch(20 + g) for g in range(3)]
    stacked = [jnp.asarray(np.stack(parts)) for parts in zip(*problems)]
    batched = jax.vmap(lambda e, l, p: call(name, e, l, p))(*stacked)
    for g, (emb, labels, proxies) in enumerate(problems):
        single = call(name, jnp.asarray(emb), jnp.asarray(labels), jnp.asarray(proxies))
        np.testing.assert_allclose(batched[g], single, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(LOSSES))
def test_bfloat16_inputs_computed_in_float32(name):
    emb, labels, proxies = random_batch(30)
    e16, p16 = jnp.asarray(emb, jnp.bfloat16), jnp.asarray(proxies, jnp.bfloat16)
    got = call(name, e16, labels, p16)
    assert got.dtype == jnp.float32
    expected = call(name, e16.astype(jnp.float32), labels, p16.astype(jnp.float32))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------ degenerate
def _degenerate(case):
    emb, labels, proxies = random_batch(5, classes=3, per_class=2, d=4)
    if case == "singleton_class":
        labels = np.array([0, 0, 1, 1, 2, 1])         # class 2 has one sample
    elif case == "one_class":
        labels = np.zeros_like(labels)
    elif case == "all_singletons":
        labels = np.arange(len(labels)) % 5
    elif case == "zero_rows":
        emb[1] = 0.0
        emb[3] = 0.0
    elif case == "duplicates":
        emb[1] = emb[0]
        emb[4] = emb[0]
    return emb, labels, proxies


@pytest.mark.parametrize("case", ["singleton_class", "one_class", "all_singletons",
                                  "zero_rows", "duplicates"])
@pytest.mark.parametrize("name", list(LOSSES))
def test_degenerate_batches_finite_and_match_reference(name, case):
    emb, labels, proxies = _degenerate(case)
    _, _, needs_proxies, _ = LOSSES[name]

    def total(e, p):
        return jnp.mean(call(name, e, jnp.asarray(labels), p))

    value, grads = jax.jit(jax.value_and_grad(total, argnums=(0, 1) if needs_proxies else 0))(
        jnp.asarray(emb, jnp.float32), jnp.asarray(proxies, jnp.float32))
    assert np.isfinite(float(value))
    for g in (grads if needs_proxies else (grads,)):
        assert np.isfinite(np.asarray(g)).all()
    expected = np.mean(call_ref(name, emb, labels, proxies))
    np.testing.assert_allclose(float(value), expected, rtol=1e-4, atol=1e-5)


NON_FINITE_CASES = [(name, kw) for name in LOSSES for kw in HPARAMS[name]]


@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.parametrize("name,kw", NON_FINITE_CASES)
def test_non_finite_embedding_gives_nan_loss(name, kw, value):
    """A broken model must not be hidden: one NaN (or inf) entry in one embedding makes
    the batch's loss NaN, eagerly and under jit. (Comparisons with NaN are False, so a
    threshold or a mining rule could otherwise drop the pair and return a finite loss.)"""
    emb, labels, proxies = random_batch(11)
    emb = emb.astype(np.float32)
    emb[4, 2] = value
    eager = np.mean(call(name, emb, labels, proxies, **kw))
    jitted = np.mean(jax.jit(lambda e: call(name, e, labels, proxies, **kw))(emb))
    assert np.isnan(eager) and np.isnan(jitted)


@pytest.mark.parametrize("name", ["triplet", "contrastive", "multi_similarity"])
def test_nan_embedding_poisons_every_anchor_that_meets_it(name):
    """Per anchor: in a P x K batch every anchor compares itself with every other sample
    (as a positive or a negative candidate), so every per-anchor loss is NaN, and so is
    the gradient."""
    emb, labels, _ = random_batch(12, classes=3, per_class=3)
    emb[0] = np.nan
    got = np.asarray(call(name, emb, labels, None))
    assert np.isnan(got).all()
    grad = jax.jit(jax.grad(lambda e: jnp.mean(call(name, e, labels, None))))(jnp.asarray(emb))
    assert np.isnan(np.asarray(grad)).any()


def test_pair_losses_are_zero_without_pairs():
    emb = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)))
    one_class, singletons = jnp.zeros(4, jnp.int32), jnp.arange(4)
    for labels in (one_class, singletons):
        np.testing.assert_array_equal(losses.batch_hard_triplet_loss(emb, labels), 0.0)
        np.testing.assert_array_equal(losses.multi_similarity_loss(emb, labels), 0.0)


# ------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("override,match", [
    (dict(emb=np.zeros((4,), np.float32)), "embeddings must have rank 2"),
    (dict(emb=np.zeros((4, 3), np.int32)), "embeddings must be floating point"),
    (dict(labels=np.zeros((3,), np.int32)), r"labels must have shape \[n\] = \(4,\)"),
    (dict(labels=np.zeros((4,), np.float32)), "labels must be integers"),
])
def test_bad_common_input_raises(name, override, match):
    args = dict(emb=np.ones((4, 3), np.float32), labels=np.array([0, 1, 2, 0]),
                proxies=np.ones((3, 3), np.float32))
    args.update(override)
    with pytest.raises(ValueError, match=match):
        call(name, args["emb"], args["labels"], args["proxies"])


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("name", list(LOSSES))
def test_empty_batch_raises_naming_the_shape(name, jit):
    """n = 0 has no loss to compute (a mean over nothing); say so instead of failing
    inside a reduction (triplet, multi-similarity) or returning -inf / an empty array."""
    emb, labels = np.zeros((0, 4), np.float32), np.zeros((0,), np.int32)
    proxies = np.ones((3, 4), np.float32)
    f = jax.jit(lambda e, l, p: call(name, e, l, p)) if jit else (
        lambda e, l, p: call(name, e, l, p))
    with pytest.raises(ValueError, match=r"embeddings must have at least one row .*\(0, 4\)"):
        f(emb, labels, proxies)


@pytest.mark.parametrize("name", ["proxy_anchor", "normalized_softmax"])
def test_no_proxies_raises_naming_the_shape(name):
    emb, labels, _ = random_batch(0)
    with pytest.raises(ValueError, match=r"proxies must have at least one row .*\(0, 6\)"):
        call(name, emb, labels, np.zeros((0, 6), np.float32))


@pytest.mark.parametrize("name", ["proxy_anchor", "normalized_softmax"])
@pytest.mark.parametrize("override,match", [
    (dict(proxies=np.ones((3,), np.float32)), "proxies must have rank 2"),
    (dict(proxies=np.ones((3, 5), np.float32)), r"d = embeddings.shape\[1\] = 3"),
    (dict(labels=np.array([0, 1, 3, 0])), r"labels must lie in \[0, 3\)"),
    (dict(labels=np.array([0, -1, 2, 0])), r"labels must lie in \[0, 3\)"),
])
def test_bad_proxy_input_raises(name, override, match):
    args = dict(emb=np.ones((4, 3), np.float32), labels=np.array([0, 1, 2, 0]),
                proxies=np.ones((3, 3), np.float32))
    args.update(override)
    with pytest.raises(ValueError, match=match):
        call(name, args["emb"], args["labels"], args["proxies"])


@pytest.mark.parametrize("name", ["proxy_anchor", "normalized_softmax"])
@pytest.mark.parametrize("bad", [-1, -3, 5, 9])
def test_out_of_range_label_under_jit_is_nan(name, bad):
    """Labels index the proxies; under jit they cannot be checked, so a label outside
    [0, m) must poison the loss (NaN) instead of wrapping (-1 = the last proxy) or
    silently belonging to no proxy."""
    emb, labels, proxies = random_batch(4, classes=3, per_class=2, m=5)
    labels = labels.copy()
    f = jax.jit(lambda e, l, p: call(name, e, l, p))
    assert np.isfinite(f(emb, labels, proxies)).all()
    labels[2] = bad
    got = np.asarray(f(emb, labels, proxies))
    assert np.isnan(got.mean())
    if name == "normalized_softmax":      # per example: only the bad row is NaN
        assert np.isnan(got[2]) and np.isfinite(np.delete(got, 2)).all()


@pytest.mark.parametrize("name,kw,match", [
    ("triplet", dict(margin=-0.1), "margin must be finite and >= 0"),
    ("contrastive", dict(neg_margin=0.0), "neg_margin must be finite and > 0"),
    ("contrastive", dict(pos_margin=-1.0), "pos_margin must be finite and >= 0"),
    ("contrastive", dict(average="mean"), "average must be 'per_anchor' or 'nonzero_pairs'"),
    ("triplet", dict(triplets="hard"), "triplets must be 'batch_hard' or 'all'"),
    ("multi_similarity", dict(beta=0.0), "beta must be finite and > 0"),
    ("multi_similarity", dict(base=float("nan")), "base must be finite"),
    ("proxy_anchor", dict(alpha=-1.0), "alpha must be finite and > 0"),
    ("normalized_softmax", dict(temperature=0.0), "temperature must be finite and > 0"),
])
def test_bad_hyperparameter_raises(name, kw, match):
    emb, labels, proxies = random_batch(0)
    with pytest.raises(ValueError, match=match):
        call(name, emb, labels, proxies, **kw)
