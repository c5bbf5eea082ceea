"""The prepared format: token shards plus an index, written by `data.prepare`, read through a bounded
cache of file handles.

    <prepared_dir>/index.json                          dtype, EOS, tokenizer, eval_fraction, sources, files
    <prepared_dir>/source_000/train/tokens_00000.bin   raw little-endian uint16 (vocab <= 65536) or uint32
    <prepared_dir>/source_000/train/doc_offsets.bin    raw int64 [num_docs + 1]: document d is tokens
                                                       [offsets[d], offsets[d + 1]) of the split
    <prepared_dir>/source_000/eval/...                 the held-out documents, the same way
    <prepared_dir>/verified.json                       the stamp: every file's size and mtime when its
                                                       sha256 was last checked

Design choices:
- Raw arrays, not .npy: a shard is appended to as workers deliver, with nothing to patch afterwards,
  and an interrupted `data.prepare` resumes by truncating to its last recorded lengths.
- Integrity is checked in two tiers. Sizes, always, at every open (a stat per file). Hashes once:
  `data.prepare` records each file's sha256 and writes the stamp. Where no valid stamp is found (the
  directory was copied, a file was rewritten), a single process hashes every file (under a lock
  against other jobs, where the file system has flock) and writes the stamp: in the directory, or,
  when it is read-only, under `<cache_dir>/verified/`. The ranks of a data-parallel job each hash
  their 1/world share instead, at the same time (no rank waits in a collective for another's hours of
  hashing, and a 10 TB corpus is read once, not once per rank); they write no stamp, since no rank
  knows the others' results (`DataConfig.verify_shards`).
- Shards are read with `os.pread` through one `FileHandles` per prepared directory and process,
  shared by every loader (train and eval): at most `max_open` descriptors, least recently used
  closed first, whatever the number of shards. Nothing is memory-mapped.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import sys
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "finemoe-prepared"
VERSION = 2
INDEX = "index.json"
STAMP = "verified.json"
SPLITS = ("train", "eval")
_HASH_CHUNK = 1 << 24  # bytes


def source_dir(index: int, split: str) -> str:
    return f"source_{index:03d}/{split}"


class ShardWriter:
    """Appends one source split's encoded documents to shards of about `shard_tokens` tokens.

    Args:
        root: the prepared directory (files are recorded relative to it).
        source_index, split: which source and split; files go to `root/source_XXX/<split>/`.
        dtype: token dtype.
        shard_tokens: a new shard starts before a batch that would grow the current one past this.
        state: `state()` of an interrupted writer: its files are truncated to what it recorded and
            writing continues from there (files it started afterwards are removed).
    """

    def __init__(
        self,
        root: Path,
        source_index: int,
        split: str,
        dtype: np.dtype,
        shard_tokens: int,
        state: dict[str, Any] | None = None,
    ):
        self.root = root
        self.dir = root / source_dir(source_index, split)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.shard_tokens = shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.num_docs = 0
        self.num_tokens = 0
        self._file: _HashedFile | None = None
        self._shard_count = 0
        offsets = self.dir / "doc_offsets.bin"
        if state is None:
            for stale in self.dir.glob("tokens_*.bin"):
                stale.unlink()
            self._offsets = _HashedFile(offsets)
            self._offsets.write(np.zeros(1, "<i8"))
            return
        self.shards = list(state["shards"])
        self.num_docs, self.num_tokens = int(state["num_docs"]), int(state["num_tokens"])
        self._offsets = _HashedFile(offsets, keep=int(state["offsets_bytes"]))
        current = state["current"]
        if current is not None:
            self._file = _HashedFile(root / current["file"], keep=int(current["bytes"]))
            self._shard_count = int(current["tokens"])
        started = len(self.shards) + (current is not None)
        for stale in self.dir.glob("tokens_*.bin"):
            if int(stale.stem.split("_")[1]) >= started:
                stale.unlink()

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

    def state(self) -> dict[str, Any]:
        """Flush and fsync the open files; returns what a resumed writer needs (JSON)."""
        current = None
        if self._file is not None:
            current = {
                "file": self._file.path.relative_to(self.root).as_posix(),
                "bytes": self._file.sync(),
                "tokens": self._shard_count,
            }
        return {
            "shards": self.shards,
            "current": current,
            "num_docs": self.num_docs,
            "num_tokens": self.num_tokens,
            "offsets_bytes": self._offsets.sync(),
        }

    def close(self) -> dict[str, Any]:
        """Finish the files; returns this split's entry of `index.json`."""
        if self._file is not None:
            self._finish_shard()
        return {
            "num_docs": self.num_docs,
            "num_tokens": self.num_tokens,
            "doc_offsets": self._offsets.close(self.root),
            "shards": self.shards,
        }

    def _finish_shard(self) -> None:
        assert self._file is not None
        entry = self._file.close(self.root)
        entry["num_tokens"] = self._shard_count
        self.shards.append(entry)
        self._file = None


