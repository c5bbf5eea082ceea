"""A sharded safetensors writer for checkpoints whose every key and shape is known before writing.

Design choices:
- The layout (which shard each tensor goes to, at which byte offset) is computed from the planned
  shapes up front, so each shard's header is final before its first tensor arrives and `add()`
  writes the tensor's bytes straight to its place in the file. Memory holds one tensor, whatever the
  shard size; `moe.hf.ShardedWriter`, which must see a shard's tensors before writing its header,
  holds a whole shard (and every held tensor is fresh memory, whose page faults cost as much as
  the copy on a VM).
- Same contract as `ShardedWriter` otherwise: files go to `.<name>.tmp-<pid>` next to the output,
  which is renamed when complete (replacing an old output only then), and deleted on an exception.
  Leaving the context without having added every planned tensor is an error, not a short checkpoint.
- The bytes are deterministic: header JSON in planned order with fixed separators, padded to 8 bytes
  as the safetensors format requires.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import torch

from moe.hf import SAFE_INDEX_NAME, publish_dir

_DTYPE_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}


class PlannedShardWriter:
    """Writes `model-0000i-of-0000n.safetensors` shards and their index, tensor by tensor.

    Args:
        out_dir: the checkpoint directory to create.
        shapes: every key to write, in file order, with its shape.
        dtype: the dtype of every tensor (floating tensors are cast to it on `add`).
        max_shard_bytes: a shard is closed before it would pass this size (a single larger tensor
            gets a shard of its own).
        overwrite: replace a non-empty `out_dir` once the new checkpoint is complete.
    """

    def __init__(
        self,
        out_dir: str | Path,
        shapes: dict[str, tuple[int, ...]],
        dtype: torch.dtype,
        max_shard_bytes: int,
        overwrite: bool = False,
    ):
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and any(self.out_dir.iterdir()) and not overwrite:
            raise ValueError(f"output directory {self.out_dir} exists and is not empty (set overwrite=true)")
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"dtype {dtype} cannot be written; choose one of {list(_DTYPE_NAMES)}")
        self.tmp_dir = self.out_dir.parent / f".{self.out_dir.name}.tmp-{os.getpid()}"
        self.dtype, self.overwrite = dtype, overwrite
        itemsize = torch.empty(0, dtype=dtype).element_size()
        shards: list[dict[str, tuple[int, ...]]] = [{}]
        size = 0
        for key, shape in shapes.items():
            nbytes = math.prod(shape) * itemsize
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][key] = tuple(shape)
            size += nbytes
        n = len(shards)
        self.files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._where: dict[
            str, tuple[int, int, int, tuple[int, ...]]
        ] = {}  # key -> (shard, start, end, shape)
        self._headers: list[bytes] = []
        for i, shard in enumerate(shards):
            header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
            offset = 0
            for key, shape in shard.items():
                end = offset + math.prod(shape) * itemsize
                header[key] = {
                    "dtype": _DTYPE_NAMES[dtype],
                    "shape": list(shape),
                    "data_offsets": [offset, end],
                }
                offset = end
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            self._headers.append(struct.pack("<Q", len(raw)) + raw)
            for key, (start, end) in ((k, header[k]["data_offsets"]) for k in shard):
                self._where[key] = (i, len(self._headers[i]) + start, len(self._headers[i]) + end, shard[key])
        self.total_bytes = sum(end - start for _, start, end, _ in self._where.values())
        self._written: set[str] = set()
        self._file: Any = None
        self._file_index = -1

    def __enter__(self) -> PlannedShardWriter:
        if self.tmp_dir.exists():
            shutil.rmtree(self.tmp_dir)
        self.tmp_dir.mkdir(parents=True)
        for name, header in zip(self.files, self._headers):
            with open(self.tmp_dir / name, "wb") as f:
                f.write(header)
        return self

    def add(self, key: str, tensor: torch.Tensor) -> None:
        """Write `tensor` at its planned place; each planned key exactly once, in any order."""
        if key not in self._where:
            raise ValueError(f"tensor {key!r} is not in the planned checkpoint")
        if key in self._written:
            raise ValueError(f"tensor {key!r} written twice")
        shard, start, end, shape = self._where[key]
        if tuple(tensor.shape) != shape:
            raise ValueError(f"tensor {key!r} has shape {list(tensor.shape)}, planned {list(shape)}")
        t = tensor.detach().to("cpu")
        if t.dtype != self.dtype:
            if not t.is_floating_point():
                raise ValueError(f"tensor {key!r} is {t.dtype}, planned {self.dtype}")
            t = t.to(self.dtype)
        t = t.contiguous()
        if shard != self._file_index:
            self._close()
            self._file = open(self.tmp_dir / self.files[shard], "r+b")  # noqa: SIM115 - kept open across adds
            self._file_index = shard
        self._file.seek(start)
        if end > start:
            self._file.write(t.reshape(-1).view(torch.uint8).numpy())
        self._written.add(key)

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file, self._file_index = None, -1

    def write_json(self, name: str, obj: Any) -> None:
        (self.tmp_dir / name).write_text(json.dumps(obj, indent=2) + "\n")

    def copy_file(self, src: str | Path) -> None:
        shutil.copy2(src, self.tmp_dir / Path(src).name)

    def __exit__(self, exc_type, exc, tb) -> None:
        self._close()
        if exc_type is None and len(self._written) != len(self._where):
            missing = [k for k in self._where if k not in self._written]
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
            raise ValueError(
                f"checkpoint incomplete: {len(missing)} planned tensors never written, e.g. {missing[:3]}"
            )
        if exc_type is not None:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
            return
        weight_map = {key: self.files[shard] for key, (shard, *_rest) in self._where.items()}
        self.write_json(
            SAFE_INDEX_NAME, {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        )
        publish_dir(self.tmp_dir, self.out_dir)
