import numpy as np
import scipy.sparse as sp
from sklearn.metrics import adjusted_rand_score

from paser.selection.cluster import ClusterConfig, cluster_embeddings, diffusion_kernel, eigengap_k, knn_graph


def gaussian_mixture(n, k, dim=384, spread=0.6, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((k, dim))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    labels = rng.integers(0, k, n)
    x = centers[labels] + rng.standard_normal((n, dim)) * spread / np.sqrt(dim)
    return x.astype(np.float32), labels


def test_recovers_twelve_gaussians_with_automatic_k():
    x, labels = gaussian_mixture(20_000, 12)
    result = cluster_embeddings(x)
    assert result.k == 12
    assert adjusted_rand_score(labels, result.labels) >= 0.9


def test_kmeans_option_and_fixed_k():
    x, labels = gaussian_mixture(3000, 5, seed=1)
    result = cluster_embeddings(x, ClusterConfig(n_clusters=5, method="kmeans"))
    assert result.k == 5 and adjusted_rand_score(labels, result.labels) >= 0.9
    sizes = np.bincount(result.labels)
    assert np.all(np.diff(sizes) <= 0)  # numbered by decreasing size


def test_kernel_is_sparse_symmetric_and_normalised():
    x, _ = gaussian_mixture(2000, 4, seed=2)
    idx, dist = knn_graph(x, 10)
    assert idx.shape == (2000, 10) and not np.any(idx == np.arange(2000)[:, None])
    w = diffusion_kernel(idx, dist, bandwidth_neighbor=7, alpha=1.0)
    assert sp.issparse(w) and w.nnz <= 2 * 2000 * 10
    assert abs(w - w.T).max() < 1e-12
    assert w.diagonal().max() == 0


def test_approximate_neighbours_agree_with_exact():
    x, _ = gaussian_mixture(4000, 6, seed=3)
    exact, _ = knn_graph(x, 10, exact_max=10**9)
    approx, _ = knn_graph(x, 10, exact_max=100)  # forces HNSW
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact)])
    assert recall > 0.9


def test_eigengap_rule():
    eigenvalues = np.array([1.0, 0.99, 0.98, 0.5, 0.45, 0.4])
    assert eigengap_k(eigenvalues, 2, 64) == 3


def test_tiny_inputs():
    result = cluster_embeddings(np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32))
    assert result.k == 1 and result.labels.tolist() == [0, 0, 0]
