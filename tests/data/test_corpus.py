"""The built-in corpus is real, varied, duplicate-free text in a fixed order."""

from __future__ import annotations

import hashlib

from data.corpus import builtin_documents, corpus_fingerprint


def test_documents_are_real_distinct_text() -> None:
    docs = builtin_documents()
    assert len(docs) > 150 and sum(map(len, docs)) > 200_000
    assert len(set(docs)) == len(docs)
    assert all(d == d.strip() and d for d in docs)
    assert any("assert" in d for d in docs) and any("lambda" in d for d in docs)
    lengths = sorted(map(len, docs))
    assert lengths[len(docs) // 10] * 10 < lengths[-len(docs) // 10]  # short and long documents


def test_order_is_fixed_by_content_hash() -> None:
    docs = builtin_documents()
    keys = [hashlib.sha256(d.encode()).digest() for d in docs]
    assert keys == sorted(keys)
    assert len(corpus_fingerprint()) == 64
