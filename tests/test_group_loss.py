"""Tests of gl_jax.losses.group_loss against a NumPy reference written from the equations."""
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jax
import jax.numpy as jnp
from jax import test_util as jtu

from gl_jax import losses


# ---------------------------------------------------------------------------------------
# Independent reference, float64, written from the reference's section 1 with loops.
def reference_group_loss(logits, labels, anchors, embeddings, temperature, num_iterations,
                         batch_prior=False):
    logits = np.asarray(logits, np.float64)
    feats = np.asarray(embeddings, np.float64)
    n, m = logits.shape
    # batch_prior: the softmax runs over the classes that occur in labels alone.
    classes = sorted(set(int(y) for y in labels)) if batch_prior else list(range(m))
    x = np.zeros((n, m))
    for i in range(n):
        if anchors[i]:
            x[i, labels[i]] = 1.0
        else:
            z = logits[i, classes] / temperature
            e = np.exp(z - z.max())
            x[i, classes] = e / e.sum()
    w = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if i == j:
                w[i, j] = 1.0
                continue
            ci = feats[i] - feats[i].mean()
            cj = feats[j] - feats[j].mean()
            denom = np.linalg.norm(ci) * np.linalg.norm(cj)
            w[i, j] = max(0.0, float(ci @ cj) / denom) if denom > 0 else 0.0
    for _ in range(num_iterations):
        support = w @ x
        x = x * support
        x = x / x.sum(axis=1, keepdims=True)
    return np.array([-math.log(x[i, labels[i]] + 1e-12) for i in range(n)])


def random_problem(seed, n=12, m=7, d=5, classes=4, anchor_prob=0.3):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, m)) * 3
    labels = rng.integers(0, min(classes, m), size=n)
    anchors = rng.random(n) < anchor_prob
    feats = rng.normal(size=(n, d))
    return logits, labels, anchors, feats


# ---------------------------------------------------------------------------------------
def test_hand_computed_example():
    """n = 4, m = 3, worked out by hand.

    Centred embeddings: f0 = (1,0,-1), f1 = 2 f0, f2 = -f0, f3 = (1,-1,0). Correlations:
    r01 = 1, r02 = -1 -> 0, r03 = 1/2, r12 = 0, r13 = 1/2, r23 = -1/2 -> 0, so
            W = [[1, 1, 0, .5], [1, 1, 0, .5], [0, 0, 1, 0], [.5, .5, 0, 1]].
    Priors (T = 1, logits are logs of probabilities): anchors 0 (class 0) and 2 (class 1)
    are one-hot; x1 = (.2, .4, .4), x3 = (.5, .25, .25).
    W X: row1 = (1.45, .525, .525), row3 = (1.1, .45, .45).
    X * W X: row1 = (.29, .21, .21) / .71, row3 = (.55, .1125, .1125) / .775.
    Losses: sample 1 (label 0) -log(.29/.71) = log(71/29); sample 3 (label 2)
    -log(.1125/.775) = log(62/9); anchors 0.
    """
    logits = jnp.log(jnp.array([[.5, .25, .25], [.2, .4, .4], [.3, .3, .4], [.5, .25, .25]]))
    labels = jnp.array([0, 0, 1, 2])
    anchors = jnp.array([True, False, True, False])
    feats = jnp.array([[1., 0, -1], [2, 0, -2], [-1, 0, 1], [1, -1, 0]])
    expected_w = np.array([[1, 1, 0, .5], [1, 1, 0, .5], [0, 0, 1, 0], [.5, .5, 0, 1]])
    np.testing.assert_allclose(losses.pearson_similarity(feats), expected_w, atol=1e-6)
    loss = losses.group_loss(logits, labels, anchors, feats)
    assert loss.dtype == jnp.float32 and loss.shape == (4,)
    np.testing.assert_allclose(loss, [0.0, math.log(71 / 29), 0.0, math.log(62 / 9)],
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("seed,temperature,iterations", [
    (0, 1.0, 1), (1, 24.0, 1), (2, 0.3, 3), (3, 79.0, 0), (4, 5.0, 5)])
def test_matches_numpy_reference_float64(seed, temperature, iterations):
    logits, labels, anchors, feats = random_problem(seed)
    expected = reference_group_loss(logits, labels, anchors, feats, temperature, iterations)
    with jax.enable_x64(True):
        got = losses.group_loss(jnp.asarray(logits, jnp.float64), jnp.asarray(labels),
                                jnp.asarray(anchors), jnp.asarray(feats, jnp.float64),
                                temperature=temperature, num_iterations=iterations)
        assert got.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed,iterations", [(10, 1), (11, 3)])
def test_batch_prior_matches_numpy_reference(seed, iterations):
    """The prior renormalised over the batch's classes: 4 of 30 classes occur."""
    logits, labels, anchors, feats = random_problem(seed, m=30, classes=4)
    expected = reference_group_loss(logits, labels, anchors, feats, 3.0, iterations,
                                    batch_prior=True)
    with jax.enable_x64(True):
        got = losses.group_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(anchors),
                                jnp.asarray(feats), temperature=3.0,
                                num_iterations=iterations, batch_prior=True)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-10, atol=1e-12)
    plain = reference_group_loss(logits, labels, anchors, feats, 3.0, iterations)
    assert np.max(np.abs(plain - expected)) > 1e-2   # the option changes the loss


