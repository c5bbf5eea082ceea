"""The prepared format: memory-mapped token shards plus an index, written by `data.prepare`.

    <prepared_dir>/index.json                     dtype, EOS, tokenizer fingerprint, sources, files
    <prepared_dir>/source_000/tokens_00000.bin    raw little-endian uint16 (vocab <= 65536) or uint32
    <prepared_dir>/source_000/doc_offsets.bin     raw int64 [num_docs + 1]: document d is tokens
                                                  [offsets[d], offsets[d + 1]) of the source

Design choices:
- Raw arrays, not .npy: a shard is appended to as workers deliver, with nothing to patch afterwards.
- Shards hold whole documents and record their token count, byte size and sha256: a truncated shard
  is caught when opened (sizes, always), a corrupted one by its hash (`DataConfig.verify_shards`).
- Readers map the files (`np.memmap`), so memory stays constant whatever the corpus size.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "finemoe-prepared"
VERSION = 1
INDEX = "index.json"
_HASH_CHUNK = 1 << 24  # bytes


def source_dir(index: int) -> str:
    return f"source_{index:03d}"


class ShardWriter:
    """Appends one source's encoded documents to shards of about `shard_tokens` tokens.

    Args:
        root: the prepared directory (files are recorded relative to it).
        source_index: which source; its files go to `root/source_XXX/`.
        dtype: token dtype.
        shard_tokens: a new shard starts before a batch that would grow the current one past this.
    """

    def __init__(self, root: Path, source_index: int, dtype: np.dtype, shard_tokens: int):
        self.root = root
        self.dir = root / source_dir(source_index)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.shard_tokens = shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.num_docs = 0
        self.num_tokens = 0
        self._file: Any = None
        self._shard_count = 0
        self._offsets = _HashedFile(self.dir / "doc_offsets.bin")
        self._offsets.write(np.zeros(1, "<i8"))

    def append(self, tokens: np.ndarray, doc_lengths: np.ndarray) -> None:
        """Append documents (`tokens` as `encode_documents` returns them) to the current shard."""
        if len(tokens) == 0:
            return
        if self._file is not None and self._shard_count + len(tokens) > self.shard_tokens:
            self._finish_shard()
        if self._file is None:
            self._file = _HashedFile(self.dir / f"tokens_{len(self.shards):05d}.bin")
            self._shard_count = 0
        self._file.write(tokens.astype(self.dtype, copy=False))
        self._offsets.write(self.num_tokens + np.cumsum(doc_lengths, dtype="<i8"))
        self._shard_count += len(tokens)
        self.num_tokens += len(tokens)
        self.num_docs += len(doc_lengths)

    def close(self) -> dict[str, Any]:
        """Finish the files; returns this source's entry of `index.json`."""
        if self._file is not None:
            self._finish_shard()
        return {
            "num_docs": self.num_docs,
            "num_tokens": self.num_tokens,
            "doc_offsets": self._offsets.close(self.root),
            "shards": self.shards,
        }

    def _finish_shard(self) -> None:
        entry = self._file.close(self.root)
        entry["num_tokens"] = self._shard_count
        self.shards.append(entry)
        self._file = None


class _HashedFile:
    """A binary file written sequentially while its sha256 is computed."""

    def __init__(self, path: Path):
        self.path = path
        self._f = open(path, "wb")  # noqa: SIM115 (closed in close())
        self._hash = hashlib.sha256()
        self._bytes = 0

    def write(self, array: np.ndarray) -> None:
        data = np.ascontiguousarray(array).view(np.uint8)
        self._f.write(data.data)
        self._hash.update(data.data)
        self._bytes += data.nbytes

    def close(self, root: Path) -> dict[str, Any]:
        self._f.close()
        return {
            "file": self.path.relative_to(root).as_posix(),
            "bytes": self._bytes,
            "sha256": self._hash.hexdigest(),
        }


