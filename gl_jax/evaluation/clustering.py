"""Clustering quality: normalised mutual information (NMI) of k-means on the embeddings.

Protocol (as the Group Loss papers, made deterministic): k-means with k = number of distinct
labels on the (by default L2-normalised) embeddings, seeded, then

    NMI(Y, C) = I(Y; C) / ((H(Y) + H(C)) / 2)       (arithmetic normalisation)

i.e. ``sklearn.metrics.normalized_mutual_info_score(..., average_method="arithmetic")``,
the default of scikit-learn >= 0.22 that the published numbers used. The original code ran
k-means unseeded; here the seed is an argument (default 0).

Cost: a k-means iteration is O(n * k * d); k-means++ initialisation is about as costly as a
few iterations. At SOP size (n = 60,502, k = 11,316, d = 1024) one iteration is ~0.7 TFLOP,
so scikit-learn should need tens of minutes on a 2-core CPU (an estimate from the FLOP
count); faiss (``backend="faiss"``, optional, random initialisation, ``max_iter``
iterations) was about 8x faster than scikit-learn in the stack notes' measurement. CUB/Cars sizes
(n ~ 6-8k, k ~ 100) take seconds.
"""
from __future__ import annotations

import numpy as np

from gl_jax.evaluation import _checks

# scikit-learn is imported where it is used: importing it takes over a second, and the
# commands that never cluster (embed, search, export) import this package.


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401  (optional dependency)
    except ImportError:
        return False
    return True


def kmeans_assignments(x: np.ndarray, num_clusters: int, *, seed: int = 0,
                       backend: str = "sklearn", max_iter: int = 300,
                       n_init: int = 1) -> np.ndarray:
    """Cluster index of each row of a float32 (n, d) array, by a library's k-means.

    backend: "sklearn" (k-means++ init, Lloyd, ``n_init`` restarts), "faiss" (needs
    faiss-cpu; ``max_iter`` iterations, ``n_init`` restarts) or "auto" (faiss if installed).
    """
    if backend == "auto":
        backend = "faiss" if faiss_available() else "sklearn"
    if backend == "sklearn":
        from sklearn.cluster import KMeans
        km = KMeans(n_clusters=num_clusters, n_init=n_init, max_iter=max_iter, random_state=seed)
        return km.fit_predict(x).astype(np.int64)
    if backend == "faiss":
        if not faiss_available():
            raise ValueError("backend='faiss' but faiss is not installed (pip install faiss-cpu).")
        import faiss
        km = faiss.Kmeans(x.shape[1], num_clusters, niter=max_iter, nredo=n_init, seed=seed,
                          verbose=False)
        xc = np.ascontiguousarray(x, dtype=np.float32)
        km.train(xc)
        _, assign = km.index.search(xc, 1)
        return assign[:, 0].astype(np.int64)
    raise ValueError(f"backend must be 'sklearn', 'faiss' or 'auto'; got {backend!r}.")


def nmi(embeddings, labels, *, num_clusters: int | None = None, seed: int = 0,
        normalize: bool = True, backend: str = "sklearn", max_iter: int = 300,
        n_init: int = 1) -> float:
    """NMI between the labels and a seeded k-means clustering of the embeddings.

    Args:
        embeddings: (n, d) array, finite.
        labels: (n,) labels.
        num_clusters: k; default the number of distinct labels. Must be <= n.
        seed: k-means seed (results are reproducible for a fixed seed, backend and input).
        normalize: L2-normalise the rows first.
        backend: "sklearn", "faiss" or "auto" (see ``kmeans_assignments``).
    Returns:
        NMI in [0, 1], arithmetic normalisation, as a Python float.
    """
    x = _checks.as_embeddings("embeddings", embeddings)
    y = _checks.as_labels("labels", labels, x.shape[0], "embeddings")
    if num_clusters is None:
        num_clusters = int(np.unique(y).size)
    num_clusters = _checks.check_positive_int("num_clusters", num_clusters)
    if num_clusters > x.shape[0]:
        raise ValueError(
            f"num_clusters = {num_clusters} exceeds the number of embeddings ({x.shape[0]}).")
    if normalize:
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        x = (x / np.maximum(norms, 1e-12)).astype(np.float32)
    assign = kmeans_assignments(x, num_clusters, seed=seed, backend=backend,
                                max_iter=max_iter, n_init=n_init)
    from sklearn.metrics import normalized_mutual_info_score
    return float(normalized_mutual_info_score(y, assign, average_method="arithmetic"))
