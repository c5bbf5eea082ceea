"""Documents -> one flat token array with EOS after every document: the unit both tokenisation paths share.

On-the-fly tokenisation and `data.prepare`'s workers call the same `encode_documents`, so prepared
shards hold exactly the tokens the on-the-fly path would make.

Design choices:
- Empty and missing (`None`) texts are skipped: a document of zero tokens would only add a lone EOS.
- `encode_batch_fast` (no character offsets) and one `np.fromiter` over the chained ids keep the cost
  over plain `encode_batch` near zero.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from tokenizers import Tokenizer


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every id of a vocabulary."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def encode_documents(
    tokenizer: Tokenizer,
    texts: Sequence[object],
    eos_token_id: int,
    dtype: np.dtype,
    where: str = "documents",
) -> tuple[np.ndarray, np.ndarray]:
    """Tokenise documents and join them, each followed by EOS.

    Args:
        tokenizer: the `tokenizers` backend (`PreTrainedTokenizerFast.backend_tokenizer`).
        texts: document texts; `None` and "" are skipped.
        eos_token_id: appended after every document.
        dtype: of the returned tokens.
        where: names the source in errors.

    Returns:
        `tokens` [sum(lengths)] as `dtype`, and `lengths` [kept documents] int64, EOS included.

    Raises:
        ValueError: a text that is not a string.
    """
    kept: list[str] = []
    for i, text in enumerate(texts):
        if isinstance(text, str):
            if text:
                kept.append(text)
        elif text is not None:
            raise ValueError(f"{where}: document {i} is {type(text).__name__}, not a string")
    if not kept:
        return np.empty(0, dtype), np.empty(0, np.int64)
    encode_batch = getattr(
        tokenizer, "encode_batch_fast", tokenizer.encode_batch
    )  # _fast: tokenizers>=0.20.1
    ids = [e.ids for e in encode_batch(kept, add_special_tokens=False)]
    lengths = np.fromiter((len(x) + 1 for x in ids), np.int64, len(ids))
    eos = (eos_token_id,)
    chained = itertools.chain.from_iterable(itertools.chain(x, eos) for x in ids)
    tokens = np.fromiter(chained, dtype, int(lengths.sum()))
    keep = lengths > 1  # a non-empty text that tokenises to nothing (a normaliser ate it)
    if not keep.all():
        ends = np.cumsum(lengths)
        tokens = np.delete(tokens, ends[~keep] - 1)
        lengths = lengths[keep]
    return tokens, lengths
