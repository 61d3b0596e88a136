"""Tests of gl_jax.losses.registry: names, hyperparameters from a config, one call per loss."""
import math

import ml_collections
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from gl_jax import losses
from gl_jax.losses import registry


def _batch(seed=0, classes=3, per_class=3, d=5, m=4):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), per_class)
    emb = rng.normal(size=(len(labels), d)).astype(np.float32) + labels[:, None]
    logits = rng.normal(size=(len(labels), m)).astype(np.float32)
    proxies = rng.normal(size=(m, d)).astype(np.float32)
    return jnp.asarray(emb), jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(proxies)


def _ce(logits, labels):
    logits = np.asarray(logits, np.float64)
    out = []
    for z, y in zip(logits, np.asarray(labels)):
        out.append(math.log(np.exp(z - z.max()).sum()) + z.max() - z[y])
    return float(np.mean(out))


def test_every_loss_has_ce_weight_and_is_callable_by_name():
    assert set(registry.available_losses()) == {
        "group_loss", "cross_entropy", "triplet", "contrastive", "multi_similarity", "proxy_anchor",
        "normalized_softmax"}
    emb, logits, labels, proxies = _batch()
    for name in registry.available_losses():
        assert "ce_weight" in registry.default_hparams(name)
        total, parts = registry.metric_loss(name, embeddings=emb, logits=logits, labels=labels,
                                            proxies=proxies)
        assert total.shape == () and np.isfinite(float(total))
        assert set(parts) == {name, "ce", "loss"}


@pytest.mark.parametrize("name,direct", [
    ("triplet", lambda e, z, y, p: jnp.mean(losses.batch_hard_triplet_loss(e, y, margin=0.3))),
    ("contrastive", lambda e, z, y, p: jnp.mean(losses.contrastive_loss(e, y, neg_margin=0.8))),
    ("multi_similarity", lambda e, z, y, p: jnp.mean(losses.multi_similarity_loss(e, y, beta=20.0))),
    ("proxy_anchor", lambda e, z, y, p: losses.proxy_anchor_loss(e, y, p, alpha=16.0)),
    ("normalized_softmax",
     lambda e, z, y, p: jnp.mean(losses.normalized_softmax_loss(e, y, p, temperature=0.1))),
])
def test_metric_loss_equals_direct_call_plus_weighted_ce(name, direct):
    emb, logits, labels, proxies = _batch(1)
    hp = {"triplet": dict(margin=0.3), "contrastive": dict(neg_margin=0.8),
          "multi_similarity": dict(beta=20.0), "proxy_anchor": dict(alpha=16.0),
          "normalized_softmax": dict(temperature=0.1)}[name]
    expected_metric = float(direct(emb, logits, labels, proxies))
    total, parts = registry.metric_loss(name, embeddings=emb, logits=logits, labels=labels,
                                        proxies=proxies, ce_weight=0.5, **hp)
    np.testing.assert_allclose(float(parts[name]), expected_metric, rtol=1e-6)
    np.testing.assert_allclose(float(parts["ce"]), _ce(logits, labels), rtol=1e-5)
    np.testing.assert_allclose(float(total), expected_metric + 0.5 * _ce(logits, labels),
                               rtol=1e-5)
    # The baselines' default is no auxiliary cross-entropy.
    total0, _ = registry.metric_loss(name, embeddings=emb, logits=logits, labels=labels,
                                     proxies=proxies, **hp)
    np.testing.assert_allclose(float(total0), expected_metric, rtol=1e-6)


def test_group_loss_entry_matches_the_trainer_objective():
    emb, logits, labels, _ = _batch(2)
    anchors = losses.anchor_mask(labels, 1)
    gl = float(jnp.mean(losses.group_loss(logits, labels, anchors, emb, temperature=5.0,
                                          num_iterations=2)))
    total, parts = registry.metric_loss("group_loss", embeddings=emb, logits=logits,
                                        labels=labels, temperature=5.0, num_iterations=2,
                                        anchors_per_class=1)
    np.testing.assert_allclose(float(parts["group_loss"]), gl, rtol=1e-6)
    # The default auxiliary CE weight: 0.3 (chosen by experiments/omniglot/study.py).
    np.testing.assert_allclose(float(total), gl + 0.3 * _ce(logits, labels), rtol=1e-5)
    assert registry.default_hparams("group_loss")["num_iterations"] == 3
    # Random anchors follow the key.
    key = jax.random.key(3)
    random_anchors = losses.random_anchor_mask(key, labels, 1)
    expected = float(jnp.mean(losses.group_loss(logits, labels, random_anchors, emb,
                                                temperature=24.0, num_iterations=3)))
    _, parts = registry.metric_loss("group_loss", embeddings=emb, logits=logits, labels=labels,
                                    step_key=key, random_anchors=True, anchors_per_class=1)
    np.testing.assert_allclose(float(parts["group_loss"]), expected, rtol=1e-6)


def test_jit_and_grad_through_the_registry():
    emb, logits, labels, proxies = _batch(4)
    for name in registry.available_losses():
        f = jax.jit(lambda e, z, p: registry.metric_loss(name, embeddings=e, logits=z,
                                                         labels=labels, proxies=p)[0])
        grads = jax.grad(f, argnums=(0, 1, 2))(emb, logits, proxies)
        for g in grads:
            assert np.isfinite(np.asarray(g)).all()
        if registry.needs_proxies(name):
            assert float(jnp.abs(grads[2]).max()) > 0, name


