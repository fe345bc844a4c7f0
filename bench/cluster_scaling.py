"""Cluster N synthetic 384-d embeddings; print one JSON line {"n", "k", "seconds", "peak_rss_gb", ...}.

The embeddings mimic sentence embeddings: a mixture of ``--centers`` Gaussian groups in a 32-d latent
subspace, projected to 384-d with small isotropic noise and normalised. ``--recall`` also measures the
recall of the approximate kNN graph against exact neighbours on 1,000 sampled points.
"""

import argparse
import json
import resource
import time

import numpy as np


def synthetic_embeddings(n: int, centers: int, seed: int = 0, dim: int = 384, latent: int = 32):
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((dim, latent)))
    means = rng.standard_normal((centers, latent)) * 3.0
    labels = rng.integers(0, centers, n)
    x = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):  # in blocks, so generation does not dominate peak memory
        stop = min(n, start + 100_000)
        z = means[labels[start:stop]] + rng.standard_normal((stop - start, latent))
        block = z @ basis.T + 0.05 * rng.standard_normal((stop - start, dim))
        x[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return x, labels


def knn_recall(x, config, sample=1000, seed=0):
    import faiss

    from paser.selection.cluster import knn_graph

    idx, _ = knn_graph(x, config.n_neighbors, config.exact_knn_max, config.hnsw_m, config.hnsw_ef, config.seed)
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(x), size=min(sample, len(x)), replace=False)
    exact = faiss.IndexFlatIP(x.shape[1])
    exact.add(x)
    _, truth = exact.search(x[rows], config.n_neighbors + 1)
    hits = [len(set(idx[r]) & (set(t) - {r})) / config.n_neighbors for r, t in zip(rows, truth)]
    return float(np.mean(hits))


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--centers", type=int, default=20)
    parser.add_argument("--method", default="nmf", choices=["nmf", "kmeans"])
    parser.add_argument("--recall", action="store_true", help="also measure kNN recall (extra time, not counted)")
    args = parser.parse_args()

    from sklearn.metrics import adjusted_rand_score

    from paser.selection.cluster import ClusterConfig, cluster_embeddings

    x, labels = synthetic_embeddings(args.n, args.centers)
    config = ClusterConfig(method=args.method)
    t0 = time.perf_counter()
    result = cluster_embeddings(x, config)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    out = {"n": args.n, "k": result.k, "seconds": round(seconds, 2), "peak_rss_gb": round(peak, 3),
           "ari_vs_generating_centers": round(float(adjusted_rand_score(labels, result.labels)), 4),
           "knn": "exact" if args.n <= config.exact_knn_max else f"hnsw(M={config.hnsw_m},ef={config.hnsw_ef})",
           "stages": {k: round(v, 2) for k, v in result.timings.items()}}
    if args.recall:
        out["knn_recall_at_15"] = round(knn_recall(x, config), 4)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
