"""Metric-learning losses as pure JAX functions (jit/grad/vmap-safe, per-example outputs).

Imports nothing else of gl_jax, so it can be used alone:

        from gl_jax import losses
        per_example = losses.group_loss(logits, labels, anchors, embeddings, temperature=24.0)
"""
from gl_jax.losses._contrastive import contrastive_loss
from gl_jax.losses._group_loss import (
        anchor_mask,
        group_loss,
        pearson_similarity,
        random_anchor_mask,
        replicator_dynamics,
)
from gl_jax.losses._multi_similarity import multi_similarity_loss
from gl_jax.losses._normalized_softmax import normalized_softmax_loss
from gl_jax.losses._proxy_anchor import proxy_anchor_loss
from gl_jax.losses._triplet import batch_hard_triplet_loss
from gl_jax.losses import registry   # every loss by name: losses.registry.metric_loss(...)

__all__ = [
        "anchor_mask",
        "batch_hard_triplet_loss",
        "contrastive_loss",
        "group_loss",
        "multi_similarity_loss",
        "normalized_softmax_loss",
        "pearson_similarity",
        "proxy_anchor_loss",
        "random_anchor_mask",
        "registry",
        "replicator_dynamics",
]
