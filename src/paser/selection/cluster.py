"""Semantic-structural clustering: a diffusion map on a sparse kNN graph, then NMF (or k-means).

Pipeline (every step sparse; nothing N x N is ever dense):

1. **kNN graph** on unit-normalised embeddings (cosine). Exact search (faiss flat index) up to
   ``exact_knn_max`` points, an HNSW index above it.
2. **Gaussian kernel with self-tuning bandwidth** (Zelnik-Manor & Perona): ``sigma_i`` is the distance
   from point i to its ``bandwidth_neighbor``-th neighbour and ``W_ij = exp(-d_ij^2 / (sigma_i sigma_j))``;
   the graph is symmetrised with ``max(W, W^T)``.
3. **Density normalisation** (Coifman & Lafon, alpha = ``alpha``): ``W~ = Q^-a W Q^-a`` with ``Q`` the
   degrees, so that the diffusion reflects the manifold's geometry rather than its sampling density.
4. **Diffusion operator** ``P = D^-1 W~``; its top eigenpairs come from the symmetric conjugate
   ``D^-1/2 W~ D^-1/2`` with a sparse Lanczos solver (``scipy.sparse.linalg.eigsh``).
   Diffusion coordinates at time t: ``lambda_j^t psi_j`` for the non-trivial ``j = 1..K``.
5. **K** (unless given): the eigengap rule, ``K = argmax_{k in [k_min, k_max]} (lambda_k - lambda_{k+1})``,
   with ``lambda_1 = 1 >= lambda_2 >= ...`` the diffusion eigenvalues (K near-1 eigenvalues = K weakly
   connected groups).
6. **NMF spectral clustering**: the coordinates are row-normalised and split into their positive and
   negative parts (a non-negative N x 2K matrix); NMF with K components factorises it and each point
   joins the component with the largest weight. ``method="kmeans"`` runs k-means on the same rows instead.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import eigsh

# faiss (optional) and scikit-learn are imported by the clustering that uses them.

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusterConfig:
    """Clustering settings; the defaults are what ``paser select`` uses."""

    n_clusters: int | None = None  # None: eigengap rule within [k_min, k_max]
    k_min: int = 2
    k_max: int = 64
    method: Literal["nmf", "kmeans"] = "nmf"
    n_neighbors: int = 15  # kNN graph degree (before symmetrisation)
    bandwidth_neighbor: int = 7  # sigma_i = distance to this neighbour (self-tuning kernel)
    alpha: float = 1.0  # density normalisation exponent (1: Laplace-Beltrami normalisation)
    diffusion_time: int = 1
    exact_knn_max: int = 30_000  # above this, approximate (HNSW) neighbours
    hnsw_m: int = 16
    hnsw_ef: int = 64
    seed: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class ClusterResult:
    labels: np.ndarray  # (N,) int, clusters numbered by decreasing size
    k: int
    eigenvalues: np.ndarray  # diffusion eigenvalues, lambda_1 = 1 first
    coordinates: np.ndarray  # (N, K) diffusion coordinates
    timings: dict[str, float] = field(default_factory=dict)


def _normalise_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def knn_graph(x: np.ndarray, n_neighbors: int, exact_max: int = 30_000, hnsw_m: int = 16,
              hnsw_ef: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices and cosine distances ``1 - cos`` of each row's ``n_neighbors`` nearest others, (N, k)."""
    import faiss

    x = np.ascontiguousarray(_normalise_rows(x.astype(np.float32)))
    n, d = x.shape
    k = min(n_neighbors + 1, n)  # +1: every point finds itself first
    if n <= exact_max:
        index = faiss.IndexFlatIP(d)
    else:
        index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 32
        index.hnsw.efSearch = max(hnsw_ef, k)
    index.add(x)
    sims, idx = index.search(x, k)
    # Drop the point itself (wherever the index put it); keep the first n_neighbors others.
    is_self = idx == np.arange(n)[:, None]
    order = np.argsort(is_self, axis=1, kind="stable")
    idx = np.take_along_axis(idx, order, axis=1)[:, : k - 1]
    sims = np.take_along_axis(sims, order, axis=1)[:, : k - 1]
    missing = idx < 0  # HNSW can return fewer than k; point those at self with zero weight later
    idx[missing] = np.broadcast_to(np.arange(n)[:, None], idx.shape)[missing]
    dist = np.clip(1.0 - sims, 0.0, 2.0).astype(np.float32)
    dist[missing] = np.inf
    return idx, dist


def diffusion_kernel(idx: np.ndarray, dist: np.ndarray, bandwidth_neighbor: int, alpha: float) -> sp.csr_matrix:
    """Symmetric, density-normalised Gaussian affinity on the kNN graph (sparse N x N)."""
    n, k = idx.shape
    col = min(bandwidth_neighbor, k) - 1
    finite = np.where(np.isfinite(dist), dist, np.nan)
    sigma = np.nan_to_num(finite[:, col], nan=np.nanmedian(finite))
    sigma = np.maximum(sigma, max(float(np.median(sigma)) * 1e-3, 1e-8))
    rows = np.repeat(np.arange(n), k)
    cols = idx.ravel()
    d2 = (dist.astype(np.float64) ** 2).ravel()
    weights = np.exp(-d2 / (sigma[rows] * sigma[cols]))
    weights[~np.isfinite(weights) | (rows == cols)] = 0.0
    w = sp.csr_matrix((weights, (rows, cols)), shape=(n, n))
    w = w.maximum(w.T).tocsr()
    w.eliminate_zeros()
    if alpha:
        q = np.asarray(w.sum(axis=1)).ravel()
        q_inv = np.where(q > 0, q, 1.0) ** -alpha
        w = sp.diags(q_inv) @ w @ sp.diags(q_inv)
    return w.tocsr()


