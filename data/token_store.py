"""Token stores: one source split's documents as a flat token array (EOS after each) plus document offsets.

Two implementations share this interface: `InMemoryTokens` (tokenised on the fly) and
`data.shards.ShardedTokens` (prepared shards, read through a bounded handle cache). Everything
downstream reads through it.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class TokenStore(Protocol):
    """Random access to one source's token stream."""

    @property
    def num_tokens(self) -> int:
        """Tokens in the source, EOS included."""
        ...

    @property
    def doc_offsets(self) -> np.ndarray:
        """int64 [num_docs + 1]: document d is tokens [doc_offsets[d], doc_offsets[d + 1])."""
        ...

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop), 0 <= start <= stop <= num_tokens."""
        ...


class InMemoryTokens:
    """A token store held in one numpy array."""

    def __init__(self, tokens: np.ndarray, doc_lengths: np.ndarray):
        self.tokens = tokens
        self._doc_offsets = np.concatenate([[0], np.cumsum(doc_lengths, dtype=np.int64)])
        assert self._doc_offsets[-1] == len(tokens)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def doc_offsets(self) -> np.ndarray:
        return self._doc_offsets

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.tokens[start:stop]
