"""Re-identification metrics: golden case by hand and a brute-force NumPy reference."""
import ml_dtypes
import numpy as np
import pytest

from gl_jax.evaluation import reid_metrics

from test_evaluation_retrieval import on_a_line


def golden_setup():
    #        x      id  cam
    q = [(0.0, 1, 1),     # q0
         (10.0, 2, 1),    # q1
         (20.0, 3, 2),    # q2: its only id-3 item has its camera -> skipped
         (1.4, -1, 1)]    # q3: a junk id is never matched -> skipped
    g = [(0.5, 1, 1),     # g0: same id and camera as q0 -> removed for q0
         (1.0, 0, 2),     # g1: junk id 0
         (2.0, 1, 2),     # g2
         (1.5, -1, 3),    # g3: distractor id -1
         (4.0, 2, 2),     # g4
         (5.0, 1, 3),     # g5
         (10.5, 2, 1),    # g6: same id and camera as q1 -> removed for q1
         (21.0, 3, 2),    # g7
         (13.0, 2, 3)]    # g8
    unpack = lambda rows: (on_a_line([r[0] for r in rows]), np.array([r[1] for r in rows]),
                           np.array([r[2] for r in rows]))
    return unpack(q), unpack(g)


def test_golden_case():
    # q0: g0 removed; kept ranking g1 g3 g2* g4 g5* g6 g8 g7 -> matches at 3 and 5:
    #     first 3, AP = (1/3 + 2/5) / 2 = 11/30, INP = 2/5.
    # q1: g6 removed; kept ranking g8* g5 g4* g2 g3 g1 g0 g7 -> matches at 1 and 3:
    #     first 1, AP = (1 + 2/3) / 2 = 5/6, INP = 2/3.
    (q, qi, qc), (g, gi, gc) = golden_setup()
    out = reid_metrics(q, qi, qc, g, gi, gc, ranks=(1, 3, 5), normalize=False)
    assert out["num_queries"] == 2 and out["skipped_queries"] == 2
    assert out["rank@1"] == pytest.approx(0.5)
    assert out["rank@3"] == pytest.approx(1.0)
    assert out["map"] == pytest.approx((11 / 30 + 5 / 6) / 2)
    assert out["minp"] == pytest.approx((2 / 5 + 2 / 3) / 2)


def test_golden_case_with_junk_removed():
    # q0 without g1, g3: g2* g4 g5* ... -> first 1, AP = (1 + 2/3) / 2, INP = 2/3; q1 unchanged.
    (q, qi, qc), (g, gi, gc) = golden_setup()
    out = reid_metrics(q, qi, qc, g, gi, gc, ranks=(1,), normalize=False, remove_junk=True)
    assert out["rank@1"] == pytest.approx(1.0)
    assert out["map"] == pytest.approx(5 / 6)
    assert out["minp"] == pytest.approx(2 / 3)


def reference_reid(q, qi, qc, g, gi, gc, ranks, junk=(0, -1), remove_junk=False):
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)
    dist = np.sqrt(((qn[:, None, :].astype(np.float64) - gn[None]) ** 2).sum(-1))
    cmc, aps, inps = {k: [] for k in ranks}, [], []
    for i in range(q.shape[0]):
        ranking = []
        for j in np.lexsort((np.arange(g.shape[0]), dist[i])):
            if gi[j] == qi[i] and gc[j] == qc[i]:
                continue
            if remove_junk and gi[j] in junk:
                continue
            ranking.append(gi[j] == qi[i] and qi[i] not in junk)
        hits = np.flatnonzero(ranking) + 1  # 1-based ranks of the matches
        if hits.size == 0:
            continue
        for k in ranks:
            cmc[k].append(hits[0] <= k)
        aps.append(np.mean([(m + 1) / r for m, r in enumerate(hits)]))
        inps.append(hits.size / hits[-1])
    out = {f"rank@{k}": np.mean(v) for k, v in cmc.items()}
    out.update(map=np.mean(aps), minp=np.mean(inps), num_queries=len(aps))
    return out


@pytest.mark.parametrize("remove_junk", [False, True])
def test_random_with_ties_matches_reference(remove_junk):
    from test_evaluation_knn import exact_ternary
    rng = np.random.default_rng(11)
    x = exact_ternary(260, seed=12)
    ids = rng.integers(-1, 25, 260)
    cams = rng.integers(1, 4, 260)
    q, g = slice(0, 60), slice(60, 260)
    out = reid_metrics(x[q], ids[q], cams[q], x[g], ids[g], cams[g], ranks=(1, 5, 10),
                       block_size=16, remove_junk=remove_junk)
    ref = reference_reid(x[q], ids[q], cams[q], x[g], ids[g], cams[g], (1, 5, 10),
                         remove_junk=remove_junk)
    for key, value in ref.items():
        assert out[key] == pytest.approx(value, abs=1e-6), key
    assert out["skipped_queries"] == 60 - ref["num_queries"] > 0


def test_precomputed_distances_are_used():
    (q, qi, qc), (g, gi, gc) = golden_setup()
    dist = np.abs(q[:, :1] - g[:, 0][None, :])
    a = reid_metrics(None, qi, qc, None, gi, gc, ranks=(1,), distances=dist)
    b = reid_metrics(q, qi, qc, g, gi, gc, ranks=(1,), normalize=False)
    assert a == b
    with pytest.raises(ValueError, match="distances .* NaN or inf"):
        reid_metrics(None, qi, qc, None, gi, gc, distances=np.where(dist > 5, np.nan, dist))


def test_bfloat16_embeddings_and_distances_give_the_float32_results():
    (q, qi, qc), (g, gi, gc) = golden_setup()
    q16, g16 = q.astype(ml_dtypes.bfloat16), g.astype(ml_dtypes.bfloat16)
    want = reid_metrics(q16.astype(np.float32), qi, qc, g16.astype(np.float32), gi, gc,
                        ranks=(1, 2), normalize=False)
    assert reid_metrics(q16, qi, qc, g16, gi, gc, ranks=(1, 2), normalize=False) == want
    dist = np.abs(q[:, :1] - g[:, 0][None, :]).astype(ml_dtypes.bfloat16)
    assert (reid_metrics(None, qi, qc, None, gi, gc, ranks=(1,), distances=dist)
            == reid_metrics(None, qi, qc, None, gi, gc, ranks=(1,),
                            distances=dist.astype(np.float32)))


def test_bad_inputs():
    (q, qi, qc), (g, gi, gc) = golden_setup()
    with pytest.raises(ValueError, match="gallery_embeddings is empty"):
        reid_metrics(q, qi, qc, g[:0], gi[:0], gc[:0])
    with pytest.raises(ValueError, match="ranks holds K = 10"):
        reid_metrics(q, qi, qc, g, gi, gc, ranks=(1, 10))
    with pytest.raises(ValueError, match="query_cameras has length 3"):
        reid_metrics(q, qi, qc[:3], g, gi, gc, ranks=(1,))
    bad = q.copy()
    bad[0, 0] = np.inf
    with pytest.raises(ValueError, match="query_embeddings .* NaN or inf"):
        reid_metrics(bad, qi, qc, g, gi, gc, ranks=(1,))
    with pytest.raises(ValueError, match="all 4 queries skipped"):
        reid_metrics(q, qi, qc, g, gi + 100, gc, ranks=(1,))
