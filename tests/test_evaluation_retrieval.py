"""Retrieval metrics and NMI: hand-computed golden cases and a brute-force NumPy reference."""
import math

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from gl_jax.evaluation import knn, nmi, retrieval_metrics, retrieval_metrics_query_gallery
from gl_jax.evaluation.clustering import faiss_available

from test_evaluation_knn import exact_ternary


def on_a_line(xs):
    """Points on the x axis of the plane; used with normalize=False so distances are |x - x'|."""
    return np.stack([np.asarray(xs, np.float32), np.zeros(len(xs), np.float32)], axis=1)


# --- golden cases, computed by hand in the comments -----------------------------------------

def test_golden_all_against_all():
    # idx:    0    1    2    3    4     5
    # x:      0    1    2.5  4    10    7
    # label:  A    B    A    A    C     B        (C is alone: query 4 is excluded)
    # q0 (R=2): 1(1) 2(2.5) 3(4) 5(7) 4(10)        -> B A A B C : first hit 2, rprec 1/2, AP 1/4
    # q1 (R=1): 0(1) 2(1.5) 3(3) 5(6) 4(9)         -> A A A B C : first 4, rprec 0, AP 0
    # q2 (R=2): 1(1.5) 3(1.5) tie -> 1 first, 0(2.5) 5(4.5) 4(7.5) -> B A A B C : 2, 1/2, 1/4
    # q3 (R=2): 2(1.5) 1(3) 5(3) tie -> 1 first, 0(4), 4(6) -> A B B A C : 1, 1/2, 1/2
    # q5 (R=1): 3(3) 4(3) tie -> 3 first, 2(4.5) 1(6) 0(7) -> A C A B A : 4, 0, 0
    x = on_a_line([0, 1, 2.5, 4, 10, 7])
    labels = np.array(["A", "B", "A", "A", "C", "B"])
    out = retrieval_metrics(x, labels, ks=(1, 2, 4), nmi=False, normalize=False)
    assert out["num_queries"] == 5 and out["excluded_queries"] == 1
    assert out["recall@1"] == pytest.approx(1 / 5)
    assert out["recall@2"] == pytest.approx(3 / 5)
    assert out["recall@4"] == pytest.approx(1.0)
    assert out["precision@1"] == pytest.approx(1 / 5)
    assert out["r_precision"] == pytest.approx((0.5 + 0 + 0.5 + 0.5 + 0) / 5)
    assert out["map@r"] == pytest.approx((0.25 + 0 + 0.25 + 0.5 + 0) / 5)
    assert all(isinstance(v, float) for k, v in out.items() if "queries" not in k)
    assert isinstance(out["num_queries"], int)


def test_golden_query_gallery():
    # gallery: g0 x=1 B, g1 x=2 A, g2 x=-3 A, g3 x=6 B, g4 x=4 B
    # q0 x=0 A (R=2): g0(1) g1(2) g2(3) g4(4) g3(6) -> B A A B B : first 2, rprec 1/2, AP 1/4
    # q1 x=5 B (R=3): g3(1) g4(1) tie -> g3 first, g1(3) g0(4) g2(8) -> B B A B A :
    #                 first 1, rprec 2/3, AP (1/1 + 2/2) / 3 = 2/3
    # q2 x=20 D: no D in the gallery -> excluded.
    q = on_a_line([0, 5, 20])
    g = on_a_line([1, 2, -3, 6, 4])
    out = retrieval_metrics_query_gallery(q, [0, 1, 3], g, [1, 0, 0, 1, 1], ks=(1, 2, 5),
                                          normalize=False)
    assert out["num_queries"] == 2 and out["excluded_queries"] == 1
    assert out["recall@1"] == pytest.approx(0.5)
    assert out["recall@2"] == pytest.approx(1.0)
    assert out["recall@5"] == pytest.approx(1.0)
    assert out["r_precision"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert out["map@r"] == pytest.approx((1 / 4 + 2 / 3) / 2)


# --- brute-force reference ----------------------------------------------------------------

def reference_metrics(q, q_labels, g, g_labels, ks, same_set):
    """Definitions of Musgrave et al. applied query by query to a full float64 ranking."""
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)
    dist = np.sqrt(((qn[:, None, :].astype(np.float64) - gn[None]) ** 2).sum(-1))
    recall = {k: [] for k in ks}
    rprec, apr, excluded = [], [], 0
    for i in range(q.shape[0]):
        order = [j for j in np.lexsort((np.arange(g.shape[0]), dist[i])) if not (same_set and j == i)]
        rel = np.array([g_labels[j] == q_labels[i] for j in order])
        r = int(rel.sum())
        if r == 0:
            excluded += 1
            continue
        for k in ks:
            recall[k].append(rel[:k].any())
        rprec.append(rel[:r].sum() / r)
        apr.append(sum(rel[:m + 1].sum() / (m + 1) for m in range(r) if rel[m]) / r)
    out = {f"recall@{k}": np.mean(v) for k, v in recall.items()}
    out.update({"precision@1": np.mean(recall[1]) if 1 in recall else None,
                "r_precision": np.mean(rprec), "map@r": np.mean(apr),
                "excluded_queries": excluded, "num_queries": q.shape[0] - excluded})
    return out