def diffusion_map(w: sp.csr_matrix, n_components: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Top ``n_components + 1`` eigenvalues (descending, ``lambda_1 = 1`` first) and right eigenvectors
    ``psi`` of ``P = D^-1 W`` (columns; ``psi_0`` constant on connected graphs)."""
    n = w.shape[0]
    degree = np.asarray(w.sum(axis=1)).ravel()
    isolated = degree <= 0
    d_inv_sqrt = 1.0 / np.sqrt(np.where(isolated, 1.0, degree))
    s = sp.diags(d_inv_sqrt) @ w @ sp.diags(d_inv_sqrt)
    k = min(n_components + 1, n - 2)
    v0 = np.random.default_rng(seed).standard_normal(n)
    # Shift by +I: the spectrum becomes [0, 2] and the wanted top end is easiest for Lanczos.
    vals, vecs = eigsh((s + sp.identity(n, format="csr")).astype(np.float64), k=k, which="LA", v0=v0,
                       tol=1e-6, maxiter=n * 10)
    vals = vals - 1.0
    order = np.argsort(-vals)
    vals, vecs = vals[order], vecs[:, order]
    psi = vecs * d_inv_sqrt[:, None]
    return np.clip(vals, -1.0, 1.0), psi


def eigengap_k(eigenvalues: np.ndarray, k_min: int, k_max: int) -> int:
    """``argmax_k (lambda_k - lambda_{k+1})`` over ``k in [k_min, k_max]`` (1-based eigenvalue index)."""
    k_max = min(k_max, len(eigenvalues) - 1)
    if k_max < k_min:
        return max(1, min(k_min, len(eigenvalues)))
    gaps = eigenvalues[k_min - 1:k_max] - eigenvalues[k_min:k_max + 1]
    return int(k_min + np.argmax(gaps))


def nmf_labels(coordinates: np.ndarray, k: int, seed: int = 0, fit_max: int = 100_000) -> np.ndarray:
    """Cluster rows by NMF of their non-negative (positive part, negative part) split.

    Above ``fit_max`` rows the factor H is learnt on a random ``fit_max``-row sample and every row's
    weights are then solved with H fixed (``NMF.transform``), which is linear in N.
    """
    from sklearn.decomposition import NMF

    rows = _normalise_rows(coordinates)
    nonneg = np.hstack([np.maximum(rows, 0), np.maximum(-rows, 0)]).astype(np.float32)
    model = NMF(n_components=k, init="nndsvda", random_state=seed, max_iter=200, tol=1e-3)
    if len(nonneg) <= fit_max:
        return np.argmax(model.fit_transform(nonneg), axis=1)
    sample = np.random.default_rng(seed).choice(len(nonneg), size=fit_max, replace=False)
    model.fit(nonneg[sample])
    return np.concatenate([np.argmax(model.transform(nonneg[i:i + fit_max]), axis=1)
                           for i in range(0, len(nonneg), fit_max)])


def kmeans_labels(coordinates: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    from sklearn.cluster import KMeans

    return KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(_normalise_rows(coordinates))


def _relabel_by_size(labels: np.ndarray) -> np.ndarray:
    """Number clusters 0..K-1 by decreasing size (ties by first occurrence), dropping empty ones."""
    uniq, first, counts = np.unique(labels, return_index=True, return_counts=True)
    order = sorted(range(len(uniq)), key=lambda i: (-counts[i], first[i]))
    mapping = np.empty(uniq.max() + 1, dtype=np.int64)
    mapping[uniq[order]] = np.arange(len(uniq))
    return mapping[labels]


def cluster_embeddings(embeddings: np.ndarray, config: ClusterConfig = ClusterConfig()) -> ClusterResult:
    """Cluster embeddings (N x d) with a diffusion map and NMF/k-means; see the module docstring."""
    n = len(embeddings)
    if n < 4:
        return ClusterResult(np.zeros(n, dtype=np.int64), 1, np.ones(1), np.zeros((n, 1)))
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    idx, dist = knn_graph(embeddings, config.n_neighbors, config.exact_knn_max, config.hnsw_m, config.hnsw_ef,
                          config.seed)
    timings["knn"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    w = diffusion_kernel(idx, dist, config.bandwidth_neighbor, config.alpha)
    del idx, dist
    k_limit = config.n_clusters if config.n_clusters else config.k_max
    eigenvalues, psi = diffusion_map(w, n_components=min(k_limit + 1, n - 3), seed=config.seed)
    del w
    timings["diffusion_map"] = time.perf_counter() - t0

    k = config.n_clusters or eigengap_k(eigenvalues, config.k_min, config.k_max)
    k = max(1, min(k, n))
    coordinates = psi[:, 1:k + 1] * (eigenvalues[1:k + 1] ** config.diffusion_time)
    t0 = time.perf_counter()
    if k == 1:
        labels = np.zeros(n, dtype=np.int64)
    elif config.method == "nmf":
        labels = nmf_labels(coordinates, k, config.seed)
    elif config.method == "kmeans":
        labels = kmeans_labels(coordinates, k, config.seed)
    else:
        raise ValueError(f"unknown clustering method '{config.method}' (nmf or kmeans)")
    timings["partition"] = time.perf_counter() - t0
    labels = _relabel_by_size(labels)
    log.info("clustered %d points into %d clusters (%s)", n, labels.max() + 1,
             ", ".join(f"{key} {v:.1f}s" for key, v in timings.items()))
    return ClusterResult(labels, int(labels.max() + 1), eigenvalues, coordinates.astype(np.float32), timings)