class _HashedFile:
    """A binary file written sequentially while its sha256 is computed. With `keep`, an existing
    file is truncated to `keep` bytes, which are hashed again, and writing continues after them."""

    def __init__(self, path: Path, keep: int | None = None):
        self.path = path
        self._hash = hashlib.sha256()
        self._f: Any
        if keep is None:
            self._f = open(path, "wb")  # noqa: SIM115 (closed in close())
            self._bytes = 0
            return
        self._f = open(path, "r+b")  # noqa: SIM115
        self._f.truncate(keep)
        while chunk := self._f.read(min(_HASH_CHUNK, keep - self._f.tell())):
            self._hash.update(chunk)
        if self._f.tell() != keep:
            raise ValueError(f"{path} is shorter ({self._f.tell()} bytes) than its recorded {keep}")
        self._bytes = keep

    def write(self, array: np.ndarray) -> None:
        data = np.ascontiguousarray(array).view(np.uint8)
        self._f.write(data.data)
        self._hash.update(data.data)
        self._bytes += data.nbytes

    def sync(self) -> int:
        """Flush and fsync; returns the bytes written so far."""
        self._f.flush()
        os.fsync(self._f.fileno())
        return self._bytes

    def close(self, root: Path) -> dict[str, Any]:
        self.sync()
        self._f.close()
        return {
            "file": self.path.relative_to(root).as_posix(),
            "bytes": self._bytes,
            "sha256": self._hash.hexdigest(),
        }


# ---- reading -------------------------------------------------------------------------------------


class FileHandles:
    """At most `max_open` read-only descriptors, least recently used closed first; thread-safe.

    A descriptor in use by a read is never closed under it (the bound may be exceeded for as long as
    more threads than `max_open` read at once).
    """

    def __init__(self, max_open: int):
        self.max_open = max_open
        self.opens = 0
        self._fds: OrderedDict[str, list[int]] = OrderedDict()  # path -> [fd, readers]
        self._lock = threading.Lock()

    def pread(self, path: str, nbytes: int, offset: int) -> bytes:
        """`nbytes` from `offset` of `path` (a short read is an error: the file shrank)."""
        entry = self._acquire(path)
        try:
            data = os.pread(entry[0], nbytes, offset)
            while len(data) < nbytes:
                more = os.pread(entry[0], nbytes - len(data), offset + len(data))
                if not more:
                    raise ValueError(f"prepared shard {path} is truncated: no bytes at {offset + len(data)}")
                data += more
            return data
        finally:
            self._release(entry)

    @property
    def num_open(self) -> int:
        return len(self._fds)

    def close(self) -> None:
        with self._lock:
            for fd, _ in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def _acquire(self, path: str) -> list[int]:
        with self._lock:
            entry = self._fds.get(path)
            if entry is None:
                entry = [os.open(path, os.O_RDONLY), 0]
                self._fds[path] = entry
                self.opens += 1
            else:
                self._fds.move_to_end(path)
            entry[1] += 1
            self._evict()
            return entry

    def _release(self, entry: list[int]) -> None:
        with self._lock:
            entry[1] -= 1
            self._evict()

    def _evict(self) -> None:
        excess = len(self._fds) - self.max_open
        for path in [p for p, (_, users) in self._fds.items() if users == 0][: max(excess, 0)]:
            os.close(self._fds.pop(path)[0])