def assert_metrics_equal(out, ref):
    for key, value in ref.items():
        if value is None:
            continue
        assert out[key] == pytest.approx(value, abs=1e-6), key


@pytest.mark.parametrize("num_classes", [40, 3])  # small R and large R (k = max R = 70ish)
def test_all_against_all_matches_reference_with_ties(num_classes):
    x = exact_ternary(200, seed=4)
    rng = np.random.default_rng(num_classes)
    labels = rng.integers(0, num_classes, 200)
    labels[:3] = [1000, 1001, 1002]  # singletons: excluded
    ks = (1, 2, 4, 8, 16)
    out = retrieval_metrics(x, labels, ks, nmi=False, block_size=48)
    ref = reference_metrics(x, labels, x, labels, ks, same_set=True)
    assert ref["excluded_queries"] == 3
    assert_metrics_equal(out, ref)


def test_query_gallery_matches_reference_with_ties():
    x = exact_ternary(220, seed=5)
    labels = np.random.default_rng(6).integers(0, 30, 220)
    q, g = x[:70], x[70:]
    ks = (1, 10, 20, 30, 40, 50)
    out = retrieval_metrics_query_gallery(q, labels[:70], g, labels[70:], ks, block_size=32)
    ref = reference_metrics(q, labels[:70], g, labels[70:], ks, same_set=False)
    assert_metrics_equal(out, ref)


def test_precomputed_neighbours_give_the_same_metrics():
    x = exact_ternary(120, seed=7)
    labels = np.random.default_rng(8).integers(0, 12, 120)
    direct = retrieval_metrics(x, labels, (1, 4), nmi=False)
    _, idx = knn(x, k=119)
    assert retrieval_metrics(x, labels, (1, 4), nmi=False, neighbours=idx) == direct
    with pytest.raises(ValueError, match="columns"):
        retrieval_metrics(x, labels, (1, 4), nmi=False, neighbours=idx[:, :2])


def test_block_size_does_not_change_results():
    x = exact_ternary(90, seed=9)
    labels = np.random.default_rng(10).integers(0, 9, 90)
    a = retrieval_metrics(x, labels, (1, 5), nmi=False, block_size=5)
    b = retrieval_metrics(x, labels, (1, 5), nmi=False, block_size=4096)
    assert a == b


# --- NMI -----------------------------------------------------------------------------------

def two_blobs():
    # Two tight, orthogonal blobs of three points: k-means (k = 2 labels) must find them.
    rng = np.random.default_rng(0)
    x = np.array([[1, 0]] * 3 + [[0, 1]] * 3, np.float32) + 1e-3 * rng.normal(size=(6, 2))
    return x.astype(np.float32)


def test_nmi_golden_arithmetic_normalisation():
    # clusters {0,1,2}, {3,4,5}; labels 0 0 1 | 1 1 1.
    # H(Y) = -(1/3 ln 1/3 + 2/3 ln 2/3), H(C) = ln 2,
    # I = 1/3 ln 2 + 1/6 ln(1/2) + 1/2 ln(3/2) = 1/6 ln 2 + 1/2 ln 3/2,
    # NMI = I / ((H(Y) + H(C)) / 2) = 0.47870...
    h_y = -(1 / 3 * math.log(1 / 3) + 2 / 3 * math.log(2 / 3))
    h_c = math.log(2)
    mutual = math.log(2) / 6 + 0.5 * math.log(1.5)
    expected = mutual / ((h_y + h_c) / 2)
    labels = np.array([0, 0, 1, 1, 1, 1])
    assert nmi(two_blobs(), labels, seed=0) == pytest.approx(expected, abs=1e-9)
    # Geometric normalisation would differ by ~4e-4: the tolerance above tells them apart.
    assert abs(mutual / math.sqrt(h_y * h_c) - expected) > 1e-4


