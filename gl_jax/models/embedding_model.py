"""The one interface every backbone is wrapped in: backbone -> pooling -> embedding -> logits.

    feature map  F = backbone(images)                    [B, h, w, C]  (compute dtype)
    pooled       p = pool(F)                             [B, C]        float32
    embedding    e = W_e p + b_e   (or e = p when embedding_dim is None)   [B, d]
    logits       z = W_c e + b_c   (only when num_classes > 0)             [B, num_classes]

The logits are computed from the embedding, as in the Group Loss (its prior is a softmax
over a linear classifier of the embedding). The head runs in float32 whatever the
backbone's compute dtype, because the loss and the softmax must.

Group Loss++ test-time switches (``pooling``, ``pool_mix`` and the backbone's ``leak``)
are plain Python attributes, not variables: models built with different values have the
same ``nnx.state`` structure, so one trained state loads into any of them. They can also
be changed in place: ``model.set_attributes(pooling="mix", pool_mix=0.6, leak=1.0)``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gl_jax.models import layers


class EmbeddingModel(nnx.Module):
    """Backbone + pooling + optional embedding layer + optional classifier.

    Attributes (the state paths start with these names):
      backbone: an nnx.Module mapping images [B, H, W, 3] to a feature map [B, h, w, C],
        with attributes ``num_features`` (= C) and ``leak``.
      embedding: ``nnx.Linear(C, embedding_dim)`` or None.
      classifier: ``nnx.Linear(d, num_classes)`` or None, d = embedding_dim or C.
    """

    def __init__(self, backbone: nnx.Module, *, num_classes: int, embedding_dim: int | None,
                 pooling: str, pool_mix: float, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.backbone = backbone
        features = backbone.num_features
        self.embedding = (layers.linear(features, embedding_dim, param_dtype=param_dtype,
                                        rngs=rngs) if embedding_dim else None)
        self.embedding_dim = embedding_dim or features
        self.classifier = (layers.linear(self.embedding_dim, num_classes,
                                         param_dtype=param_dtype, rngs=rngs)
                           if num_classes > 0 else None)
        self.num_classes = num_classes
        self.pooling = pooling
        self.pool_mix = pool_mix

    def __call__(self, images: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """images: float [B, H, W, 3], already normalised as the backbone expects.

        Returns ``(embedding, aux)``: embedding float32 [B, d]; aux has 'pooled' [B, C],
        'embedding' (the same array) and, when num_classes > 0, 'logits'
        [B, num_classes], all float32.
        """
        return self.head(self.pool(images))

    def pool(self, images: jax.Array) -> jax.Array:
        """The pooled backbone feature [B, C] (float32) of normalised images."""
        layers.check_images(images)
        return layers.global_pool(self.backbone(images), self.pooling, self.pool_mix)

    def head(self, pooled: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Embedding and logits from pooled features: what trains when the backbone is
        frozen (and, with fixed inputs, what trains on cached features)."""
        embedding = self.embedding(pooled) if self.embedding is not None else pooled
        aux = {"pooled": pooled, "embedding": embedding}
        if self.classifier is not None:
            aux["logits"] = self.classifier(embedding)
        return embedding, aux
