"""Evaluation of embeddings: retrieval, clustering and re-identification metrics.

Exact blocked k-nearest neighbours (jitted, sharded over JAX devices, never the full n x n
matrix), Recall@K / precision@1 / R-precision / MAP@R, NMI via a library k-means, re-id
CMC / mAP / mINP, and memory-bounded k-reciprocal re-ranking. Depends on jax, numpy and
scikit-learn only (faiss optional, for k-means); imports nothing else of gl_jax.
"""
from gl_jax.evaluation.clustering import nmi
from gl_jax.evaluation.exact_knn import knn
from gl_jax.evaluation.reid import reid_metrics
from gl_jax.evaluation.reranking import k_reciprocal_rerank
from gl_jax.evaluation.retrieval import retrieval_metrics
from gl_jax.evaluation.retrieval import retrieval_metrics_query_gallery

__all__ = [
    "knn",
    "k_reciprocal_rerank",
    "nmi",
    "reid_metrics",
    "retrieval_metrics",
    "retrieval_metrics_query_gallery",
]
