"""Metric-learning losses as pure JAX functions (jit/grad/vmap-safe, per-example outputs).

Imports nothing else of gl_jax, so it can be used alone:

        from gl_jax import losses
        per_example = losses.group_loss(logits, labels, anchors, embeddings, temperature=24.0)
"""
from gl_jax.losses._group_loss import (
        anchor_mask,
        group_loss,
        pearson_similarity,
        random_anchor_mask,
        replicator_dynamics,
)

__all__ = [
        "anchor_mask",
        "group_loss",
        "pearson_similarity",
        "random_anchor_mask",
        "replicator_dynamics",
]
