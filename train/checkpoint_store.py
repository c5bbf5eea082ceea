"""The tensors of a checkpoint on disk (format 2): equal shares written by every rank, read back by one.

    <checkpoint>/shards/dense-r00003-000.safetensors     rank 3's share of the dense state
    <checkpoint>/shards/experts-r00003-000.safetensors   rank 3's share of its expert-parallel rank's experts
    <checkpoint>/index.json                              logical tensors (shape) and each file's segments

Design choices:
- A *logical tensor* is one parameter's state of one kind (`<param>::fp32`, `::exp_avg`,
  `::exp_avg_sq`) or one routed expert's (`<param>.<global expert id>::<kind>`), flattened. Files
  hold *segments* `<logical>@<start>`: elements [start, stop) of it. Nothing in the layout depends
  on the world size, ZeRO stage or ep_size that wrote it, so any of them reads it back.
- Shares: the logical tensors of a process group, in a fixed order, form one virtual flat stream of
  N elements; member i of G writes elements [i*N/G, (i+1)*N/G). Shares are equal to one element,
  whatever the tensor sizes, and a tensor is cut at most G-1 times. Dense tensors are shared by all
  ranks, experts by the expert-data-parallel group that holds them.
- A background thread serialises, hashes (sha256) and writes each file, then fsyncs it, while the
  next parameter is gathered; a file is at most `SHARD_BYTES`.
- Reading for training: every file a group needs is read whole by one member (greedy by bytes),
  and its sha256 is checked against meta.json; a member contributes the segments it read and a sum
  over the group (one all-reduce per parameter and kind) gives every member the full tensor. Reading
  for export: segments are sliced lazily from the memory-mapped files, one parameter at a time.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

FORMAT = "finemoe-checkpoint"
VERSION = 2
INDEX = "index.json"
SHARDS = "shards"
SHARD_BYTES = 512 * 1024**2
"""Largest file one rank writes; also the most host memory a reader holds per file it reads."""
_CHUNK = 64 * 1024**2  # bytes per write() and hash update


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: missing, truncated or corrupt files, or missing tensors."""


def segment_key(logical: str, start: int) -> str:
    return f"{logical}@{start}"


class SharePlan:
    """Which elements of each logical tensor one member of a group writes.

    Args:
        sizes: (logical key, number of elements) in the group's fixed order.
        member, members: this rank's index in the group, and the group's size.
    """

    def __init__(self, sizes: Sequence[tuple[str, int]], member: int, members: int):
        total = sum(n for _, n in sizes)
        lo, hi = member * total // members, (member + 1) * total // members
        self.ranges: dict[str, tuple[int, int]] = {}
        offset = 0
        for key, n in sizes:
            a, b = max(lo, offset), min(hi, offset + n)
            if a < b:
                self.ranges[key] = (a - offset, b - offset)
            offset += n
        self.num_elements = hi - lo

    def get(self, key: str) -> tuple[int, int] | None:
        """[start, stop) of `key` that this member writes, or None."""
        return self.ranges.get(key)


def write_file(path: Path, data: bytes | memoryview, fail_half_way: bool = False) -> str:
    """Write `data` to a new file and fsync it; returns its sha256 (computed in the same pass).

    `fail_half_way` (tests) writes half of it, then fails as a full disk does (ENOSPC).
    """
    view = memoryview(data)
    end = len(view) // 2 if fail_half_way else len(view)
    digest = hashlib.sha256()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        for at in range(0, end, _CHUNK):
            chunk = view[at : min(at + _CHUNK, end)]
            digest.update(chunk)
            while chunk:
                chunk = chunk[os.write(fd, chunk) :]
        if fail_half_way:
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (simulated)", str(path))
        os.fsync(fd)
    finally:
        os.close(fd)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (created, renamed files) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class SegmentWriter:
    """One rank's segments of one group, into `<root>/shards/<prefix>-r<rank>-<i>.safetensors`.

    `add()` takes host tensors; full files are serialised and written by a background thread (one
    file in flight, one being filled). Errors of the thread are raised by the next `add()` or by
    `close()`. `files` maps each written file (relative to `root`) to its bytes, sha256 and segments.
    """

    def __init__(
        self, root: Path, prefix: str, rank: int, shard_bytes: int = SHARD_BYTES, fail: bool = False
    ):
        self.root = root
        self.prefix = f"{prefix}-r{rank:05d}"
        self.shard_bytes = shard_bytes
        self.files: dict[str, dict[str, Any]] = {}
        self.shapes: dict[str, list[int]] = {}
        self.bytes_written = 0
        self._fail = fail  # tests: the first file write fails half-way with ENOSPC
        self._pending: dict[str, torch.Tensor] = {}
        self._segments: list[list[Any]] = []
        self._pending_bytes = 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ckpt-writer")
        self._inflight: Future[None] | None = None

    def add(self, logical: str, shape: Sequence[int], start: int, segment: torch.Tensor) -> None:
        """Queue elements [start, start + numel) of a logical tensor of `shape` (a 1-D host tensor)."""
        nbytes = segment.numel() * segment.element_size()
        if self._pending and self._pending_bytes + nbytes > self.shard_bytes:
            self._flush()
        self._pending[segment_key(logical, start)] = segment
        self._segments.append([logical, start, start + segment.numel()])
        self.shapes[logical] = list(shape)
        self._pending_bytes += nbytes

    def close(self) -> dict[str, dict[str, Any]]:
        """Write what is left and wait for the thread; returns `files`."""
        try:
            self._flush()
            self._wait()
        finally:
            self._pool.shutdown(wait=True)
        return self.files

    def abandon(self) -> None:
        """Stop without raising (after an error elsewhere): wait for the thread, drop the rest."""
        self._pending.clear()
        with contextlib.suppress(Exception):  # the caller reports the first error
            self._wait()
        self._pool.shutdown(wait=True)

    def _flush(self) -> None:
        if not self._pending:
            return
        self._wait()  # raises the previous file's error, if any
        rel = f"{SHARDS}/{self.prefix}-{len(self.files):03d}.safetensors"
        tensors, segments = self._pending, self._segments
        self.files[rel] = {"segments": segments}
        self._pending, self._segments, self._pending_bytes = {}, [], 0
        self._inflight = self._pool.submit(self._write, rel, tensors)

    def _write(self, rel: str, tensors: dict[str, torch.Tensor]) -> None:
        data = save_bytes(tensors)
        sha = write_file(self.root / rel, data, fail_half_way=self._fail)
        self.files[rel].update(bytes=len(data), sha256=sha)
        self.bytes_written += len(data)

    def _wait(self) -> None:
        if self._inflight is not None:
            future, self._inflight = self._inflight, None
            future.result()


