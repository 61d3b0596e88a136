"""Exact blocked kNN (gl_jax.evaluation.knn) against a brute-force NumPy reference."""
import jax
import numpy as np
import pytest

from gl_jax.evaluation import knn


def exact_ternary(n, dim=8, nonzeros=4, seed=0):
    """Rows with `nonzeros` entries of +-1: after L2 normalisation every entry is +-0.5, so all
    dot products and distances are exact in float32 and float64 and ties are plentiful."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, dim), np.float32)
    for i in range(n):
        cols = rng.choice(dim, nonzeros, replace=False)
        x[i, cols] = rng.choice([-1.0, 1.0], nonzeros)
    return x


def reference_knn(query, gallery, k, exclude_self, normalize=True):
    """Brute force in float64: sort by (distance, gallery index)."""
    q = query.astype(np.float64)
    g = gallery.astype(np.float64)
    if normalize:
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        g = g / np.linalg.norm(g, axis=1, keepdims=True)
    dist = np.sqrt(((q[:, None, :] - g[None, :, :]) ** 2).sum(-1))
    idx = np.empty((q.shape[0], k), np.int64)
    for i in range(q.shape[0]):
        order = [j for j in np.lexsort((np.arange(g.shape[0]), dist[i]))
                 if not (exclude_self and j == i)]
        idx[i] = order[:k]
    return np.take_along_axis(dist, idx, axis=1), idx


def test_conftest_gives_several_devices():
    # Blocks are sharded over these; the other tests therefore exercise the sharded path.
    assert len(jax.devices()) == 4


@pytest.mark.parametrize("block_size", [7, 64, 1000])
def test_same_set_with_ties_matches_brute_force(block_size):
    x = exact_ternary(150)
    dist, idx = knn(x, k=12, block_size=block_size)
    ref_dist, ref_idx = reference_knn(x, x, 12, exclude_self=True)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(dist, ref_dist, atol=1e-6)
    # The data really has ties (and duplicates at distance 0), so the rule was exercised.
    assert (np.diff(ref_dist, axis=1) == 0).mean() > 0.5
    assert (ref_dist[:, 0] == 0).any()
    assert not (idx == np.arange(150)[:, None]).any()


def test_query_gallery_with_ties_matches_brute_force():
    x = exact_ternary(130, seed=1)
    q, g = x[:40], x[40:]
    dist, idx = knn(q, g, k=20, block_size=16)
    ref_dist, ref_idx = reference_knn(q, g, 20, exclude_self=False)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(dist, ref_dist, atol=1e-6)


def test_continuous_data_matches_brute_force_and_unnormalised_mode():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(120, 16)).astype(np.float32) * 3.0
    for normalize in (True, False):
        dist, idx = knn(x, k=9, normalize=normalize, block_size=32)
        ref_dist, ref_idx = reference_knn(x, x, 9, exclude_self=True, normalize=normalize)
        np.testing.assert_allclose(dist, ref_dist, rtol=1e-5, atol=1e-4)
        # Indices agree wherever the reference ranking has no near-tie.
        gaps = np.diff(np.concatenate([ref_dist, ref_dist[:, -1:] + 1], axis=1), axis=1)
        clear = (gaps > 1e-4) & np.concatenate([np.ones((120, 1), bool), gaps[:, :-1] > 1e-4], 1)
        np.testing.assert_array_equal(idx[clear], ref_idx[clear])
        assert clear.mean() > 0.95


def test_accepts_jax_arrays_and_returns_sorted():
    x = exact_ternary(50, seed=2)
    dist, idx = knn(jax.numpy.asarray(x), k=49)
    assert dist.dtype == np.float32 and idx.dtype == np.int32
    assert (np.diff(dist, axis=1) >= 0).all()
    # k = n - 1: every other item appears exactly once.
    for i in range(50):
        assert sorted(idx[i].tolist()) == [j for j in range(50) if j != i]


@pytest.mark.parametrize("make_bad, message", [
    (lambda x: x.__setitem__((3, 1), np.nan) or x, "NaN or inf"),
    (lambda x: x.__setitem__((5, 0), np.inf) or x, "NaN or inf"),
    (lambda x: x[:, None, :], "shape"),
    (lambda x: x[:0], "empty"),
])
def test_bad_query_embeddings(make_bad, message):
    x = exact_ternary(10)
    with pytest.raises(ValueError, match=message):
        knn(make_bad(x.copy()), k=2)


def test_bad_k_and_gallery():
    x = exact_ternary(10)
    with pytest.raises(ValueError, match="k holds K = 10"):
        knn(x, k=10)  # only 9 other items
    with pytest.raises(ValueError, match="gallery size"):
        knn(x, x[:3], k=4)
    with pytest.raises(ValueError, match="gallery_embeddings is empty"):
        knn(x, x[:0], k=1)
    with pytest.raises(ValueError, match="dimension"):
        knn(x, x[:, :4], k=1)
    with pytest.raises(ValueError, match="positive"):
        knn(x, k=0)