def test_batch_prior_gradients_and_vmap():
    logits, labels, anchors, feats = random_problem(12, n=8, m=20, classes=3)
    # One jitted program (int32 labels: x64 is on below) instead of hundreds of eager ones.
    labels32 = labels.astype(np.int32)
    fn = jax.jit(lambda z, f: jnp.sum(losses.group_loss(z, labels32, anchors, f, temperature=2.0,
                                                        num_iterations=2, batch_prior=True)))
    with jax.enable_x64(True):
        jtu.check_grads(fn, (jnp.asarray(logits), jnp.asarray(feats)), order=1,
                        modes=("rev",), atol=1e-6, rtol=1e-6)
        grads = jax.grad(fn)(jnp.asarray(logits), jnp.asarray(feats))
    absent = np.setdiff1d(np.arange(20), labels)
    assert np.all(np.asarray(grads)[:, absent] == 0)   # absent classes take no part
    batched = jax.vmap(lambda z, f: losses.group_loss(z, labels, anchors, f, batch_prior=True))(
        jnp.stack([logits, 2 * logits]).astype(jnp.float32),
        jnp.stack([feats, feats]).astype(jnp.float32))
    single = losses.group_loss(jnp.asarray(2 * logits, jnp.float32), labels, anchors,
                               jnp.asarray(feats, jnp.float32), batch_prior=True)
    np.testing.assert_allclose(batched[1], single, rtol=1e-6)


def test_float32_close_to_reference():
    logits, labels, anchors, feats = random_problem(7, n=35, m=98, d=64, classes=5)
    expected = reference_group_loss(logits, labels, anchors, feats, 10.0, 2)
    got = losses.group_loss(jnp.asarray(logits, jnp.float32), labels, anchors,
                            jnp.asarray(feats, jnp.float32), temperature=10.0, num_iterations=2)
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-5)


def test_logits_used_when_no_embeddings():
    logits, labels, anchors, _ = random_problem(8)
    expected = reference_group_loss(logits, labels, anchors, logits, 2.0, 1)
    got = losses.group_loss(jnp.asarray(logits, jnp.float32), labels, anchors, temperature=2.0)
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-5)


def test_components_match_reference_pieces():
    rng = np.random.default_rng(3)
    w = np.abs(rng.normal(size=(6, 6)))
    x = rng.random((6, 4))
    x /= x.sum(1, keepdims=True)
    ref = x.copy()
    for _ in range(2):
        ref = ref * (w @ ref)
        ref /= ref.sum(1, keepdims=True)
    np.testing.assert_allclose(losses.replicator_dynamics(w, x, 2), ref, rtol=1e-5)
    # An anchor (one-hot row) stays one-hot under the dynamics.
    x[2] = [0, 0, 1, 0]
    np.fill_diagonal(w, 1.0)
    np.testing.assert_allclose(losses.replicator_dynamics(w, x, 3)[2], [0, 0, 1, 0], atol=1e-7)


