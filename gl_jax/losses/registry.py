"""The metric losses a config can name, their default hyperparameters, and one call.

A trainer needs three things from a config's `loss` section: which loss, its
hyperparameters, and how to turn a batch's model outputs into one scalar. This module
gives exactly that, so that adding a loss is one entry here and nothing in the trainer:

        name, hparams = registry.hparams_from_config(config.loss)
        total, parts = registry.metric_loss(
            name, embeddings=embedding, logits=logits, labels=labels,
            proxies=classifier_kernel.T if registry.needs_proxies(name) else None,
            step_key=jax.random.fold_in(jax.random.key(seed), step), **hparams)

`total = metric loss + ce_weight * mean cross-entropy(logits, labels)`; `parts` holds the
scalar pieces for logging. Every loss has a `ce_weight` hyperparameter: 1.0 for the Group
Loss (the paper's auxiliary term), 0.0 for the baselines (their papers train without it).

Imports nothing of gl_jax outside gl_jax.losses.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from gl_jax.losses._contrastive import contrastive_loss
from gl_jax.losses._group_loss import anchor_mask, group_loss, random_anchor_mask
from gl_jax.losses._multi_similarity import multi_similarity_loss
from gl_jax.losses._normalized_softmax import normalized_softmax_loss
from gl_jax.losses._pairwise import take_label_column
from gl_jax.losses._proxy_anchor import proxy_anchor_loss
from gl_jax.losses._triplet import batch_hard_triplet_loss


@dataclasses.dataclass(frozen=True)
class LossEntry:
    """One selectable loss: its defaults (including `ce_weight`) and what it needs."""
    name: str
    defaults: Mapping[str, Any]
    needs_proxies: bool      # takes the classifier weights as proxies [m, d]
    description: str


_ENTRIES = (
    LossEntry("group_loss",
              # num_iterations 3 and ce_weight 0.3 (the paper: 1 and 1.0) were chosen
              # on validation data by experiments/omniglot/study.py (STUDY.md).
              dict(temperature=24.0, num_iterations=3, anchors_per_class=2,
                   random_anchors=False, batch_prior=False, ce_weight=0.3),
              needs_proxies=False,
              description="Group Loss (Elezi et al. 2020) + auxiliary cross-entropy"),
    LossEntry("cross_entropy",
              dict(ce_weight=1.0),
              needs_proxies=False,
              description="softmax cross-entropy over the training classes alone (the "
                          "classification baseline: no metric term)"),
    LossEntry("triplet",
              # triplets='all': pytorch-metric-learning's default variant
              dict(margin=0.2, soft_margin=False, normalize=True, squared=False,
                   triplets="batch_hard", ce_weight=0.0),
              needs_proxies=False,
              description="batch-hard triplet (Hermans et al. 2017)"),
    LossEntry("contrastive",
              # squared=False, average='nonzero_pairs': pytorch-metric-learning's variant
              dict(pos_margin=0.0, neg_margin=0.5, normalize=True, squared=True,
                   average="per_anchor", ce_weight=0.0),
              needs_proxies=False,
              description="contrastive over all pairs (Hadsell et al. 2006)"),
    LossEntry("multi_similarity",
              dict(alpha=2.0, beta=50.0, base=0.5, mining_margin=0.1, ce_weight=0.0),
              needs_proxies=False,
              description="multi-similarity with its mining (Wang et al. 2019)"),
    LossEntry("proxy_anchor",
              dict(alpha=32.0, delta=0.1, ce_weight=0.0),
              needs_proxies=True,
              description="Proxy-Anchor (Kim et al. 2020), proxies = classifier weights"),
    LossEntry("normalized_softmax",
              dict(temperature=0.05, ce_weight=0.0),
              needs_proxies=True,
              description="normalised softmax (Zhai & Wu 2019), cosine classifier / T"),
)
LOSSES: Mapping[str, LossEntry] = {e.name: e for e in _ENTRIES}

# The Group Loss keeps its hyperparameters at the top of `config.loss` (they were there
# first: `--config.loss.temperature=...`); every other loss reads `config.loss.<name>`.
_TOP_LEVEL = "group_loss"


def available_losses() -> tuple[str, ...]:
    return tuple(LOSSES)


def _entry(name: str) -> LossEntry:
    if name not in LOSSES:
        raise ValueError(f"loss name {name!r} is unknown; known: {available_losses()}.")
    return LOSSES[name]


def needs_proxies(name: str) -> bool:
    """True when the loss takes the classifier weights as proxies."""
    return _entry(name).needs_proxies


def default_hparams(name: str) -> dict[str, Any]:
    """A fresh copy of the loss's default hyperparameters (including `ce_weight`)."""
    return dict(_entry(name).defaults)