def test_hparams_from_config():
    loss = ml_collections.ConfigDict(dict(name="group_loss", temperature=10, num_iterations=3,
                                          anchors_per_class=1, random_anchors=False,
                                          ce_weight=0.0))
    name, hp = registry.hparams_from_config(loss)
    assert name == "group_loss"
    assert hp == dict(temperature=10.0, num_iterations=3, anchors_per_class=1,
                      random_anchors=False, batch_prior=False, ce_weight=0.0)
    assert isinstance(hp["temperature"], float)

    loss.name = "triplet"
    assert registry.hparams_from_config(loss)[1] == registry.default_hparams("triplet")
    loss.triplet = ml_collections.ConfigDict(dict(margin=0.1, soft_margin=True))
    _, hp = registry.hparams_from_config(loss)
    assert hp["margin"] == 0.1 and hp["soft_margin"] is True and hp["ce_weight"] == 0.0

    loss.triplet.marginn = 0.3
    with pytest.raises(ValueError, match=r"config.loss.triplet: .*no hyperparameter 'marginn'"):
        registry.hparams_from_config(loss)


@pytest.mark.parametrize("call,match", [
    (lambda: registry.resolve_hparams("arcface"), "loss name 'arcface' is unknown"),
    (lambda: registry.resolve_hparams("triplet", {"margin": "big"}), "margin must be float"),
    (lambda: registry.resolve_hparams("group_loss", {"num_iterations": 1.5}),
     "num_iterations must be an integer"),
    (lambda: registry.resolve_hparams("triplet", {"soft_margin": "yes"}),
     "soft_margin must be a bool"),
])
def test_bad_names_and_hparams_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_missing_inputs_raise():
    emb, logits, labels, _ = _batch()
    with pytest.raises(ValueError, match="needs proxies"):
        registry.metric_loss("proxy_anchor", embeddings=emb, logits=logits, labels=labels)
    with pytest.raises(ValueError, match="needs logits"):
        registry.metric_loss("group_loss", embeddings=emb, logits=None, labels=labels)
    with pytest.raises(ValueError, match="needs step_key"):
        registry.metric_loss("group_loss", embeddings=emb, logits=logits, labels=labels,
                             random_anchors=True)
    # Pure metric losses need no logits at all.
    total, parts = registry.metric_loss("triplet", embeddings=emb, logits=None, labels=labels)
    assert set(parts) == {"triplet", "loss"}


@pytest.mark.parametrize("bad", [-1, 4])
def test_out_of_range_label_under_jit_makes_ce_nan(bad):
    """The cross-entropy term indexes the logits: a label outside [0, m) must give NaN
    under jit, not wrap to the last class (-1)."""
    emb, logits, labels, _ = _batch()            # m = 4 logits
    f = jax.jit(lambda z, y: registry.metric_loss("triplet", embeddings=emb, logits=z,
                                                  labels=y, ce_weight=1.0)[1])
    assert np.isfinite(float(f(logits, labels)["ce"]))
    parts = f(logits, labels.at[0].set(bad))
    assert np.isnan(float(parts["ce"])) and np.isnan(float(parts["loss"]))


def test_pml_variants_are_config_fields():
    """`--config.loss.triplet.triplets=all` and the contrastive `squared` / `average`
    reach the loss functions (pytorch-metric-learning's default variants)."""
    from configs import common
    e = jax.random.normal(jax.random.key(1), (8, 4))
    y = jnp.array([0, 0, 1, 1, 2, 2, 3, 3])
    config = common.get_config("digits")
    config.loss.name = "triplet"
    config.loss.triplet.triplets = "all"
    name, hparams = registry.hparams_from_config(config.loss)
    got, _ = registry.metric_loss(name, embeddings=e, logits=None, labels=y, **hparams)
    want = jnp.mean(losses.batch_hard_triplet_loss(e, y, triplets="all"))
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    assert float(got) != pytest.approx(float(jnp.mean(losses.batch_hard_triplet_loss(e, y))))
    config.loss.name = "contrastive"
    config.loss.contrastive = ml_collections.ConfigDict(dict(squared=False,
                                                             average="nonzero_pairs"))
    name, hparams = registry.hparams_from_config(config.loss)
    got, _ = registry.metric_loss(name, embeddings=e, logits=None, labels=y, **hparams)
    want = jnp.mean(losses.contrastive_loss(e, y, squared=False, average="nonzero_pairs"))
    assert float(got) == pytest.approx(float(want), rel=1e-6)


def test_cross_entropy_alone_is_the_classification_baseline():
    """'cross_entropy': no metric term, total = ce_weight x the softmax cross-entropy
    (checked against numpy); ce_weight 0 would train nothing and is refused."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 4)).astype(np.float32)
    labels = np.array([0, 1, 2, 3, 0, 1])
    embeddings = rng.normal(size=(6, 3)).astype(np.float32)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    expected = -np.mean(log_p[np.arange(6), labels])
    total, parts = registry.metric_loss("cross_entropy", embeddings=embeddings, logits=logits,
                                        labels=labels, ce_weight=2.0)
    assert float(parts["cross_entropy"]) == 0.0
    np.testing.assert_allclose(float(total), 2.0 * expected, rtol=1e-6)
    with pytest.raises(ValueError, match="trains nothing"):
        registry.metric_loss("cross_entropy", embeddings=embeddings, logits=logits,
                             labels=labels, ce_weight=0.0)
