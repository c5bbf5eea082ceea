"""`train.checkpoint_store` in one process: equal shares, any reader count, damage detected by name."""

from __future__ import annotations

import json

import pytest
import torch

from train import checkpoint_store as store
from train.checkpoint_store import CheckpointError, GroupReader, SegmentWriter, SharePlan

SIZES = [
    ("embed::fp32", 1000),
    ("norm::fp32", 7),
    ("attn::fp32", 333),
    ("attn::exp_avg", 333),
    ("head::fp32", 501),
]


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(n, generator=g) for k, n in SIZES}


def test_shares_are_equal_and_tile_every_tensor():
    total = sum(n for _, n in SIZES)
    for members in (1, 2, 3, 4, 7, 64):
        plans = [SharePlan(SIZES, m, members) for m in range(members)]
        shares = [p.num_elements for p in plans]
        assert sum(shares) == total and max(shares) - min(shares) <= 1, (members, shares)
        for key, n in SIZES:
            got = sorted(p.get(key) for p in plans if p.get(key) is not None)
            assert got[0][0] == 0 and got[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(got, got[1:])), (members, key, got)


def write_group(root, members: int, shard_bytes: int) -> tuple[dict, dict]:
    """What `members` ranks write for SIZES, merged as rank 0 does (index, files)."""
    (root / store.SHARDS).mkdir(parents=True)
    values = tensors()
    manifests = []
    for m in range(members):
        plan = SharePlan(SIZES, m, members)
        w = SegmentWriter(root, "dense", m, shard_bytes=shard_bytes)
        for key, _ in SIZES:
            rng = plan.get(key)
            if rng is not None:
                w.add(key, [len(values[key])], rng[0], values[key][rng[0] : rng[1]].clone())
        manifests.append({"files": w.close(), "shapes": w.shapes})
    return store.merge_manifests(manifests)


@pytest.mark.parametrize("writers,readers", [(1, 1), (3, 2), (2, 5), (4, 4)])
def test_any_number_of_readers_restores_what_any_number_of_writers_wrote(tmp_path, writers, readers):
    index, files = write_group(tmp_path, writers, shard_bytes=2000)  # several files per writer
    assert len(files) > writers
    values = tensors()
    gr = [GroupReader(tmp_path, index, files, [k for k, _ in SIZES], m, readers) for m in range(readers)]
    for key, n in SIZES:
        full = torch.zeros(n)
        for r in gr:  # the all-reduce: each segment comes from exactly one reader
            for start, seg in r.segments(key):
                full[start : start + len(seg)] += seg
        assert torch.equal(full, values[key]), key
    # each file was read once, whole, by one reader
    assert sum(r.bytes_read for r in gr) == sum(e["bytes"] for e in files.values())
    loaded = [r._loaded for r in gr]
    assert all(not d for d in loaded)  # released once consumed


def test_export_reader_slices_lazily(tmp_path):
    index, files = write_group(tmp_path, 3, shard_bytes=2000)
    (tmp_path / store.INDEX).write_text(json.dumps(index))
    reader = store.IndexedTensors(tmp_path)
    for key, value in tensors().items():
        assert key in reader and torch.equal(reader.get(key), value)
    assert "missing::fp32" not in reader


def test_corrupt_truncated_and_missing_files_are_named(tmp_path):
    index, files = write_group(tmp_path, 2, shard_bytes=10**9)
    victim = sorted(files)[0]
    path = tmp_path / victim
    data = bytearray(path.read_bytes())
    assert store.size_problem(tmp_path, files) is None

    data[-3] ^= 0xFF  # same size: only the hash sees it
    path.write_bytes(bytes(data))
    assert store.size_problem(tmp_path, files) is None
    reader = GroupReader(tmp_path, index, files, [k for k, _ in SIZES], 0, 1)
    with pytest.raises(CheckpointError, match=rf"{victim} is corrupt \(its sha256 differs"):
        for key, _ in SIZES:
            reader.segments(key)

    path.write_bytes(bytes(data[:-10]))
    assert (
        store.size_problem(tmp_path, files)
        == f"{victim} is {len(data) - 10} bytes, meta.json records {len(data)}"
    )
    path.unlink()
    assert store.size_problem(tmp_path, files) == f"{victim} is missing"


def test_a_lost_segment_is_refused(tmp_path):
    index, files = write_group(tmp_path, 2, shard_bytes=10**9)
    dropped = sorted(index["files"])[1]
    del index["files"][dropped]
    reader = GroupReader(tmp_path, index, files, [k for k, _ in SIZES], 0, 1)
    with pytest.raises(CheckpointError, match="do not cover it"):
        for key, _ in SIZES:
            reader.segments(key)


def test_a_failed_write_raises_and_leaves_no_reader_confused(tmp_path):
    """The writer thread's error (here a simulated full disk) reaches the caller."""
    (tmp_path / store.SHARDS).mkdir()
    w = SegmentWriter(tmp_path, "dense", 0, shard_bytes=10**9, fail=True)
    w.add("embed::fp32", [4096], 0, torch.zeros(4096))
    with pytest.raises(OSError, match="No space left on device"):
        w.close()


def test_hash_check_names_the_first_bad_file_and_stops_there(tmp_path, monkeypatch):
    """`hash_problem` (export's check): a corrupt file is named and the files after it are not read; an
    unreadable file is a named problem, not an exception."""
    files = {}
    for i in range(6):
        rel = f"f{i}.bin"
        data = bytes([i]) * 1000
        files[rel] = {"bytes": len(data), "sha256": store.write_file(tmp_path / rel, data)}
    assert store.hash_problem(tmp_path, files) is None

    (tmp_path / "f1.bin").write_bytes(b"\x09" * 1000)
    hashed = []
    real = store.sha256_file
    monkeypatch.setattr(store, "sha256_file", lambda p: hashed.append(p.name) or real(p))
    assert (
        store.hash_problem(tmp_path, files, threads=1)
        == "f1.bin is corrupt (its sha256 differs from meta.json's)"
    )
    assert hashed == ["f0.bin", "f1.bin"]  # one thread: nothing after the bad file is read
    hashed.clear()
    assert store.hash_problem(tmp_path, files, threads=2) is not None
    # two worker threads: f0 and f1 in either order, at most threads - 1 = 1 file after the bad one
    assert {"f0.bin", "f1.bin"} <= set(hashed) <= {"f0.bin", "f1.bin", "f2.bin"}

    def unreadable(p):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(store, "sha256_file", unreadable)
    assert store.hash_problem(tmp_path, files) == "f0.bin cannot be read ([Errno 5] Input/output error)"