def resolve_hparams(name: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Defaults updated with `overrides`, each value cast to its default's type.

    Raises ValueError for an unknown loss, an unknown hyperparameter (naming the known
    ones) or a value that cannot be cast (e.g. a string for a float)."""
    hparams = default_hparams(name)
    for key, value in dict(overrides or {}).items():
        if key not in hparams:
            raise ValueError(f"loss {name!r} has no hyperparameter {key!r}; its "
                             f"hyperparameters are {sorted(hparams)}.")
        kind = type(hparams[key])
        if kind is bool:
            if not isinstance(value, (bool, int)) or value not in (0, 1):
                raise ValueError(f"loss {name!r}: {key} must be a bool, got {value!r}.")
            hparams[key] = bool(value)
            continue
        try:
            hparams[key] = kind(value)
        except (TypeError, ValueError) as e:
            raise ValueError(f"loss {name!r}: {key} must be {kind.__name__}, got {value!r}.") from e
        if kind is int and hparams[key] != value:
            raise ValueError(f"loss {name!r}: {key} must be an integer, got {value!r}.")
    return hparams


def hparams_from_config(loss_config) -> tuple[str, dict[str, Any]]:
    """(name, resolved hyperparameters) from a config's `loss` section.

    `loss_config` is a ConfigDict or a mapping with `name`. The Group Loss reads the
    fields of its defaults from the top of the section (`loss.temperature`, ...); any
    other loss reads the optional sub-section `loss.<name>` (`loss.triplet.margin`, ...),
    missing fields keeping their defaults. Unknown fields in the sub-section are errors.
    """
    name = loss_config["name"]
    entry = _entry(name)
    if name == _TOP_LEVEL:
        overrides = {k: loss_config[k] for k in entry.defaults if k in loss_config}
    else:
        section = loss_config[name] if name in loss_config else None
        overrides = dict(section.items()) if section is not None else {}
    try:
        return name, resolve_hparams(name, overrides)
    except ValueError as e:
        where = "config.loss" if name == _TOP_LEVEL else f"config.loss.{name}"
        raise ValueError(f"{where}: {e}") from e


def _group(embeddings, logits, labels, step_key, *, temperature, num_iterations,
           anchors_per_class, random_anchors, batch_prior):
    if random_anchors:
        if step_key is None:
            raise ValueError("group_loss with random_anchors=True needs step_key (a PRNG key).")
        anchors = random_anchor_mask(step_key, labels, anchors_per_class)
    else:
        anchors = anchor_mask(labels, anchors_per_class)
    return jnp.mean(group_loss(logits, labels, anchors, embeddings, temperature=temperature,
                               num_iterations=num_iterations, batch_prior=batch_prior))


_CALLS: Mapping[str, Callable[..., jax.Array]] = {
    "group_loss": lambda e, z, y, p, k, **h: _group(e, z, y, k, **h),
    "cross_entropy": lambda e, z, y, p, k: jnp.zeros((), jnp.float32),
    "triplet": lambda e, z, y, p, k, **h: jnp.mean(batch_hard_triplet_loss(e, y, **h)),
    "contrastive": lambda e, z, y, p, k, **h: jnp.mean(contrastive_loss(e, y, **h)),
    "multi_similarity": lambda e, z, y, p, k, **h: jnp.mean(multi_similarity_loss(e, y, **h)),
    "proxy_anchor": lambda e, z, y, p, k, **h: proxy_anchor_loss(e, y, p, **h),
    "normalized_softmax": lambda e, z, y, p, k, **h: jnp.mean(normalized_softmax_loss(e, y, p, **h)),
}


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy in float32; NaN when a label is outside `[0, m)`, so a
    bad label cannot train silently."""
    log_probs = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
    return -jnp.mean(take_label_column(log_probs, labels))


def metric_loss(name: str, *, embeddings: jax.Array, logits: jax.Array | None,
                labels: jax.Array, proxies: jax.Array | None = None,
                step_key: jax.Array | None = None,
                **hparams) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The scalar training loss of one batch and its parts.

    Args:
        name: one of `available_losses()`.
        embeddings: `[n, d]` the model's embedding.
        logits: `[n, m]` the classifier's logits over all training classes (needed by the
            Group Loss and whenever `ce_weight != 0`; may be None otherwise).
        labels: `[n]` integer training-class labels in `[0, m)`.
        proxies: `[m, d]` class proxies for losses with `needs_proxies(name)`; in the
            gl_jax model, the classifier's kernel transposed (`kernel` is `[d, m]`).
        step_key: a PRNG key for losses that draw randomness (Group Loss random anchors).
        **hparams: the loss's hyperparameters; missing ones take their defaults
            (`resolve_hparams`), unknown ones are errors.

    Returns:
        `(total, parts)`: total = metric + ce_weight * ce, a float32 scalar; parts is a dict
        of scalars: `name` (the metric loss), `ce` (mean cross-entropy of the logits, when
        logits are given) and `loss` (= total).
    """
    entry = _entry(name)
    hparams = resolve_hparams(name, hparams)
    ce_weight = hparams.pop("ce_weight")
    if entry.needs_proxies and proxies is None:
        raise ValueError(f"loss {name!r} needs proxies [m, d] (the classifier weights); got None.")
    if name == "cross_entropy" and ce_weight <= 0:
        raise ValueError(f"loss 'cross_entropy' with ce_weight = {ce_weight} trains nothing; "
                         "it needs ce_weight > 0.")
    if logits is None and (name == "group_loss" or ce_weight != 0):
        raise ValueError(f"loss {name!r} with ce_weight = {ce_weight} needs logits; got None.")
    metric = _CALLS[name](embeddings, logits, labels, proxies, step_key, **hparams)
    metric = jnp.asarray(metric, jnp.float32)
    parts = {name: metric}
    total = metric
    if logits is not None:
        ce = cross_entropy(logits, labels)
        parts["ce"] = ce
        if ce_weight != 0:
            total = total + ce_weight * ce
    parts["loss"] = total
    return total, parts
