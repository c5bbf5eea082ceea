"""Balanced k-means: N clusters of exactly F / N points, for LLaMA-MoE's clustering split.

Shape legend: F points (dense neurons), D features (hidden size), N clusters.

LLaMA-MoE fits `k_means_constrained.KMeansConstrained(size_min=size_max=F/N)` (a min-cost-flow
assignment) on the L2-normalised weight rows. Here the assignment step is greedy instead: points, in
order of their distance to their nearest centroid, take the nearest centroid that still has room.
It keeps every cluster exactly full, needs no extra dependency, and recovers well-separated clusters
exactly (tested). Distances are computed in float64 so that the result does not depend on BLAS
blocking, i.e. on the machine's thread count.
"""

from __future__ import annotations

import torch


def balanced_kmeans(
    x_FD: torch.Tensor, num_clusters: int, generator: torch.Generator, max_iters: int = 30
) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels int64 [F] in [0, num_clusters), each label used exactly F / num_clusters times, and the
    centroids float64 [N, D]: the mean of each cluster's normalised points (not themselves unit).

    Args:
        x_FD: the points (rows); they are L2-normalised first.
        num_clusters: N, which must divide F.
        generator: seeds the choice of the initial centroids (N distinct points).
        max_iters: Lloyd iterations; stops earlier once the assignment no longer changes.
    """
    num_points = x_FD.shape[0]
    if num_points % num_clusters:
        raise ValueError(f"balanced k-means: {num_clusters} clusters cannot split {num_points} points evenly")
    size = num_points // num_clusters
    x_FD = x_FD.double()
    x_FD = x_FD / x_FD.norm(dim=1, keepdim=True).clamp_min(1e-12)
    centroids_ND = x_FD[torch.randperm(num_points, generator=generator)[:num_clusters]]
    labels_F = torch.full((num_points,), -1, dtype=torch.long)
    for _ in range(max_iters):
        dist_FN = (
            (x_FD * x_FD).sum(1, keepdim=True) - 2 * x_FD @ centroids_ND.T + (centroids_ND**2).sum(1)[None]
        )
        new_labels_F = _balanced_assign(dist_FN, size)
        if torch.equal(new_labels_F, labels_F):
            break
        labels_F = new_labels_F
        centroids_ND = torch.zeros_like(centroids_ND).index_add_(0, labels_F, x_FD) / size
    return labels_F, centroids_ND  # the centroids are always those of the returned labels


def _balanced_assign(dist_FN: torch.Tensor, size: int) -> torch.Tensor:
    """Greedy capacity-constrained assignment: most confident points first, nearest open cluster."""
    num_points, num_clusters = dist_FN.shape
    prefs = dist_FN.argsort(dim=1, stable=True).tolist()
    order = dist_FN.min(dim=1).values.argsort(stable=True).tolist()
    room = [size] * num_clusters
    labels = [0] * num_points
    for p in order:
        for c in prefs[p]:
            if room[c]:
                room[c] -= 1
                labels[p] = c
                break
    return torch.tensor(labels, dtype=torch.long)
