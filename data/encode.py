"""Documents -> one flat token array with EOS after every document: the unit both tokenisation paths share.

On-the-fly tokenisation and `data.prepare`'s workers call the same `split_documents` and
`encode_documents`, with the same `text_tokenizer`, so prepared shards hold exactly the tokens the
on-the-fly path would make.

Design choices:
- Empty and missing (`None`) texts are skipped: a document of zero tokens would only add a lone EOS.
- The eval split is decided per document by a hash of its text (`is_eval_document`), not by its
  position: held-out documents come from every file of every source, and a document that appears in
  two sources is on the same side in both.
- Special-token text inside a document is text (`text_tokenizer`); the only control token the
  data carries is the EOS appended after each document.
- `encode_batch_fast` (no character offsets) and one `np.fromiter` over the chained ids keep the cost
  over plain `encode_batch` near zero.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence

import numpy as np
from tokenizers import Tokenizer

_EVAL_KEY = b"finemoe-eval-v1"


def text_tokenizer(tokenizer: Tokenizer) -> Tokenizer:
    """A copy of `tokenizer` that reads special-token text (`<|endoftext|>`, `<|im_start|>`) in a
    document as the characters it is, not as the control token: a web page quoting a chat template
    must not end a document in the middle or inject a turn marker."""
    copy = Tokenizer.from_str(tokenizer.to_str())
    copy.encode_special_tokens = True
    return copy


def is_eval_document(text: str, eval_fraction: float) -> bool:
    """Whether a document is held out: a keyed hash of its text, as a fraction of 2^64, below
    `eval_fraction`. The same text is held out in every source, every run and every preparation."""
    if eval_fraction <= 0:
        return False
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=_EVAL_KEY).digest()
    return int.from_bytes(digest, "little") < eval_fraction * 2**64


def split_documents(texts: Sequence[object], eval_fraction: float) -> dict[str, list[object]]:
    """`{"train": [...], "eval": [...]}`: the texts (order kept) on each side of `is_eval_document`.

    Empty and missing texts go to train, where `encode_documents` skips them (and a non-string
    raises there).
    """
    out: dict[str, list[object]] = {"train": [], "eval": []}
    for text in texts:
        held = isinstance(text, str) and bool(text) and is_eval_document(text, eval_fraction)
        out["eval" if held else "train"].append(text)
    return out


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