class ShardedTokens:
    """A token store over memory-mapped shards (see `data.token_store.TokenStore`)."""

    def __init__(self, shards: Sequence[np.ndarray], doc_offsets: np.ndarray):
        self._shards = shards
        self._ends = np.cumsum([len(s) for s in shards], dtype=np.int64)
        self._doc_offsets = doc_offsets

    @property
    def num_tokens(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    @property
    def doc_offsets(self) -> np.ndarray:
        return self._doc_offsets

    def read(self, start: int, stop: int) -> np.ndarray:
        i = int(np.searchsorted(self._ends, start, side="right"))
        shard_start = int(self._ends[i - 1]) if i else 0
        if stop <= self._ends[i]:
            return self._shards[i][start - shard_start : stop - shard_start]
        pieces = []
        while start < stop:
            end = min(stop, int(self._ends[i]))
            pieces.append(self._shards[i][start - shard_start : end - shard_start])
            start, shard_start, i = end, int(self._ends[i]), i + 1
        return np.concatenate(pieces)


def write_index(root: Path, index: dict[str, Any]) -> None:
    """Write `index.json` (last, so its presence means the shards are complete)."""
    (root / INDEX).write_text(json.dumps(index, indent=1) + "\n")


def read_index(root: Path) -> dict[str, Any]:
    """Parse and sanity-check `index.json`.

    Raises:
        FileNotFoundError: no such directory or no index in it.
        ValueError: an index that is not valid JSON of this format and version.
    """
    path = root / INDEX
    if not root.is_dir():
        raise FileNotFoundError(f"data.prepared_dir: no such directory: {root}")
    if not path.is_file():
        raise FileNotFoundError(
            f"data.prepared_dir: {path} is missing; prepare it with `python -m data.prepare`"
        )
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is corrupt (not JSON): {e}") from e
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} index")
    if index.get("version") != VERSION:
        raise ValueError(f"{path} has format version {index.get('version')}; this code reads {VERSION}")
    return index


def open_source(root: Path, entry: dict[str, Any], dtype: np.dtype, verify: bool) -> ShardedTokens:
    """Map one source's shards, checking sizes always and hashes when `verify`.

    Raises:
        FileNotFoundError: a missing shard or offsets file (named).
        ValueError: a truncated, over-long or corrupt file (named).
    """
    num_docs, num_tokens = int(entry["num_docs"]), int(entry["num_tokens"])
    offsets_path = _checked(root, entry["doc_offsets"], (num_docs + 1) * 8, verify)
    doc_offsets = np.memmap(offsets_path, dtype="<i8", mode="r")
    if doc_offsets[0] != 0 or doc_offsets[-1] != num_tokens:
        raise ValueError(
            f"{offsets_path} is corrupt: offsets run {doc_offsets[0]}..{doc_offsets[-1]}, not 0..{num_tokens}"
        )
    shards = []
    for shard in entry["shards"]:
        path = _checked(root, shard, int(shard["num_tokens"]) * dtype.itemsize, verify)
        shards.append(np.memmap(path, dtype=dtype, mode="r"))
    if sum(len(s) for s in shards) != num_tokens:
        raise ValueError(
            f"{root / INDEX} is inconsistent: its shards do not add up to num_tokens={num_tokens}"
        )
    return ShardedTokens(shards, doc_offsets)


def _checked(root: Path, entry: dict[str, Any], expected_bytes: int, verify: bool) -> Path:
    path = root / entry["file"]
    if not path.is_file():
        raise FileNotFoundError(f"prepared shard {path} is missing")
    size = path.stat().st_size
    if size != expected_bytes or size != entry["bytes"]:
        state = "truncated" if size < expected_bytes else "longer than recorded"
        raise ValueError(f"prepared shard {path} is {state}: {size} bytes, {INDEX} says {expected_bytes}")
    if verify:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                h.update(chunk)
        if h.hexdigest() != entry["sha256"]:
            raise ValueError(f"prepared shard {path} is corrupt: its sha256 differs from the one in {INDEX}")
    return path
