"""Parity of the baseline losses with pytorch-metric-learning (PML), value and gradients.

PML is the library most metric-learning numbers are produced with, so "our triplet loss"
should mean a variant PML can name. For each loss this module checks, in float64 on
random P x K batches, the batch loss and its gradient with respect to the embeddings
(and the proxies, where there are some) against PML:

(a) the variant PML computes by default, and (b) the variant of the original paper where
it differs. Our losses return per-example values that the registry reduces with
`jnp.mean` (Proxy-Anchor returns the batch's scalar); PML reduces inside the loss with a
reducer. Each test reduces our output the way the registry does and says which PML
reducer that equals.

- triplet: PML's default (all triplets, AvgNonZeroReducer) = ours with `triplets="all"`;
  the paper's batch-hard (our default) = PML's BatchHardMiner + MeanReducer.
- contrastive: PML's default (plain hinges, AvgNonZeroReducer) = ours with
  `squared=False, average="nonzero_pairs"`; Hadsell et al.'s (our default): not in PML.
- multi-similarity: PML's default (no miner) = ours with `mining_margin >= 2`; the
  paper's mining (our default) = PML's MultiSimilarityMiner(epsilon) + the loss.
- proxy-anchor, normalised softmax: one variant, the paper's = PML's = ours.

Exact differences that remain (each pinned by a test below):
- triplet, batch-hard: PML's miner drops anchors without a positive or a negative and its
  MeanReducer averages over the rest; ours counts them as 0 in the mean over all anchors.
- triplet, soft margin: PML's `smooth_loss` is softplus(m + gap), Hermans et al.'s (ours)
  softplus(gap): equal at PML margin 0.
- contrastive: Hadsell et al.'s squared negative hinge [m - D]_+^2 has no PML
  counterpart (squaring PML's distance gives [m - D^2]_+); our default is checked against
  the NumPy reference of tests/test_baseline_losses.py instead.
- multi-similarity without mining: PML charges an anchor with no positive in the batch
  its negative term; ours gives such an anchor 0 (no P x K batch with K >= 2 has one).

torch and pytorch-metric-learning are never dependencies of gl_jax: the module is skipped
without them. Install (CPU): `pip install torch==2.13.0 pytorch-metric-learning`.
"""
import math

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from gl_jax import losses
from gl_jax.losses import registry

pytestmark = pytest.mark.slow   # 41 cases in float64, about 40 s

torch = pml_losses = pml_miners = pml_reducers = None


@pytest.fixture(autouse=True, scope="module")
def _pml():
    """torch and PML, imported when a test of this module runs (the fast tier collects
    the module without paying for them), or every test skipped without them."""
    global torch, pml_losses, pml_miners, pml_reducers
    torch = pytest.importorskip("torch")
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
    pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
    pml_reducers = pytest.importorskip("pytorch_metric_learning.reducers")
    # Two cores shared with other jobs: torch's default thread pool only adds contention.
    torch.set_num_threads(1)


# Float64 on both sides: what is left is rounding, far below any modelling difference.
RTOL, ATOL = 1e-9, 1e-11


