"""k-reciprocal re-ranking against a direct dense transcription of Zhong et al. (2017)."""
import jax.numpy as jnp
import numpy as np
import pytest

from gl_jax.evaluation import k_reciprocal_rerank, reid_metrics, retrieval_metrics


def dense_rerank(query, gallery, k1, k2, lambda_value):
    """The algorithm written out on dense N x N float64 matrices, item by item.

    Returns the (n_query, n_gallery) final distances, how many expansions added items, and the
    smallest Jaccard distance (below 1 when sets overlap)."""
    x = query if gallery is None else np.concatenate([query, gallery])
    x = x.astype(np.float64) / np.linalg.norm(x, axis=1, keepdims=True)
    n_query = query.shape[0]
    n = x.shape[0]
    dist = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)       # squared Euclidean
    dist = dist / dist.max(axis=1, keepdims=True)                # row-normalised
    rank = np.argsort(dist, axis=1, kind="stable")                # ties: smaller index first
    half = int(np.around(k1 / 2))

    def reciprocal(i, k):
        forward = rank[i, :k + 1]
        backward = rank[forward, :k + 1]
        return forward[np.where(backward == i)[0]]

    v = np.zeros((n, n))
    expansions = 0
    for i in range(n):
        own = reciprocal(i, k1)
        expanded = own
        for c in own:
            cand = reciprocal(c, half)
            if len(np.intersect1d(cand, own)) > 2 / 3 * len(cand):
                expanded = np.append(expanded, cand)
                expansions += len(np.setdiff1d(cand, own)) > 0
        expanded = np.unique(expanded)
        weight = np.exp(-dist[i, expanded])
        v[i, expanded] = weight / weight.sum()
    if k2 != 1:
        v = np.stack([v[rank[i, :k2]].mean(axis=0) for i in range(n)])
    jaccard = np.zeros((n_query, n))
    for i in range(n_query):
        overlap = np.minimum(v[i][None, :], v).sum(axis=1)
        jaccard[i] = 1 - overlap / (2 - overlap)
    final = (1 - lambda_value) * jaccard + lambda_value * dist[:n_query]
    return (final if gallery is None else final[:, n_query:]), expansions, jaccard.min()


def clustered(n, classes, dim=8, seed=0, spread=0.6):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim))
    labels = rng.integers(0, classes, n)
    return (centres[labels] + spread * rng.normal(size=(n, dim))).astype(np.float32), labels


def test_query_gallery_matches_dense_reference():
    x, _ = clustered(75, 6, seed=1)
    q, g = x[:20], x[20:]
    ours = k_reciprocal_rerank(q, g, k1=8, k2=3, lambda_value=0.3)
    ref, expansions, min_jaccard = dense_rerank(q, g, 8, 3, 0.3)
    assert expansions > 0 and min_jaccard < 0.5  # expansion and overlaps were exercised
    assert ours.shape == (20, 55) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=2e-5)


def test_bfloat16_embeddings_give_the_float32_result():
    x, _ = clustered(40, 4, seed=3)
    x16 = jnp.asarray(x, jnp.bfloat16)
    want = k_reciprocal_rerank(np.asarray(x16.astype(jnp.float32)), k1=6, k2=2)
    np.testing.assert_array_equal(k_reciprocal_rerank(x16, k1=6, k2=2), want)


@pytest.mark.parametrize("k2", [1, 4])
def test_same_set_matches_dense_reference_and_top_k(k2):
    x, _ = clustered(60, 5, seed=2)
    ref, _, _ = dense_rerank(x, None, 10, k2, 0.5)
    dense = k_reciprocal_rerank(x, k1=10, k2=k2, lambda_value=0.5)
    np.testing.assert_allclose(dense, ref, atol=2e-5)
    dist, idx = k_reciprocal_rerank(x, k1=10, k2=k2, lambda_value=0.5, top_k=7)
    masked = ref + np.diag(np.full(60, np.inf))
    ref_idx = np.argsort(masked, axis=1, kind="stable")[:, :7]
    np.testing.assert_allclose(dist, np.take_along_axis(masked, ref_idx, 1), atol=2e-5)
    # Compare indices where the reference has no near-tie.
    ref_sorted = np.sort(masked, axis=1)
    clear = np.diff(ref_sorted[:, :8], axis=1) > 1e-4
    clear = clear & np.concatenate([np.ones((60, 1), bool), clear[:, :-1]], axis=1)
    np.testing.assert_array_equal(idx[clear], ref_idx[clear])
    assert not (idx == np.arange(60)[:, None]).any()


def test_blocking_and_pair_budget_do_not_change_the_result():
    x, _ = clustered(50, 4, seed=3)
    a = k_reciprocal_rerank(x[:13], x[13:], k1=6, k2=2, lambda_value=0.4)
    b = k_reciprocal_rerank(x[:13], x[13:], k1=6, k2=2, lambda_value=0.4, block_size=3,
                            pair_budget=1)
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_metrics_with_reranking_use_reranked_neighbours():
    x, labels = clustered(80, 8, seed=4, spread=1.0)
    ranked = k_reciprocal_rerank(x, k1=12, k2=4, lambda_value=0.3)
    ranked = ranked + np.diag(np.full(80, np.inf))
    order = np.argsort(ranked, axis=1, kind="stable")[:, :79]
    via_neighbours = retrieval_metrics(x, labels, (1, 4), nmi=False, neighbours=order)
    via_rerank = retrieval_metrics(x, labels, (1, 4), nmi=False,
                                   rerank=dict(k1=12, k2=4, lambda_value=0.3))
    for key in via_neighbours:
        assert via_rerank[key] == pytest.approx(via_neighbours[key], abs=1e-9), key
    cams = np.arange(80) % 3
    q, g = slice(0, 20), slice(20, 80)
    dense = k_reciprocal_rerank(x[q], x[g], k1=12, k2=4, lambda_value=0.3)
    a = reid_metrics(x[q], labels[q], cams[q], x[g], labels[g], cams[g], ranks=(1,),
                     junk_ids=(), distances=dense)
    b = reid_metrics(x[q], labels[q], cams[q], x[g], labels[g], cams[g], ranks=(1,),
                     junk_ids=(), rerank=dict(k1=12, k2=4, lambda_value=0.3))
    assert a == b


def test_bad_arguments():
    x, _ = clustered(20, 3)
    with pytest.raises(ValueError, match="k1 = 20"):
        k_reciprocal_rerank(x, k1=20)
    with pytest.raises(ValueError, match="lambda_value"):
        k_reciprocal_rerank(x, k1=3, lambda_value=1.5)
    with pytest.raises(ValueError, match="top_k holds K = 20"):
        k_reciprocal_rerank(x, k1=3, top_k=20)
    with pytest.raises(ValueError, match="gallery_embeddings is empty"):
        k_reciprocal_rerank(x, x[:0], k1=3)
    bad = x.copy()
    bad[1] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        k_reciprocal_rerank(bad, k1=3)
