"""Read the history of an offline wandb run from its `.wandb` file (tests only).

The file is a LevelDB-style log: a 7-byte header (":W&B", magic, version), then 32 KiB blocks of
records with a 7-byte header each (crc32, little-endian uint16 length, type FULL/FIRST/MIDDLE/LAST),
whose payloads are `wandb_internal_pb2.Record` protobufs.
"""

from __future__ import annotations

import struct
from pathlib import Path

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list[bytes]:
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb run file"
    out, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < 7:
            pos += left_in_block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        payload = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == FULL:
            out.append(payload)
        elif kind == FIRST:
            pending = payload
        elif kind == MIDDLE:
            pending += payload
        elif kind == LAST:
            out.append(pending + payload)
        else:
            break
    return out


def history(run_dir: Path) -> list[dict[str, str]]:
    """One dict per logged step: key -> JSON-encoded value."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = sorted(run_dir.glob("wandb/offline-run-*/*.wandb"))
    rows = []
    for raw in records(path):
        rec = pb.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): item.value_json for item in rec.history.item})
    return rows