class ShardedTokens:
    """A token store over one split's shards (see `data.token_store.TokenStore`), read with pread."""

    def __init__(
        self, prepared: PreparedDir, files: list[str], counts: list[int], dtype: np.dtype, offsets: str
    ):
        self._prepared = prepared  # keeps the shared handle cache alive while a loader reads
        self._files = files
        self._dtype = dtype
        self._ends = np.cumsum(counts, dtype=np.int64)
        self._offsets_file = offsets

    @property
    def num_tokens(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    @property
    def doc_offsets(self) -> np.ndarray:
        """Read on demand (not kept: 8 bytes per document)."""
        return np.fromfile(self._offsets_file, dtype="<i8")

    def read(self, start: int, stop: int) -> np.ndarray:
        pieces = []
        i = int(np.searchsorted(self._ends, start, side="right"))
        while start < stop:
            shard_start = int(self._ends[i - 1]) if i else 0
            end = min(stop, int(self._ends[i]))
            data = self._prepared.handles.pread(
                self._files[i],
                (end - start) * self._dtype.itemsize,
                (start - shard_start) * self._dtype.itemsize,
            )
            pieces.append(np.frombuffer(data, dtype=self._dtype))
            start, i = end, i + 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


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
        raise ValueError(
            f"{path} has format version {index.get('version')}; this code reads {VERSION}: prepare it again "
            "(version 2 holds out documents by a hash of their text and encodes special-token text as text)"
        )
    return index


def index_files(index: dict[str, Any]) -> Iterator[tuple[dict[str, Any], int]]:
    """Every file entry of an index with its expected size in bytes."""
    itemsize = np.dtype(index["dtype"]).itemsize
    for source in index["sources"]:
        for split in source["splits"].values():
            yield split["doc_offsets"], (int(split["num_docs"]) + 1) * 8
            for shard in split["shards"]:
                yield shard, int(shard["num_tokens"]) * itemsize


def check_sizes(root: Path, index: dict[str, Any]) -> dict[str, list[int]]:
    """Every file exists with the size the index records (a stat per file). Returns each file's
    `[size, mtime_ns]`, what a stamp records.

    Raises:
        FileNotFoundError: a missing file (named).
        ValueError: a truncated or over-long file (named).
    """
    stats = {}
    for entry, expected in index_files(index):
        path = root / entry["file"]
        try:
            st = path.stat()
        except FileNotFoundError:
            raise FileNotFoundError(f"prepared shard {path} is missing") from None
        if st.st_size != expected or st.st_size != entry["bytes"]:
            state = "truncated" if st.st_size < expected else "longer than recorded"
            raise ValueError(f"prepared shard {path} is {state}: {st.st_size} bytes, {INDEX} says {expected}")
        stats[entry["file"]] = [st.st_size, st.st_mtime_ns]
    return stats


def _stamp_content(root: Path, stats: dict[str, list[int]] | None = None) -> dict[str, Any]:
    """The index's hash and every file's `[size, mtime_ns]` (`stats` from `check_sizes`, or its
    check now: a missing or wrongly sized file raises)."""
    index_bytes = (root / INDEX).read_bytes()
    if stats is None:
        stats = check_sizes(root, json.loads(index_bytes))
    return {"index_sha256": hashlib.sha256(index_bytes).hexdigest(), "files": stats}


def stamp_paths(root: Path, fallback_dir: Path | None = None) -> list[Path]:
    """Where a stamp of `root` may be: in it, then (for a read-only directory) under `fallback_dir`,
    named by a hash of the directory's resolved path."""
    paths = [root / STAMP]
    if fallback_dir is not None:
        key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
        paths.append(fallback_dir / "verified" / f"{key}.json")
    return paths


def write_stamp(root: Path, fallback_dir: Path | None = None) -> Path | None:
    """Record that every file of `root` matches its hash as of now: in `root`, or under `fallback_dir`
    when `root` is read-only. Returns where, or None when neither could be written."""
    text = json.dumps(_stamp_content(root)) + "\n"
    for path in stamp_paths(root, fallback_dir):
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(text)
            os.replace(tmp, path)
        except OSError:
            continue
        return path
    return None


def stamp_valid(
    root: Path, fallback_dir: Path | None = None, stats: dict[str, list[int]] | None = None
) -> bool:
    """True if a stamp matches the index and every file's size and mtime (`stats` from `check_sizes`,
    or a stat per file now)."""
    try:
        current = _stamp_content(root, stats)
    except (OSError, ValueError):
        return False
    for path in stamp_paths(root, fallback_dir):
        try:
            if json.loads(path.read_text()) == current:
                return True
        except (OSError, ValueError):
            continue
    return False


def verify_hashes(root: Path, index: dict[str, Any], share: tuple[int, int] = (0, 1)) -> None:
    """Hash the files of `share` = (rank, world) (every world-th file of the index, from rank) and
    compare with the index.

    Raises:
        ValueError: a corrupt file (named).
    """
    rank, world = share
    for entry, _ in list(index_files(index))[rank::world]:
        path = root / entry["file"]
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                h.update(chunk)
        if h.hexdigest() != entry["sha256"]:
            raise ValueError(f"prepared shard {path} is corrupt: its sha256 differs from the one in {INDEX}")


@contextlib.contextmanager
def _verify_lock(root: Path) -> Iterator[None]:
    """An exclusive lock on `root/.verify.lock`, against another job hashing the same directory. None
    where `root` is read-only or the file system has no flock (Lustre `noflock`: ENOSYS)."""
    try:
        f = open(root / ".verify.lock", "a")  # noqa: SIM115
    except OSError:
        yield
        return
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class PreparedDir:
    """One prepared directory as this process reads it: the index, checked once, and the handle cache
    that every loader of the directory shares. Get it with `open_prepared`."""

    def __init__(self, root: Path, max_open: int):
        self.root = root
        self.index = read_index(root)
        self.stats = check_sizes(root, self.index)
        self.handles = FileHandles(max_open)
        self.verified = False
        """This process has done its part of the hash check (`verify`)."""
        self.dtype = np.dtype(self.index["dtype"])

    def verify(self, share: tuple[int, int] = (0, 1), fallback_dir: Path | None = None) -> None:
        """Check the hashes unless a valid stamp says they were checked. One process (`share` (0, 1))
        hashes every file and stamps (under `fallback_dir` if the directory is read-only); rank r of a
        data-parallel world w (`share` (r, w)) hashes its share only, and stamps nothing.

        Raises:
            ValueError: a corrupt file (named).
        """
        if self.verified or stamp_valid(self.root, fallback_dir, self.stats):
            self.verified = True
            return
        if share[1] > 1:
            verify_hashes(self.root, self.index, share)
        else:
            with _verify_lock(self.root):
                if not stamp_valid(self.root, fallback_dir):  # another job may have stamped it meanwhile
                    verify_hashes(self.root, self.index)
                    if write_stamp(self.root, fallback_dir) is None:
                        print(
                            f"warning: could not stamp {self.root} (read-only) nor under {fallback_dir}: its "
                            "shards will be hashed again at the next start",
                            file=sys.stderr,
                        )
        self.verified = True

    def store(self, source: int, split: str) -> ShardedTokens:
        entry = self.index["sources"][source]["splits"][split]
        offsets = str(self.root / entry["doc_offsets"]["file"])
        num_docs, num_tokens = int(entry["num_docs"]), int(entry["num_tokens"])
        ends = np.fromfile(offsets, dtype="<i8", count=1), self._last_offset(offsets, num_docs)
        if ends[0][0] != 0 or ends[1] != num_tokens:
            raise ValueError(
                f"{offsets} is corrupt: offsets run {ends[0][0]}..{ends[1]}, not 0..{num_tokens}"
            )
        files = [str(self.root / s["file"]) for s in entry["shards"]]
        counts = [int(s["num_tokens"]) for s in entry["shards"]]
        if sum(counts) != num_tokens:
            raise ValueError(
                f"{self.root / INDEX} is inconsistent: the {split} shards of source {source} do not add up "
                f"to num_tokens={num_tokens}"
            )
        return ShardedTokens(self, files, counts, self.dtype, offsets)

    def _last_offset(self, path: str, num_docs: int) -> int:
        return int(np.frombuffer(self.handles.pread(path, 8, num_docs * 8), dtype="<i8")[0])

    def __del__(self) -> None:
        handles = getattr(self, "handles", None)
        if handles is not None:
            handles.close()


# One PreparedDir per directory and process, alive while some loader uses it: the train and eval
# loaders share its descriptors (the bound is per process, not per loader) and its hash check.
_OPEN: weakref.WeakValueDictionary[tuple[str, int], PreparedDir] = weakref.WeakValueDictionary()
_OPEN_LOCK = threading.Lock()


def open_prepared(root: Path, max_open: int = 64) -> PreparedDir:
    """The process's `PreparedDir` for `root` (sizes checked at every open). Opened again with another
    `max_open`, the shared handle cache keeps the smaller bound (the bound is per process).

    Raises:
        FileNotFoundError, ValueError: as `read_index` and `check_sizes`.
    """
    key = (str(root.resolve()), os.stat(root / INDEX).st_mtime_ns if (root / INDEX).is_file() else 0)
    with _OPEN_LOCK:
        found = _OPEN.get(key)
        if found is None:
            found = PreparedDir(root, max_open)
            _OPEN[key] = found
        else:
            check_sizes(root, found.index)  # every open checks sizes (a stat per file)
            found.handles.max_open = min(found.handles.max_open, max_open)
        return found
