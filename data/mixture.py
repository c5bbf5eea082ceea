"""Weighted mixture: the global sample index -> (source, that source's own sample index).

The global sample sequence is cut into windows of `window` samples. Every window gives each source a
fixed quota (its weight's share of the window, rounded by largest remainder) and places the slots in
a keyed pseudo-random order: window c serves source s its samples [c * quota[s], (c + 1) * quota[s]),
in that permuted order. So each source reads its own stream window by window, without gaps or
repeats, and realised proportions never drift more than one window from the quotas. A source smaller
than its share simply goes through more epochs of its own than a larger one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from data.permutation import Permutation


def quotas(weights: Sequence[float], window: int) -> np.ndarray:
    """Samples per window for each source: shares of `window` rounded by largest remainder."""
    w = np.asarray(weights, dtype=np.float64)
    exact = w / w.sum() * window
    counts = np.floor(exact).astype(np.int64)
    shortfall = window - int(counts.sum())
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[:shortfall]] += 1
    for i, c in enumerate(counts):
        if c == 0:
            raise ValueError(
                f"data.sources[{i}].weight={weights[i]} is too small for data.mixture_window={window}: "
                "it would get 0 samples per window; raise the weight or the window"
            )
    return counts


class Mixture:
    """Interleaves several sources' sample streams by weight.

    Args:
        weights: relative share of each source (positive).
        window: samples per window (>= number of sources).
        key: integers (seed, split) that select the slot orders.
    """

    def __init__(self, weights: Sequence[float], window: int, key: Sequence[int]):
        self.window = window
        self.quotas = quotas(weights, window)
        self._starts = np.concatenate([[0], np.cumsum(self.quotas)])
        self.key = tuple(key)

    @property
    def num_sources(self) -> int:
        return len(self.quotas)

    def locate(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Source and per-source sample index of global samples `g`."""
        g = np.asarray(g, dtype=np.int64)
        if self.num_sources == 1:
            return np.zeros_like(g), g
        window_idx, slot = np.divmod(g, self.window)
        position = np.empty_like(g)
        for c in np.unique(window_idx):
            sel = window_idx == c
            position[sel] = Permutation(self.window, (*self.key, int(c)))(slot[sel])
        source = np.searchsorted(self._starts, position, side="right") - 1
        local = window_idx * self.quotas[source] + position - self._starts[source]
        return source, local

    def reserved(self, g: int) -> np.ndarray:
        """Each source's samples in the windows that global samples [0, g) have entered: where a new
        mixture phase starting at g continues every source. Within a window a source's samples are
        served in a permuted order, so those not yet served when g falls mid-window are not a suffix:
        continuing at `consumed(g)` would serve some twice and skip as many. The rest of the window
        is skipped instead (at most one window's quota per source); nothing is served twice."""
        if self.num_sources == 1:
            return np.array([g], dtype=np.int64)
        return -(-g // self.window) * self.quotas

    def consumed(self, g: int) -> np.ndarray:
        """Samples each source has served among global samples [0, g)."""
        if self.num_sources == 1:
            return np.array([g], dtype=np.int64)
        window_idx, slot = divmod(g, self.window)
        position = Permutation(self.window, (*self.key, window_idx))(np.arange(slot))
        source = np.searchsorted(self._starts, position, side="right") - 1
        return window_idx * self.quotas + np.bincount(source, minlength=self.num_sources)
