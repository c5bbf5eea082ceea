"""`python -m train.export checkpoint=<run or checkpoint dir> output=<new dir>`: a Hugging Face model.

Reads our checkpoint format (`train/checkpoint.py`: fp32 master weights per parameter, routed experts
one global expert at a time, any ZeRO stage and ep_size) and writes a Qwen2-MoE (MoE runs) or Qwen2
(dense runs) checkpoint with transformers' per-expert keys; the routers' selection biases are written
in fp32 as `mlp.gate.e_score_correction_bias` (read back by `moe.hf.from_pretrained` and `init_from`).

Memory: one parameter read in fp32 (for routed experts, all experts of one layer) plus the shard
being filled, at most `max_shard_bytes` in the export dtype (`moe.hf.ShardedWriter`). The output
appears under its final name only when complete.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moe.config import ModelConfig
from moe.hf import (
    TOKENIZER_FILES,
    ShardedWriter,
    add_selection_biases,
    check_output_dir,
    empty_shared_expert,
    parse_dtype,
    to_hf_tensors,
    write_metadata,
)
from moe.model import Qwen2MoEForCausalLM
from train import checkpoint as ckpt_lib
from train.checkpoint_branches import checkpoint_root
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
    source = where / ckpt_lib.META
    fields = meta.get("model_config")
    if not isinstance(fields, dict):
        raise ValueError(f"{source} has no model_config")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(
            f"{source}: model_config has keys that ModelConfig does not know: {unknown} (a checkpoint "
            "written by another version of finemoe?)"
        )
    try:
        return ModelConfig(**fields).validate()
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def run_dir_of(ckpt: Path) -> Path | None:
    """The run directory a checkpoint belongs to: the nearest parent that holds it under `checkpoints/`
    (`<run>/checkpoints/step_*` or `<run>/checkpoints/abandoned/<branch>/step_*`); None outside a run."""
    ckpt = ckpt.resolve()
    for parent in ckpt.parents:
        if checkpoint_root(parent.parent) == parent:
            return parent.parent
    return None


def _tokenizer_dir(ckpt: Path) -> Path | None:
    """`<run_dir>/tokenizer`, saved by the trainer; a warning on stderr when it cannot be found."""
    run_dir = run_dir_of(ckpt)
    if run_dir is None:
        print(
            f"warning: {ckpt} is not inside a run's checkpoints/ directory: the export ships no tokenizer",
            file=sys.stderr,
        )
        return None
    tokenizer = run_dir / "tokenizer"
    if not any((tokenizer / name).is_file() for name in TOKENIZER_FILES):
        print(
            f"warning: {tokenizer} holds no tokenizer files (the trainer saves them there): the export "
            "ships no tokenizer",
            file=sys.stderr,
        )
        return None
    return tokenizer


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
    check_output_dir(output, overwrite)  # before reading (and hashing) the whole checkpoint
    ckpt = find_checkpoint(checkpoint)
    meta = json.loads((ckpt / ckpt_lib.META).read_text())
    cfg = _model_config(meta, ckpt)
    if verify and meta.get("files"):  # format 1 checkpoints recorded no hashes
        problem = hash_problem(ckpt, meta["files"])
        if problem is not None:
            raise ValueError(f"checkpoint {ckpt} is damaged: {problem}; export an older checkpoint")
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
            "note: the routers' aux-loss-free selection biases are written (fp32) as "
            "mlp.gate.e_score_correction_bias; moe.hf.from_pretrained routes with them, but "
            "transformers' Qwen2-MoE ignores them (its routing then differs from training)"
        )
    tokenizer_dir = _tokenizer_dir(ckpt)
    with ShardedWriter(output, max_shard_bytes, overwrite=overwrite, dtype=dt) as w:
        write_metadata(w, cfg, dt, tokenizer_dir)
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
        add_selection_biases(w, bias.items())  # fp32 whatever `dtype`
        counts = cfg.num_params()
        report = {
            "source_checkpoint": str(ckpt),
            "step": meta.get("step"),
            "tokens_seen": meta.get("tokens_seen"),
            "ep_size": meta.get("ep_size"),
            "zero_stage": meta.get("zero_stage"),
            "architecture": "Qwen2MoeForCausalLM" if cfg.is_moe else "Qwen2ForCausalLM",
            "dtype": str(dt).removeprefix("torch."),
            "tokenizer": str(tokenizer_dir) if tokenizer_dir is not None else None,
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