def pk_batch(seed, classes=4, per_class=3, d=8, num_proxies=None, spread=0.9):
    """A shuffled P x K batch whose classes overlap (so hinges, mining and the
    non-zero counts all have both outcomes), and proxies for `num_proxies` classes."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), per_class)
    rng.shuffle(labels)
    centres = rng.normal(size=(classes, d))
    emb = centres[labels] + spread * rng.normal(size=(len(labels), d))
    proxies = rng.normal(size=(num_proxies or classes + 3, d))
    return emb, labels, proxies


def ours(fn, emb, labels, proxies=None):
    """(value, grad wrt embeddings, grad wrt proxies or None) of jnp.mean(fn(...)), x64."""
    with jax.enable_x64(True):
        e = jnp.asarray(emb, jnp.float64)
        y = jnp.asarray(labels)
        if proxies is None:
            value, g = jax.value_and_grad(lambda e: jnp.mean(fn(e, y)))(e)
            return float(value), np.asarray(g), None
        p = jnp.asarray(proxies, jnp.float64)
        value, (ge, gp) = jax.value_and_grad(lambda e, p: jnp.mean(fn(e, y, p)),
                                             argnums=(0, 1))(e, p)
        return float(value), np.asarray(ge), np.asarray(gp)


def pml(loss_fn, emb, labels, miner=None, proxies=None):
    """(value, grad wrt embeddings, grad wrt the loss's own proxy parameter or None).

    `proxies` is a function of the PML loss module returning its proxy parameter as
    `[m, d]` (set before the call by the caller)."""
    e = torch.tensor(emb, dtype=torch.float64, requires_grad=True)
    y = torch.tensor(labels, dtype=torch.long)
    indices = miner(e, y) if miner is not None else None
    loss = loss_fn(e, y, indices)
    loss.backward()
    proxy_grad = None
    if proxies is not None:
        proxy_grad = proxies(loss_fn).grad.detach().numpy()
    return float(loss.detach()), e.grad.numpy(), proxy_grad


def assert_same(got, want, what=""):
    value, ge, gp = got
    ref_value, ref_ge, ref_gp = want
    assert value == pytest.approx(ref_value, rel=RTOL, abs=ATOL), what
    np.testing.assert_allclose(ge, ref_ge, rtol=1e-8, atol=1e-10, err_msg=what)
    assert np.abs(ref_ge).max() > 1e-6, "the gradient must not vanish: " + what
    if ref_gp is not None:
        np.testing.assert_allclose(gp, ref_gp, rtol=1e-8, atol=1e-10, err_msg=what)
        assert np.abs(ref_gp).max() > 1e-6, "the proxy gradient must not vanish: " + what


# ------------------------------------------------------------------------------ triplet
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("margin", [0.05, 0.2])
def test_triplet_all_triplets_equals_pml_default(seed, margin):
    """PML's default TripletMarginLoss: every triplet, averaged over the non-zero ones."""
    emb, labels, _ = pk_batch(seed)
    want = pml(pml_losses.TripletMarginLoss(margin=margin), emb, labels)
    got = ours(lambda e, y: losses.batch_hard_triplet_loss(e, y, margin=margin,
                                                           triplets="all"), emb, labels)
    assert_same(got, want, f"margin {margin}")
    # The batch has zero and non-zero triplets: averaging over all would differ.
    over_all = pml(pml_losses.TripletMarginLoss(margin=margin,
                                                reducer=pml_reducers.MeanReducer()), emb, labels)
    assert abs(over_all[0] - want[0]) > 1e-3 * want[0]


def test_triplet_all_triplets_soft_margin_equals_pml_smooth_loss_at_margin_zero():
    emb, labels, _ = pk_batch(2)
    want = pml(pml_losses.TripletMarginLoss(margin=0.0, smooth_loss=True), emb, labels)
    got = ours(lambda e, y: losses.batch_hard_triplet_loss(e, y, soft_margin=True,
                                                           triplets="all"), emb, labels)
    assert_same(got, want)


@pytest.mark.parametrize("seed", [0, 3])
@pytest.mark.parametrize("kw,pml_kw", [
    (dict(margin=0.2), dict(margin=0.2)),
    (dict(margin=0.1), dict(margin=0.1)),
    (dict(soft_margin=True), dict(margin=0.0, smooth_loss=True)),
])
def test_triplet_default_batch_hard_equals_pml_batch_hard_miner(seed, kw, pml_kw):
    """The paper's variant (our default): each anchor's hardest positive and negative,
    the mean over anchors = PML's BatchHardMiner with a MeanReducer."""
    emb, labels, _ = pk_batch(seed)
    want = pml(pml_losses.TripletMarginLoss(**pml_kw, reducer=pml_reducers.MeanReducer()),
               emb, labels, miner=pml_miners.BatchHardMiner())
    got = ours(lambda e, y: losses.batch_hard_triplet_loss(e, y, **kw), emb, labels)
    assert_same(got, want, str(kw))


def test_triplet_batch_hard_counts_anchors_without_triplets_as_zero_pml_drops_them():
    """Documented difference: a class with one sample has no positive. PML's miner drops
    that anchor and averages over the others; ours averages over all n with it at 0."""
    emb, labels, _ = pk_batch(4, classes=3, per_class=3)
    labels = np.append(labels, 7)                     # a lone class
    emb = np.vstack([emb, np.random.default_rng(5).normal(size=(1, emb.shape[1]))])
    n, kept = len(labels), len(labels) - 1
    want = pml(pml_losses.TripletMarginLoss(margin=0.2, reducer=pml_reducers.MeanReducer()),
               emb, labels, miner=pml_miners.BatchHardMiner())
    value, ge, _ = ours(lambda e, y: losses.batch_hard_triplet_loss(e, y), emb, labels)
    assert_same((value * n / kept, ge * n / kept, None), want)


# -------------------------------------------------------------------------- contrastive
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("pos_margin,neg_margin", [(0.0, 1.0), (0.3, 0.8)])
def test_contrastive_equals_pml_default(seed, pos_margin, neg_margin):
    """PML's ContrastiveLoss: plain hinges on the distance of the normalised embeddings,
    positive and negative pairs each averaged over their non-zero ones, then added."""
    emb, labels, _ = pk_batch(seed)
    want = pml(pml_losses.ContrastiveLoss(pos_margin=pos_margin, neg_margin=neg_margin),
               emb, labels)
    got = ours(lambda e, y: losses.contrastive_loss(
        e, y, pos_margin=pos_margin, neg_margin=neg_margin, squared=False,
        average="nonzero_pairs"), emb, labels)
    assert_same(got, want, f"margins {pos_margin}, {neg_margin}")
    over_all = pml(pml_losses.ContrastiveLoss(pos_margin=pos_margin, neg_margin=neg_margin,
                                              reducer=pml_reducers.MeanReducer()), emb, labels)
    assert abs(over_all[0] - want[0]) > 1e-3 * want[0]


def test_contrastive_default_is_not_pml_and_differs_by_exactly_its_definition():
    """Our default (Hadsell: 1/2 squared hinges, per-anchor averages) is no PML variant.
    Pinned here: PML's positive term with squared distances (LpDistance(power=2)) and
    pos_margin 0 is D^2 averaged over the non-zero positive pairs, i.e. twice our
    squared positive cost under the same reduction; the negative terms cannot agree."""
    from pytorch_metric_learning.distances import LpDistance
    emb, labels, _ = pk_batch(6)
    tiny = 1e-9       # a negative margin no pair is inside: PML's negative term is 0
    want = pml(pml_losses.ContrastiveLoss(pos_margin=0.0, neg_margin=tiny,
                                          distance=LpDistance(power=2)), emb, labels)
    value, ge, _ = ours(lambda e, y: losses.contrastive_loss(
        e, y, pos_margin=0.0, neg_margin=tiny, squared=True, average="nonzero_pairs"),
        emb, labels)
    assert_same((2 * value, 2 * ge, None), want)


# --------------------------------------------------------------------- multi-similarity
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kw", [dict(), dict(alpha=1.0, beta=20.0, base=0.3)])
def test_multi_similarity_without_mining_equals_pml_default(seed, kw):
    """PML's MultiSimilarityLoss without a miner uses every pair; mining_margin >= 2
    keeps every pair here (cosines lie in [-1, 1])."""
    emb, labels, _ = pk_batch(seed)
    want = pml(pml_losses.MultiSimilarityLoss(**kw), emb, labels)
    got = ours(lambda e, y: losses.multi_similarity_loss(e, y, mining_margin=10.0, **kw),
               emb, labels)
    assert_same(got, want, str(kw))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("epsilon", [0.1, 0.3])
def test_multi_similarity_default_mining_equals_pml_miner(seed, epsilon):
    """The paper's variant (our default): pair mining with margin epsilon, which PML
    provides as MultiSimilarityMiner feeding the loss."""
    emb, labels, _ = pk_batch(seed)
    miner = pml_miners.MultiSimilarityMiner(epsilon=epsilon)
    want = pml(pml_losses.MultiSimilarityLoss(), emb, labels, miner=miner)
    got = ours(lambda e, y: losses.multi_similarity_loss(e, y, mining_margin=epsilon),
               emb, labels)
    assert_same(got, want, f"epsilon {epsilon}")
    # The mining dropped pairs: PML without its miner gives another value.
    unmined = pml(pml_losses.MultiSimilarityLoss(), emb, labels)
    assert abs(unmined[0] - want[0]) > 1e-3 * want[0]


def test_multi_similarity_unmined_differs_from_pml_only_by_a_lone_anchors_negative_term():
    """Documented difference: an anchor whose class has no other sample gives 0 here;
    PML charges it (1/beta) log(1 + sum_k exp(beta (S_ik - base))) over its negatives."""
    emb, labels, _ = pk_batch(7, classes=3, per_class=3)
    lone = np.random.default_rng(8).normal(size=(1, emb.shape[1]))
    emb, labels = np.vstack([emb, lone]), np.append(labels, 9)
    n, beta, base = len(labels), 50.0, 0.5
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sims = unit[:-1] @ unit[-1]                 # the lone anchor against everyone else
    lone_term = math.log1p(np.exp(beta * (sims - base)).sum()) / beta
    want = pml(pml_losses.MultiSimilarityLoss(), emb, labels)[0]
    got = ours(lambda e, y: losses.multi_similarity_loss(e, y, mining_margin=10.0),
               emb, labels)[0]
    assert lone_term > 1e-4
    assert got + lone_term / n == pytest.approx(want, rel=RTOL)


# ------------------------------------------------------------------------- proxy-based
def _set_proxies(loss_fn, name, value):
    with torch.no_grad():
        getattr(loss_fn, name).copy_(torch.tensor(value, dtype=torch.float64))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("alpha,delta", [(32.0, 0.1), (16.0, 0.2)])
def test_proxy_anchor_equals_pml(seed, alpha, delta):
    """One variant: the paper's and PML's (its `margin` is our delta). The batch holds
    4 of 7 classes, so the positive term's divisor (classes present) differs from the
    negative term's (all classes)."""
    emb, labels, proxies = pk_batch(seed, num_proxies=7)
    loss_fn = pml_losses.ProxyAnchorLoss(num_classes=7, embedding_size=emb.shape[1],
                                         margin=delta, alpha=alpha).double()
    _set_proxies(loss_fn, "proxies", proxies)
    want = pml(loss_fn, emb, labels, proxies=lambda f: f.proxies)
    got = ours(lambda e, y, p: losses.proxy_anchor_loss(e, y, p, alpha=alpha, delta=delta),
               emb, labels, proxies)
    assert_same(got, want, f"alpha {alpha}, delta {delta}")


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("temperature", [0.05, 0.5])
def test_normalized_softmax_equals_pml(seed, temperature):
    """One variant: the paper's and PML's. PML's class weights W are [d, m]: proxies.T."""
    emb, labels, proxies = pk_batch(seed, num_proxies=6)
    loss_fn = pml_losses.NormalizedSoftmaxLoss(num_classes=6, embedding_size=emb.shape[1],
                                               temperature=temperature).double()
    _set_proxies(loss_fn, "W", proxies.T)
    value, ge, gw = pml(loss_fn, emb, labels, proxies=lambda f: f.W)
    got = ours(lambda e, y, p: losses.normalized_softmax_loss(e, y, p, temperature=temperature),
               emb, labels, proxies)
    assert_same(got, (value, ge, gw.T), f"temperature {temperature}")


# ------------------------------------------------------------------------------ registry
@pytest.mark.parametrize("name,hparams,make_pml", [
    ("triplet", dict(margin=0.2),
     lambda: (pml_losses.TripletMarginLoss(margin=0.2, reducer=pml_reducers.MeanReducer()),
              pml_miners.BatchHardMiner())),
    ("multi_similarity", dict(),
     lambda: (pml_losses.MultiSimilarityLoss(), pml_miners.MultiSimilarityMiner(0.1))),
    ("multi_similarity", dict(mining_margin=10.0),
     lambda: (pml_losses.MultiSimilarityLoss(), None)),
])
def test_registry_reduction_is_pmls(name, hparams, make_pml):
    """What the trainer optimises (registry.metric_loss, ce_weight 0) is PML's value."""
    emb, labels, _ = pk_batch(9)
    loss_fn, miner = make_pml()
    want = pml(loss_fn, emb, labels, miner=miner)[0]
    with jax.enable_x64(True):
        total, _ = registry.metric_loss(name, embeddings=jnp.asarray(emb), logits=None,
                                        labels=jnp.asarray(labels), **hparams)
    # The registry hands back float32, whatever the input.
    assert float(total) == pytest.approx(want, rel=1e-6)