def test_anchor_mask_first_occurrences():
    labels = jnp.array([3, 1, 3, 3, 1, 0, 3])
    np.testing.assert_array_equal(losses.anchor_mask(labels, 2),
                                  [True, True, True, False, True, True, False])
    np.testing.assert_array_equal(losses.anchor_mask(labels, 0), [False] * 7)


def test_random_anchor_mask_counts_and_randomness():
    labels = jnp.array([0] * 5 + [1] * 3 + [2] * 1)
    masks = [np.asarray(losses.random_anchor_mask(jax.random.key(s), labels, 2)) for s in range(20)]
    for mask in masks:
        assert mask[:5].sum() == 2 and mask[5:8].sum() == 2 and mask[8]
    assert len({m.tobytes() for m in masks}) > 1, "the key must change the choice"


# ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_check_grads():
    logits, labels, anchors, feats = random_problem(11, n=8, m=5, d=4)
    with jax.enable_x64(True):
        def f(lg, ft):
            return jnp.sum(losses.group_loss(lg, labels, anchors, ft, temperature=2.0,
                                             num_iterations=2))
        jtu.check_grads(jax.jit(f), (jnp.asarray(logits), jnp.asarray(feats)), order=2,
                        modes=["fwd", "rev"], atol=1e-5, rtol=1e-5)


def test_jit_equals_eager_and_no_retrace():
    logits, labels, anchors, feats = random_problem(12)
    traces = []

    def f(lg, lb, an, ft, t):
        traces.append(1)
        return losses.group_loss(lg, lb, an, ft, temperature=t, num_iterations=2)

    jf = jax.jit(f)
    args = [jnp.asarray(logits, jnp.float32), jnp.asarray(labels), jnp.asarray(anchors),
            jnp.asarray(feats, jnp.float32)]
    eager = losses.group_loss(*args, temperature=3.0, num_iterations=2)
    np.testing.assert_allclose(jf(*args, 3.0), eager, rtol=1e-6, atol=1e-7)
    for t in (1.0, 7.5):
        jf(*[jnp.array(np.asarray(a)) for a in args], t)
    assert len(traces) == 1


def test_vmap_equals_loop():
    problems = [random_problem(20 + g) for g in range(3)]
    stacked = [np.stack(parts) for parts in zip(*problems)]
    f = lambda lg, lb, an, ft: losses.group_loss(lg, lb, an, ft, temperature=4.0)
    batched = jax.vmap(f)(*[jnp.asarray(a) for a in stacked])
    for g, p in enumerate(problems):
        np.testing.assert_allclose(batched[g], f(*[jnp.asarray(a) for a in p]), rtol=1e-6)


def test_bfloat16_inputs_computed_in_float32():
    logits, labels, anchors, feats = random_problem(30)
    lg = jnp.asarray(logits, jnp.bfloat16)
    ft = jnp.asarray(feats, jnp.bfloat16)
    got = losses.group_loss(lg, labels, anchors, ft, temperature=2.0)
    assert got.dtype == jnp.float32
    # Same numbers as float32 arithmetic on the bfloat16-rounded values.
    expected = losses.group_loss(lg.astype(jnp.float32), labels, anchors, ft.astype(jnp.float32),
                                 temperature=2.0)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


# ---------------------------------------------------------------------------------------
def _value_and_grads(logits, labels, anchors, feats, temperature, iterations):
    def total(lg, ft):
        return jnp.mean(losses.group_loss(lg, labels, anchors, ft, temperature=temperature,
                                          num_iterations=iterations))
    return jax.value_and_grad(total, argnums=(0, 1))(logits, feats)


def _assert_finite(value, grads):
    assert np.isfinite(np.asarray(value)).all()
    for g in grads:
        assert np.isfinite(np.asarray(g)).all()


@pytest.mark.parametrize("case", ["zero_rows", "constant_rows", "all_negative", "extreme",
                                  "no_anchors", "all_anchors", "singleton_class"])
