"""Token stores: one source's documents as a flat token array (EOS after each) plus document offsets.

Two implementations share this interface: `InMemoryTokens` (tokenised on the fly) and
`data.shards.ShardedTokens` (memory-mapped prepared shards). Everything downstream reads through it.
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


def split_range(doc_offsets: np.ndarray, eval_fraction: float, split: str) -> tuple[int, int]:
    """Token range [start, stop) of one split: eval is the last `eval_fraction` of the documents.

    At least one document goes to each split when `eval_fraction > 0` and there are two or more.
    """
    num_docs = len(doc_offsets) - 1
    num_eval = 0
    if eval_fraction > 0 and num_docs >= 2:
        num_eval = min(num_docs - 1, max(1, round(eval_fraction * num_docs)))
    cut = int(doc_offsets[num_docs - num_eval])
    return (cut, int(doc_offsets[-1])) if split == "eval" else (0, cut)
