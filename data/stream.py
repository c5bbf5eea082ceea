"""Packing: one source split as an endless stream of `seq_len + 1`-token blocks, reshuffled every epoch.

Layout. The split's T tokens (documents, each followed by EOS) repeat without end: pass e is tokens
[e*T, (e+1)*T) of the endless stream, and block b is tokens [b*L, (b+1)*L) with L = seq_len + 1.
Blocks do not overlap and nothing pads them, so every token of every document lands in exactly one
block per pass, in document order; the one block that straddles two passes ends with the start of
the next pass instead of dropping a remainder.

Order. Epoch e owns the blocks that *start* in pass e, blocks ceil(e*T/L) .. ceil((e+1)*T/L) - 1,
and serves them in a keyed pseudo-random order (`Permutation`, key = (seed, stream, e)). The p-th
sample of the stream is therefore in epoch floor(p*L/T): any sample is found in O(1), and a resumed
run needs nothing but p.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from data.permutation import Permutation
from data.token_store import TokenStore


class PackedStream:
    """Samples of one source split.

    Args:
        store: the source's tokens.
        start, stop: the split's token range in `store`.
        block_len: tokens per block (`seq_len + 1`).
        key: integers (seed, source index, split) that select the per-epoch orders.
    """

    def __init__(self, store: TokenStore, start: int, stop: int, block_len: int, key: Sequence[int]):
        if stop <= start:
            raise ValueError("a packed stream needs at least one token")
        self.store = store
        self.start = start
        self.num_tokens = stop - start
        self.block_len = block_len
        self.key = tuple(key)
        self._perm: tuple[int, Permutation] | None = None

    def epoch_of(self, p: np.ndarray) -> np.ndarray:
        """Epoch of each sample index."""
        return np.asarray(p, dtype=np.int64) * self.block_len // self.num_tokens

    def first_block(self, epoch: np.ndarray) -> np.ndarray:
        """Index of the first block of each epoch: ceil(epoch * T / L)."""
        return -(-np.asarray(epoch, dtype=np.int64) * self.num_tokens // self.block_len)

    def block_of(self, p: np.ndarray) -> np.ndarray:
        """Block served as sample p (a bijection on sample indices that keeps each epoch's blocks)."""
        p = np.asarray(p, dtype=np.int64)
        epoch = self.epoch_of(p)
        first = self.first_block(epoch)
        count = self.first_block(epoch + 1) - first
        blocks = np.empty_like(p)
        for e in np.unique(epoch):
            sel = epoch == e
            blocks[sel] = first[sel] + self._permutation(int(e), int(count[sel][0]))(p[sel] - first[sel])
        return blocks

    def read_block(self, block: int, out: np.ndarray) -> None:
        """Write block `block` (tokens [block*L, (block+1)*L) of the endless stream) into `out`."""
        pos = block * self.block_len % self.num_tokens
        filled = 0
        while filled < self.block_len:
            take = min(self.block_len - filled, self.num_tokens - pos)
            out[filled : filled + take] = self.store.read(self.start + pos, self.start + pos + take)
            filled += take
            pos = 0

    def _permutation(self, epoch: int, count: int) -> Permutation:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, Permutation(count, (*self.key, epoch)))
        return self._perm[1]