def merge_manifests(manifests: Iterable[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Per-rank manifests -> (index.json content, {file: {bytes, sha256}})."""
    tensors: dict[str, dict[str, Any]] = {}
    files: dict[str, list[list[Any]]] = {}
    sizes: dict[str, dict[str, Any]] = {}
    for m in manifests:
        for key, shape in m["shapes"].items():
            tensors[key] = {"shape": shape}
        for rel, entry in m["files"].items():
            if "segments" in entry:
                files[rel] = entry["segments"]
            sizes[rel] = {"bytes": entry["bytes"], "sha256": entry["sha256"]}
    index = {"format": FORMAT, "version": VERSION, "tensors": dict(sorted(tensors.items())), "files": files}
    return index, sizes


def read_index(ckpt: Path) -> dict[str, Any]:
    path = ckpt / INDEX
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {ckpt}: {INDEX} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {ckpt}: {INDEX} is corrupt ({e})") from None
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {ckpt}: {INDEX} is not a {FORMAT} index of version {VERSION}")
    return index


def _segments_by_key(index: dict[str, Any]) -> dict[str, list[tuple[int, int, str]]]:
    by_key: dict[str, list[tuple[int, int, str]]] = {}
    for rel, segments in index["files"].items():
        for key, start, stop in segments:
            by_key.setdefault(key, []).append((int(start), int(stop), rel))
    for segs in by_key.values():
        segs.sort()
    return by_key


def _tiles(segs: list[tuple[int, int, str]], numel: int) -> bool:
    at = 0
    for start, stop, _ in segs:
        if start != at:
            return False
        at = stop
    return at == numel


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


class IndexedTensors:
    """Lazy access to the logical tensors of a format-2 checkpoint (export, inspection)."""

    def __init__(self, ckpt: Path):
        self.ckpt = ckpt
        self.index = read_index(ckpt)
        self.shapes = {k: tuple(v["shape"]) for k, v in self.index["tensors"].items()}
        self._segments = _segments_by_key(self.index)
        self._handles: dict[str, Any] = {}

    def __contains__(self, key: str) -> bool:
        """True if every element of `key` is stored."""
        segs = self._segments.get(key)
        return key in self.shapes and segs is not None and _tiles(segs, _numel(self.shapes[key]))

    def get(self, key: str) -> torch.Tensor:
        if key not in self:
            raise CheckpointError(f"checkpoint {self.ckpt}: tensor {key!r} is missing or incomplete")
        shape = self.shapes[key]
        out = torch.empty(_numel(shape), dtype=torch.float32)
        for start, stop, rel in self._segments[key]:
            out[start:stop] = self._open(rel).get_tensor(segment_key(key, start))
        return out.view(shape)

    def _open(self, rel: str) -> Any:
        if rel not in self._handles:
            try:
                self._handles[rel] = safe_open(self.ckpt / rel, framework="pt")
            except Exception as e:  # safetensors raises its own types for bad headers
                raise CheckpointError(f"{self.ckpt / rel}: cannot be read as safetensors ({e})") from None
        return self._handles[rel]


class GroupReader:
    """The segments that one member of a group contributes when the group restores its tensors.

    Every file holding a segment of a `needed` tensor is assigned to one member (greedy by bytes,
    the same on every member); the member reads it whole, checks its size and sha256, and hands out
    its segments. A file is released once its needed segments have all been taken.

    Args:
        ckpt: the checkpoint directory.
        index: its index.json.
        files: meta.json's {file: {bytes, sha256}}.
        needed: logical keys the group restores.
        member, members: this rank's place in the group.
    """

    def __init__(
        self,
        ckpt: Path,
        index: dict[str, Any],
        files: dict[str, dict[str, Any]],
        needed: Iterable[str],
        member: int,
        members: int,
    ):
        self.ckpt = ckpt
        self.files = files
        needed = set(needed)
        self.shapes = {k: tuple(v["shape"]) for k, v in index["tensors"].items()}
        by_key = _segments_by_key(index)
        self._incomplete = {
            k for k in needed if k in by_key and not _tiles(by_key[k], _numel(self.shapes[k]))
        }
        wanted = sorted(
            {rel for k in needed for _, _, rel in by_key.get(k, ())},
            key=lambda rel: (-int(files.get(rel, {}).get("bytes", 0)), rel),
        )
        load = [0] * members
        mine: set[str] = set()
        for rel in wanted:
            i = min(range(members), key=lambda j: (load[j], j))
            load[i] += int(files.get(rel, {}).get("bytes", 0))
            if i == member:
                mine.add(rel)
        self.present = {k for k in needed if k in by_key}
        self._mine: dict[str, list[tuple[int, int, str]]] = {}
        self._left: dict[str, int] = {}
        for k in needed:
            for seg in by_key.get(k, ()):
                if seg[2] in mine:
                    self._mine.setdefault(k, []).append(seg)
                    self._left[seg[2]] = self._left.get(seg[2], 0) + 1
        self._loaded: dict[str, dict[str, torch.Tensor]] = {}
        self.bytes_read = 0

    def check(self, key: str) -> None:
        if key in self._incomplete:
            raise CheckpointError(f"checkpoint {self.ckpt}: the segments of {key!r} do not cover it")

    def segments(self, key: str) -> list[tuple[int, torch.Tensor]]:
        """(start, 1-D tensor) of the segments of `key` that this member contributes."""
        self.check(key)
        out = []
        for start, _, rel in self._mine.pop(key, ()):
            out.append((start, self._file(rel)[segment_key(key, start)]))
            self._left[rel] -= 1
            if not self._left[rel]:
                del self._loaded[rel]
        return out

    def _file(self, rel: str) -> dict[str, torch.Tensor]:
        if rel not in self._loaded:
            path = self.ckpt / rel
            expected = self.files.get(rel)
            if expected is None:
                raise CheckpointError(f"checkpoint {self.ckpt}: {rel} is not listed in meta.json")
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                raise CheckpointError(f"checkpoint {self.ckpt}: {rel} is missing") from None
            if len(data) != expected["bytes"]:
                raise CheckpointError(
                    f"checkpoint {self.ckpt}: {rel} is {len(data)} bytes, meta.json records {expected['bytes']}"
                )
            if hashlib.sha256(data).hexdigest() != expected["sha256"]:
                raise CheckpointError(
                    f"checkpoint {self.ckpt}: {rel} is corrupt (its sha256 differs from meta.json's)"
                )
            self.bytes_read += len(data)
            self._loaded[rel] = load_bytes(data)
        return self._loaded[rel]


def hash_problem(ckpt: Path, files: dict[str, dict[str, Any]], threads: int = 8) -> str | None:
    """The first file of meta.json's list (in its order) that is missing, of another size, unreadable,
    or whose sha256 differs; reads every file whole (`threads` at a time: hashlib releases the GIL) and
    stops at the first bad one. At most `threads` files are in flight: a file is queued only when the
    oldest one has checked out, so at most `threads - 1` files after the bad one are read."""
    problem = size_problem(ckpt, files)
    if problem is not None:
        return problem
    todo = iter(files.items())
    window: deque[tuple[str, dict[str, Any], Future[str]]] = deque()
    pool = ThreadPoolExecutor(max(1, min(threads, len(files))))

    def queue_next() -> None:
        item = next(todo, None)
        if item is not None:
            window.append((item[0], item[1], pool.submit(sha256_file, ckpt / item[0])))

    try:
        for _ in range(max(1, threads)):
            queue_next()
        while window:
            rel, entry, digest = window.popleft()
            try:
                got = digest.result()
            except OSError as e:
                return f"{rel} cannot be read ({e})"
            if got != entry["sha256"]:
                return f"{rel} is corrupt (its sha256 differs from meta.json's)"
            queue_next()
        return None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def size_problem(ckpt: Path, files: dict[str, dict[str, Any]]) -> str | None:
    """The first file of meta.json's list that is missing or of another size (a cheap check: stat only)."""
    for rel, entry in files.items():
        try:
            size = (ckpt / rel).stat().st_size
        except FileNotFoundError:
            return f"{rel} is missing"
        if size != entry["bytes"]:
            return f"{rel} is {size} bytes, meta.json records {entry['bytes']}"
    return None
