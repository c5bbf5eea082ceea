"""`python -m train.export checkpoint=<run or checkpoint dir> output=<new dir>`: a Hugging Face model.

Reads our checkpoint format (`train/checkpoint.py`: fp32 master weights per parameter, routed experts
one global expert at a time, any ZeRO stage and ep_size) and writes a Qwen2-MoE (MoE runs) or Qwen2
(dense runs) checkpoint with transformers' per-expert keys. It streams: one parameter is in memory
at a time, and the output appears under its final name only when complete.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moe.config import ModelConfig
from moe.hf import (
    ShardedWriter,
    empty_shared_expert,
    parse_dtype,
    to_hf_tensors,
    write_metadata,
)
from moe.model import Qwen2MoEForCausalLM
from train import checkpoint as ckpt_lib
from train.checkpoint_store import hash_problem

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")


@dataclass(kw_only=True)
class ExportConfig:
    checkpoint: str = "???"
    """A run directory (its newest complete checkpoint is used) or one checkpoint directory."""
    output: str = "???"
    """New Hugging Face checkpoint directory."""
    dtype: str = "bfloat16"
    """bfloat16 | float32 | float16."""
    max_shard_bytes: int = 2 * 1024**3
    """Largest safetensors shard."""
    overwrite: bool = False
    """Replace a non-empty output directory."""
    verify: bool = True
    """Check every checkpoint file's sha256 against meta.json before writing anything (reads the whole
    checkpoint: A2.7B's 172 GB; `false` checks sizes only)."""


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory for `path` (a checkpoint, or a run directory: its newest complete one)."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"checkpoint {p} does not exist")
    found = ckpt_lib.resolve_resume(str(p), p)
    if found is None:
        raise ValueError(f"{p} holds no complete checkpoint")
    return found


def _model_config(meta: dict[str, Any], where: Path) -> ModelConfig:
    if "model_config" not in meta:
        raise ValueError(f"{where}/meta.json has no model_config")
    return ModelConfig(**meta["model_config"]).validate()


def export(
    checkpoint: str | Path,
    output: str | Path,
    dtype: str = "bfloat16",
    max_shard_bytes: int = 2 * 1024**3,
    overwrite: bool = False,
    verify: bool = True,
) -> dict[str, Any]:
    """Write the HF checkpoint and return the export report (also saved as `export_report.json`).

    Raises:
        ValueError: a missing, incomplete or damaged checkpoint (sizes always; sha256 with `verify`),
            before anything is written.
    """
    start = time.time()
    ckpt = find_checkpoint(checkpoint)
    meta = json.loads((ckpt / ckpt_lib.META).read_text())
    if verify and meta.get("files"):  # format 1 checkpoints recorded no hashes
        problem = hash_problem(ckpt, meta["files"])
        if problem is not None:
            raise ValueError(f"checkpoint {ckpt} is damaged: {problem}; export an older checkpoint")
    cfg = _model_config(meta, ckpt)
    dt = parse_dtype(dtype)
    reader = ckpt_lib.StateReader(ckpt)
    with torch.device("meta"):
        skeleton = Qwen2MoEForCausalLM(cfg)
    # check completeness before writing anything
    for name, p in skeleton.named_parameters():
        missing = reader.missing(name, "fp32", _experts(name, p))
        if missing:
            raise ValueError(
                f"checkpoint {ckpt} is incomplete: {missing[0]!r} is missing"
                + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else "")
            )
    bias = _selection_biases(ckpt)
    if any(b.abs().sum() > 0 for b in bias.values()):
        print(
            "note: the routers' aux-loss-free selection biases are written as mlp.gate.e_score_correction_bias; "
            "transformers' Qwen2-MoE ignores them (routing then differs from training)"
        )
    tokenizer_dir = ckpt.parent.parent / "tokenizer"  # saved by the trainer in <run_dir>/tokenizer
    with ShardedWriter(output, max_shard_bytes, overwrite=overwrite, dtype=dt) as w:
        write_metadata(w, cfg, dt, tokenizer_dir if tokenizer_dir and tokenizer_dir.is_dir() else None)
        for name, p in skeleton.named_parameters():
            value = reader.read(name, "fp32", _experts(name, p))
            if tuple(value.shape) != tuple(p.shape):
                raise ValueError(
                    f"{ckpt}: {name} has shape {list(value.shape)}, config implies {list(p.shape)}"
                )
            for key, t in to_hf_tensors(name, value):
                w.add(key, t)
            del value
        if cfg.is_moe and cfg.shared_expert_intermediate_size == 0:
            for layer in cfg.moe_layers:
                for key, t in empty_shared_expert(cfg, layer):
                    w.add(key, t)
        for name, b in bias.items():
            if b.abs().sum() > 0:
                w.add(name.replace("selection_bias", "e_score_correction_bias"), b)
        counts = cfg.num_params()
        report = {
            "source_checkpoint": str(ckpt),
            "step": meta.get("step"),
            "tokens_seen": meta.get("tokens_seen"),
            "ep_size": meta.get("ep_size"),
            "zero_stage": meta.get("zero_stage"),
            "architecture": "Qwen2MoeForCausalLM" if cfg.is_moe else "Qwen2ForCausalLM",
            "dtype": str(dt).removeprefix("torch."),
            "params_total": counts["total"],
            "params_activated": counts["activated"],
            "params_activated_non_embedding": counts["activated_non_embedding"],
            "verified_sha256": bool(verify and meta.get("files")),
            "bytes_written": w.total_bytes,
            "seconds": round(time.time() - start, 2),
        }
        w.write_json("export_report.json", report)
    return report


def _experts(name: str, p: torch.nn.Parameter) -> range | None:
    """All global expert ids of a routed-expert parameter; None for any other parameter."""
    return range(p.shape[0]) if name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")) else None


def _selection_biases(ckpt: Path) -> dict[str, torch.Tensor]:
    path = ckpt / "buffers.safetensors"
    if not path.is_file():
        return {}
    from safetensors.torch import load_file

    return load_file(path)


def main() -> None:
    from cli import hydra_main

    hydra_main("finemoe-export", CONFIG_DIR, "export", "export_schema", ExportConfig, _run)


def _run(cfg: ExportConfig) -> None:
    report = export(cfg.checkpoint, cfg.output, cfg.dtype, cfg.max_shard_bytes, cfg.overwrite, cfg.verify)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
