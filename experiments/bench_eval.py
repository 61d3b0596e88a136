"""Benchmark: exact Recall@K at SOP scale, gl_jax.evaluation vs the original code's way vs faiss.

Synthetic clustered embeddings (class centres on the sphere plus noise, L2-normalised),
5-6 images per class, 1024-d. The defaults are CPU-sized (20,000 images, a few minutes);
the SOP test-set size is 60,502 images of 11,316 classes (flags below).

Compared, in one run:
* ours: ``gl_jax.evaluation.retrieval_metrics(..., nmi=False)``: blocked jitted exact kNN,
    Recall@{1,10,100,1000}, MAP@R, R-precision; full size and the subset;
* original: the group_loss code's way, ``sklearn.metrics.pairwise_distances`` on the whole
    set (an n x n float32 matrix) then a full ``argsort`` of every row, on the largest subset
    that fits (``--original_n``), and ours on the same subset;
* faiss-cpu ``IndexFlatL2`` exact search (when installed), on the subset and full size.

Each method runs in a fresh child process; time and peak memory cover the metric call only
(libraries imported and data built beforehand; our time includes jit compilation). Peak
memory is the growth of the child's peak resident set (ru_maxrss) during the call.

    python experiments/bench_eval.py                      # 20k images, a few minutes
    python experiments/bench_eval.py --n 60502 --classes 11316 --original_n 20000   # SOP size,
                                                                                                                # 10-20 min on 2 shared cores

``--mode rerank`` instead measures k-reciprocal re-ranking at Market-1501 size (3,368
queries, 19,732 gallery, 751 ids, 6 cameras, synthetic): time and peak memory of
``reid_metrics`` without and with re-ranking (k1=20, k2=6, lambda=0.3):

    python experiments/bench_eval.py --mode rerank --dim 2048
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import time

import numpy as np

KS = (1, 10, 100, 1000)


def make_data(n: int, dim: int, classes: int, noise: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.sort(np.arange(n) % classes)
    centres = rng.normal(size=(classes, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    # Noise of norm ~`noise` around unit centres: 2.8 gives SOP-like Recall@1 (~0.7).
    x = centres[labels] + noise / np.sqrt(dim) * rng.normal(size=(n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), labels


def recalls_from_neighbours(idx: np.ndarray, labels: np.ndarray, ks) -> dict:
    hits = labels[idx] == labels[:, None]
    first = np.where(hits.any(1), hits.argmax(1), idx.shape[1])
    return {f"recall@{k}": float(np.mean(first < k)) for k in ks}


def run_ours(x, labels, ks, block_size):
    from gl_jax.evaluation import retrieval_metrics
    return retrieval_metrics(x, labels, ks, nmi=False, block_size=block_size)


def run_original(x, labels, ks, block_size):
    from sklearn.metrics import pairwise_distances
    dist = pairwise_distances(x, metric="euclidean")   # the original: full n x n matrix
    np.fill_diagonal(dist, np.inf)                     # the query itself excluded
    idx = np.argsort(dist, axis=1)[:, :max(ks)]
    return recalls_from_neighbours(idx, labels, ks)


def run_faiss(x, labels, ks, block_size):
    import faiss
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(x)
    _, idx = index.search(x, max(ks) + 1)
    # Drop the query itself (the first hit at distance 0, wherever it lands among ties).
    own = idx == np.arange(x.shape[0])[:, None]
    keep = ~own
    keep[own.sum(1) == 0, -1] = False
    idx = idx[keep].reshape(x.shape[0], max(ks))
    return recalls_from_neighbours(idx, labels, ks)


def _child(method, n, dim, classes, noise, ks, block_size, queue):
    # Libraries are imported and the data made before the clock and the memory baseline.
    if method == "ours":
        import gl_jax.evaluation  # noqa: F401
    elif method == "original":
        import sklearn.metrics  # noqa: F401
    else:
        import faiss  # noqa: F401
    x, labels = make_data(n, dim, classes, noise)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn = {"ours": run_ours, "original": run_original, "faiss": run_faiss}[method]
    cpu0 = _cpu_seconds()
    t0 = time.perf_counter()
    metrics = fn(x, labels, ks, block_size)
    seconds = time.perf_counter() - t0
    cpu = _cpu_seconds() - cpu0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put({"seconds": seconds, "cpu_seconds": cpu, "peak_mib": (peak - base) / 1024,
               "metrics": metrics})


def _cpu_seconds() -> float:
    # User + system CPU time of this process and its threads: less sensitive than wall time
    # to other jobs sharing the cores.
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def make_market(dim: int, noise: float, seed: int = 0):
    """Synthetic Market-1501-sized query/gallery split with ids and cameras."""
    rng = np.random.default_rng(seed)
    n_query, n_gallery, n_ids, n_cams = 3368, 19732, 751, 6
    q_ids = np.arange(n_query) % n_ids + 1              # person ids 1..751
    g_ids = np.arange(n_gallery) % (n_ids + 2) - 1      # plus junk 0 and distractors -1
    q_cams = rng.integers(1, n_cams + 1, n_query)
    g_cams = rng.integers(1, n_cams + 1, n_gallery)
    centres = rng.normal(size=(n_ids + 2, dim)).astype(np.float32)   # row = id + 1
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    def embed(ids):
        noise_rows = rng.normal(size=(ids.size, dim)).astype(np.float32)
        x = centres[ids + 1] + noise / np.sqrt(dim) * noise_rows
        return x / np.linalg.norm(x, axis=1, keepdims=True)
    return embed(q_ids), q_ids, q_cams, embed(g_ids), g_ids, g_cams


def _rerank_child(dim, noise, rerank, queue):
    from gl_jax.evaluation import reid_metrics
    data = make_market(dim, noise)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cpu0 = _cpu_seconds()
    t0 = time.perf_counter()
    metrics = reid_metrics(*data, rerank=dict(k1=20, k2=6, lambda_value=0.3) if rerank else None)
    seconds = time.perf_counter() - t0
    cpu = _cpu_seconds() - cpu0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put({"seconds": seconds, "cpu_seconds": cpu, "peak_mib": (peak - base) / 1024,
               "metrics": metrics})


def main_rerank(args):
    ctx = mp.get_context("spawn")
    results = []
    for rerank in (False, True):
        queue = ctx.Queue()
        proc = ctx.Process(target=_rerank_child, args=(args.dim, args.noise, rerank, queue))
        proc.start()
        results.append(queue.get())
        proc.join()
        print(json.dumps({"rerank": rerank, **results[-1]}), flush=True)
    print(f"\nMarket-1501 size (3368 x 19732), dim {args.dim}")
    print(f"{'reid_metrics':<22}{'wall s':>8}{'cpu s':>8}{'peak MiB':>10}{'rank@1':>8}{'mAP':>8}"
          f"{'mINP':>8}")
    for name, r in zip(("plain", "re-ranked k1=20 k2=6"), results):
        m = r["metrics"]
        print(f"{name:<22}{r['seconds']:>8.1f}{r['cpu_seconds']:>8.1f}{r['peak_mib']:>10.0f}"
              f"{100 * m['rank@1']:>8.2f}"
              f"{100 * m['map']:>8.2f}{100 * m['minp']:>8.2f}")


def measure(method, n, dim, classes, noise, ks, block_size):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(method, n, dim, classes, noise, ks, block_size, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000, help="SOP test set: 60502")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--classes", type=int, default=3741, help="SOP test set: 11316")
    parser.add_argument("--original_n", type=int, default=10000,
                        help="subset size for the full-matrix original way")
    parser.add_argument("--block_size", type=int, default=1024)
    parser.add_argument("--noise", type=float, default=2.8)
    parser.add_argument("--skip_faiss_full", action="store_true")
    parser.add_argument("--mode", choices=("retrieval", "rerank"), default="retrieval")
    args = parser.parse_args()
    if args.mode == "rerank":
        main_rerank(args)
        return
    try:
        import faiss  # noqa: F401
        have_faiss = True
    except ImportError:
        have_faiss = False

    sub_classes = max(1, round(args.classes * args.original_n / args.n))
    ks_sub = tuple(k for k in KS if k < args.original_n)
    rows = []
    plan = [("ours", args.original_n, sub_classes, ks_sub),
            ("original", args.original_n, sub_classes, ks_sub)]
    if have_faiss:
        plan.append(("faiss", args.original_n, sub_classes, ks_sub))
    plan.append(("ours", args.n, args.classes, KS))
    if have_faiss and not args.skip_faiss_full:
        plan.append(("faiss", args.n, args.classes, KS))
    for method, n, classes, ks in plan:
        res = measure(method, n, args.dim, classes, args.noise, ks, args.block_size)
        rows.append((method, n, classes, res))
        print(json.dumps({"method": method, "n": n, **res}), flush=True)

    print(f"\n{'method':<10}{'n':>8}{'classes':>9}{'wall s':>9}{'cpu s':>8}{'peak MiB':>10}"
          f"{'wall/ours':>10}{'cpu/ours':>9}{'mem/ours':>9}  recall@" + ",".join(map(str, KS)))
    ours_at = {n: r for m, n, _, r in rows if m == "ours"}
    for method, n, classes, res in rows:
        ref = ours_at[n]
        recalls = " ".join(f"{100 * v:.2f}" for k, v in res["metrics"].items()
                           if k.startswith("recall@"))
        print(f"{method:<10}{n:>8}{classes:>9}{res['seconds']:>9.1f}{res['cpu_seconds']:>8.1f}"
              f"{res['peak_mib']:>10.0f}{res['seconds'] / ref['seconds']:>10.2f}"
              f"{res['cpu_seconds'] / ref['cpu_seconds']:>9.2f}"
              f"{res['peak_mib'] / max(ref['peak_mib'], 1):>9.2f}  {recalls}")
    for n, r in ours_at.items():
        m = r["metrics"]
        print(f"ours n={n}: map@r {m['map@r']:.4f} r_precision {m['r_precision']:.4f}")


if __name__ == "__main__":
    main()
