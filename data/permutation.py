"""A pseudo-random permutation of `range(n)` that is evaluated per index: O(1) memory for any n.

Shuffling the blocks of a 100B-token corpus with `np.random.permutation` would hold ~24M indices per
rank and per epoch; a keyed Feistel network maps any index to its image directly instead.

Design choices:
- A balanced Feistel network on the smallest even number of bits covering `n` is a bijection on
  [0, 4^k); "cycle walking" (re-encrypting images >= n) restricts it to a bijection on [0, n), with
  fewer than 4 rounds of walking on average because 4^k < 4n.
- Round keys come from splitmix64 of the caller's integer key, so the order depends only on
  (key, n): identical across processes, machines and numpy versions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_ROUNDS = 6
_U64 = (1 << 64) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a well-mixed 64-bit hash (uint64 arithmetic wraps)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class Permutation:
    """A keyed bijection on `range(n)`.

    Args:
        n: size of the domain.
        key: integers (seed, epoch, ...) that select the permutation.
    """

    def __init__(self, n: int, key: Sequence[int]):
        if n < 0:
            raise ValueError(f"permutation size must be >= 0, got {n}")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self._half = (bits + 1) // 2
        self._mask = np.uint64((1 << self._half) - 1)
        state = np.array([0x5EED], dtype=np.uint64)
        for k in key:
            state = _splitmix64(state ^ np.uint64(int(k) & _U64))
        round_keys = []
        for _ in range(_ROUNDS):
            state = _splitmix64(state)
            round_keys.append(state[0])
        self._round_keys = round_keys

    def __call__(self, index: np.ndarray) -> np.ndarray:
        """Images of `index` (any int array with values in [0, n)), as int64."""
        x = np.asarray(index, dtype=np.int64)
        if x.size and (x.min() < 0 or x.max() >= self.n):
            raise IndexError(f"permutation index outside [0, {self.n})")
        y = self._encrypt(x.astype(np.uint64))
        outside = y >= np.uint64(self.n)
        while outside.any():
            y[outside] = self._encrypt(y[outside])
            outside = y >= np.uint64(self.n)
        return y.astype(np.int64)

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        half = np.uint64(self._half)
        left, right = x >> half, x & self._mask
        for k in self._round_keys:
            left, right = right, left ^ (_splitmix64(right ^ k) & self._mask)
        return (left << half) | right
