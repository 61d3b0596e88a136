"""Backbones for metric learning behind one interface.

    from flax import nnx
    from gl_jax.models import create_model
    model = create_model("resnet50", num_classes=100, rngs=nnx.Rngs(0))
    embedding, aux = model(images)        # images [B, H, W, 3], normalised
    aux["pooled"], aux["embedding"], aux["logits"]
    target = abstract_model("resnet50", num_classes=100)   # shapes only, e.g. to restore into

This package imports nothing of gl_jax outside itself (in particular not gl_jax.data).
"""
from gl_jax.models.embedding_model import EmbeddingModel
from gl_jax.models.registry import (BackboneSpec, abstract_model, available_models, count_params,
                                    create_model, registry)

__all__ = ["BackboneSpec", "EmbeddingModel", "abstract_model", "available_models",
           "count_params", "create_model", "registry"]