def test_degenerate_cases_are_finite(case):
    n, m, d = 6, 4, 5
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(n, m)).astype(np.float32)
    feats = rng.normal(size=(n, d)).astype(np.float32)
    labels = np.array([0, 0, 1, 1, 2, 3])
    anchors = np.array([True, False, True, False, False, False])
    temperature = 1.0
    if case == "zero_rows":
        feats[:] = 0.0
    elif case == "constant_rows":
        feats[1] = 3.0
        feats[4] = -7.0
    elif case == "all_negative":
        # Two perfectly anti-correlated directions: every off-diagonal pair negative or 0.
        base = np.array([1, -1, 0, 0, 0], np.float32)
        feats = np.stack([base * (-1) ** i * (i + 1) for i in range(n)])
        feats[:, 2] = 0.0
    elif case == "extreme":
        logits = np.where(rng.random((n, m)) < 0.5, 1e4, -1e4).astype(np.float32)
        temperature = 0.01
    elif case == "no_anchors":
        anchors[:] = False
    elif case == "all_anchors":
        anchors[:] = True
    value, grads = _value_and_grads(jnp.asarray(logits), jnp.asarray(labels),
                                    jnp.asarray(anchors), jnp.asarray(feats), temperature, 3)
    _assert_finite(value, grads)
    if case == "all_anchors":
        assert abs(float(value)) < 1e-6


def test_constant_row_keeps_its_prior_distribution():
    # A constant embedding has zero correlation with everyone: after one step its row is
    # x * x / sum(x * x) (only the diagonal W_ii = 1 contributes).
    logits = jnp.array([[1.0, 0.0, -1.0], [0.5, 0.2, 0.1], [0.0, 0.0, 2.0]])
    feats = jnp.array([[2.0, 2.0, 2.0], [1.0, 2.0, 3.0], [3.0, 1.0, 0.0]])
    prior = jax.nn.softmax(logits[0])
    expected = -jnp.log(prior[0] ** 2 / jnp.sum(prior ** 2))
    loss = losses.group_loss(logits, jnp.array([0, 1, 2]), jnp.zeros(3, bool), feats)
    np.testing.assert_allclose(loss[0], expected, rtol=1e-6)


@settings(max_examples=40, deadline=None)
@given(
    shape=st.sampled_from([(4, 3), (8, 5)]),
    seed=st.integers(0, 2**31 - 1),
    logit_scale=st.sampled_from([0.0, 1.0, 1e2, 1e4]),
    temperature=st.sampled_from([0.01, 0.5, 1.0, 79.0]),
    feature_mode=st.sampled_from(["normal", "zeros", "constant", "huge", "tiny", "mixed"]),
    anchor_mode=st.sampled_from(["none", "all", "random", "first"]),
    iterations=st.sampled_from([1, 3]),
)
@pytest.mark.slow
def test_property_never_nan_or_inf(shape, seed, logit_scale, temperature, feature_mode,
                                   anchor_mode, iterations):
    n, m = shape
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(n, m)) * logit_scale).astype(np.float32)
    labels = rng.integers(0, m, size=n)  # some classes with a single sample, some absent
    feats = rng.normal(size=(n, 6)).astype(np.float32)
    if feature_mode == "zeros":
        feats[:] = 0
    elif feature_mode == "constant":
        feats[:] = rng.normal(size=(n, 1)) * 10
    elif feature_mode == "huge":
        feats *= 1e4
    elif feature_mode == "tiny":
        feats *= 1e-6
    elif feature_mode == "mixed":
        feats[::2] = 5.0
    anchors = {"none": np.zeros(n, bool), "all": np.ones(n, bool),
               "random": rng.random(n) < 0.5,
               "first": np.asarray(losses.anchor_mask(labels, 1))}[anchor_mode]
    value, grads = _value_and_grads(jnp.asarray(logits), jnp.asarray(labels),
                                    jnp.asarray(anchors), jnp.asarray(feats), temperature,
                                    iterations)
    _assert_finite(value, grads)


# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(logits=np.zeros((4,), np.float32)), "logits must have rank 2"),
    (dict(labels=np.zeros((3,), np.int32)), r"labels must have shape \[n\] = \(4,\)"),
    (dict(labels=np.zeros((4,), np.float32)), "labels must be integers"),
    (dict(anchors=np.zeros((4,), np.int32)), "anchors must be boolean"),
    (dict(anchors=np.zeros((5,), bool)), r"anchors must have shape"),
    (dict(embeddings=np.zeros((5, 2), np.float32)), r"embeddings must have n = 4 rows"),
    (dict(embeddings=np.zeros((4,), np.float32)), "embeddings must have rank 2"),
    (dict(labels=np.array([0, 1, 3, 0])), r"labels must lie in \[0, 3\)"),
    (dict(labels=np.array([0, -1, 1, 0])), r"labels must lie in \[0, 3\)"),
    (dict(temperature=0.0), "temperature must be finite and > 0"),
])
def test_bad_input_raises(kwargs, match):
    args = dict(logits=np.zeros((4, 3), np.float32), labels=np.array([0, 1, 2, 0]),
                anchors=np.zeros((4,), bool), embeddings=np.ones((4, 2), np.float32))
    args.update(kwargs)
    temperature = args.pop("temperature", 1.0)
    with pytest.raises(ValueError, match=match):
        losses.group_loss(args["logits"], args["labels"], args["anchors"], args["embeddings"],
                          temperature=temperature)


@pytest.mark.parametrize("temperature", [-1.0, 0.0, float("inf"), float("nan")])
def test_a_bad_temperature_under_jit_is_nan(temperature):
    """Under jit a traced temperature cannot be checked: -1 gave plausible finite numbers
    (the prior of -logits). It must give NaN for every row; a good one stays finite."""
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
    feats = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
    labels, anchors = jnp.array([0, 1, 0, 2]), jnp.array([True, False, False, False])
    f = jax.jit(lambda t: losses.group_loss(logits, labels, anchors, feats, temperature=t))
    assert np.isnan(f(jnp.float32(temperature))).all()
    assert np.isfinite(f(jnp.float32(2.0))).all()
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
        losses.group_loss(logits, labels, anchors, feats, temperature=temperature)


@pytest.mark.parametrize("bad", [-1, -2, 2, 5])
@pytest.mark.parametrize("anchored", [False, True])
def test_out_of_range_label_under_jit_is_nan(bad, anchored):
    """Under jit the labels cannot be checked: a label outside [0, m) must give NaN.

    Negative labels are the trap: indexing wraps them like Python (-1 = the last class),
    which would silently give a finite loss against the wrong class."""
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(4, 2)), jnp.float32)
    feats = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
    labels = jnp.array([0, 1, 0, bad])
    anchors = jnp.array([True, False, False, anchored])
    f = jax.jit(lambda lg, lb, a, e: losses.group_loss(lg, lb, a, e, temperature=2.0))
    loss = f(logits, labels, anchors, feats)
    assert np.isfinite(loss[:3]).all() and np.isnan(loss[3])
    assert np.isnan(float(jnp.mean(loss)))
    # The same call with an in-range label is finite everywhere (the NaN is the label's).
    assert np.isfinite(f(logits, labels.at[3].set(1), anchors, feats)).all()


def test_nan_embedding_gives_nan_loss():
    """A broken embedding must not be hidden by the constant-row guard of the similarity."""
    logits, labels, anchors, feats = random_problem(3)
    feats = np.array(feats, np.float32)
    feats[2, 0] = np.nan
    loss = jax.jit(lambda e: losses.group_loss(logits, labels, anchors, e, temperature=5.0))(feats)
    assert np.isnan(float(jnp.mean(loss)))


def test_empty_batch_raises_naming_the_shape():
    with pytest.raises(ValueError, match=r"logits must have at least one row .*\(0, 3\)"):
        losses.group_loss(np.zeros((0, 3), np.float32), np.zeros((0,), np.int32),
                          np.zeros((0,), bool), np.zeros((0, 2), np.float32))
