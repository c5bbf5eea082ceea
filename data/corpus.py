"""The built-in corpus: Python's own reference documentation, which ships with every Python installation.

`pydoc_data.topics` holds the text `help("assert")` prints: ~460 kB of English prose and code from
the language reference. Each topic is split at its section headings into documents.

Design choices:
- Exact duplicates (sections shared by several topics) are kept once.
- Documents are ordered by the sha256 of their text: a fixed pseudo-random order that does not depend
  on any RNG. The eval split does not depend on that order: like every source, each document is held
  out or not by a keyed hash of its text (`data.encode.is_eval_document`, `DataConfig.eval_fraction`
  of them), a pseudo-random sample of sections that is the same in every run.
- The text differs between Python versions; `corpus_fingerprint()` keys everything cached from it.
"""

from __future__ import annotations

import functools
import hashlib
import re

# A heading is a line of text followed by a line of at least three underline characters.
_HEADING = re.compile(r'^(?=.+\n[=\-*~^"]{3,}\n)', re.MULTILINE)


@functools.cache
def builtin_documents() -> tuple[str, ...]:
    """The built-in corpus as documents, in its fixed order."""
    from pydoc_data.topics import topics

    seen: set[str] = set()
    docs: list[str] = []
    for name in sorted(topics):
        for section in _HEADING.split(topics[name]):
            text = section.strip()
            if text and text not in seen:
                seen.add(text)
                docs.append(text)
    docs.sort(key=lambda d: hashlib.sha256(d.encode()).digest())
    return tuple(docs)


@functools.cache
def corpus_fingerprint() -> str:
    """sha256 of the built-in corpus (changes with the Python version that ships it)."""
    h = hashlib.sha256()
    for doc in builtin_documents():
        h.update(doc.encode())
        h.update(b"\0")
    return h.hexdigest()