def test_nmi_perfect_and_in_retrieval_metrics():
    labels = np.array([5, 5, 5, 9, 9, 9])
    assert nmi(two_blobs(), labels) == pytest.approx(1.0)
    out = retrieval_metrics(two_blobs(), labels, ks=(1,), nmi=True)
    assert out["nmi"] == pytest.approx(1.0)
    assert out["recall@1"] == 1.0 and out["map@r"] == 1.0


@pytest.mark.skipif(not faiss_available(), reason="faiss not installed (optional)")
def test_nmi_faiss_backend_agrees_on_clear_clusters():
    labels = np.array([0, 0, 1, 1, 1, 1])
    assert nmi(two_blobs(), labels, backend="faiss") == pytest.approx(
        nmi(two_blobs(), labels, backend="sklearn"), abs=1e-9)


# --- dtypes --------------------------------------------------------------------------------

@pytest.mark.parametrize("to_bf16", [
    lambda x: jnp.asarray(x, jnp.bfloat16),              # a model's bfloat16 output
    lambda x: np.asarray(x).astype(ml_dtypes.bfloat16),  # the same, on the host
], ids=["jax", "numpy"])
def test_bfloat16_embeddings_give_the_float32_results(to_bf16):
    """A model run in bfloat16 hands over bfloat16 embeddings: they are computed in float32,
    so the metrics equal those of the same values given as float32."""
    x = exact_ternary(60, seed=11)                 # +-1 and 0: exact in bfloat16
    y = np.random.default_rng(12).integers(0, 6, 60)
    x16 = to_bf16(x)
    assert retrieval_metrics(x16, y, (1, 4)) == retrieval_metrics(x, y, (1, 4))
    assert (retrieval_metrics_query_gallery(x16[:20], y[:20], x16[20:], y[20:], (1, 4))
            == retrieval_metrics_query_gallery(x[:20], y[:20], x[20:], y[20:], (1, 4)))
    assert nmi(x16, y) == nmi(x, y)
    for got, want in zip(knn(x16, k=5), knn(x, k=5)):
        np.testing.assert_array_equal(got, want)
    dist, _ = knn(x16[:20], x16[20:], k=3)
    assert dist.dtype == np.float32


# --- bad input -----------------------------------------------------------------------------

def test_bad_inputs_raise_value_errors_naming_the_problem():
    x = exact_ternary(20)
    y = np.arange(20) % 4
    bad = x.copy()
    bad[2, 2] = np.nan
    with pytest.raises(ValueError, match="embeddings .* NaN or inf"):
        retrieval_metrics(bad, y, nmi=False)
    with pytest.raises(ValueError, match="labels has length 19"):
        retrieval_metrics(x, y[:19], nmi=False)
    with pytest.raises(ValueError, match="K = 20"):
        retrieval_metrics(x, y, ks=(1, 20), nmi=False)
    with pytest.raises(ValueError, match="all 20 queries"):
        retrieval_metrics(x, np.arange(20), ks=(1,), nmi=False)
    with pytest.raises(ValueError, match="gallery_embeddings is empty"):
        retrieval_metrics_query_gallery(x, y, x[:0], y[:0], ks=(1,))
    with pytest.raises(ValueError, match="gallery size"):
        retrieval_metrics_query_gallery(x, y, x[:5], y[:5], ks=(1, 10))
    with pytest.raises(ValueError, match="gallery_labels has length 4"):
        retrieval_metrics_query_gallery(x, y, x[:5], y[:4], ks=(1,))
    with pytest.raises(ValueError, match="embeddings must be numeric; got dtype complex64"):
        retrieval_metrics(x.astype(np.complex64), y, nmi=False)
    with pytest.raises(ValueError, match="num_clusters"):
        nmi(x, y, num_clusters=21)
    with pytest.raises(ValueError, match="backend"):
        nmi(x, y, backend="mine")
