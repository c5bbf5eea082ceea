"""`python -m moe.params model=<preset> [model.field=value ...]`: parameter counts without allocating weights.

The last printed line is machine-readable:
`total <T>B activated <A>B activated_non_embedding <N>B`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from moe.config import ModelConfig

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")
PRESET_DIR = Path(CONFIG_DIR) / "model"


def load_preset(name: str) -> ModelConfig:
    """The model preset `configs/model/<name>.yaml`, validated (what `model=<name>` selects)."""
    from omegaconf import OmegaConf

    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        have = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
        raise FileNotFoundError(f"no model preset {name!r} in {PRESET_DIR} (have: {have})")
    return ModelConfig(**OmegaConf.to_container(OmegaConf.load(path))).validate()  # type: ignore[arg-type]


@dataclass(kw_only=True)
class ParamsJob:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model whose parameters are counted."""


def format_table(cfg: ModelConfig) -> str:
    """A table of per-component counts, then the summary line."""
    n = cfg.num_params()
    h = cfg.hidden_size
    rows = [
        ("embedding (+ untied lm_head)", n["embedding"]),
        ("MoE layers", len(cfg.moe_layers)),
        ("dense layers", cfg.num_hidden_layers - len(cfg.moe_layers)),
        ("routed experts per MoE layer", cfg.num_experts),
        ("params per routed expert", 3 * h * cfg.moe_intermediate_size),
        ("total", n["total"]),
        ("activated", n["activated"]),
        ("activated non-embedding", n["activated_non_embedding"]),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"{name:<{width}}  {value:>16,}" for name, value in rows]
    b = {k: v / 1e9 for k, v in n.items()}
    lines.append(
        f"total {b['total']:.2f}B activated {b['activated']:.2f}B "
        f"activated_non_embedding {b['activated_non_embedding']:.2f}B"
    )
    return "\n".join(lines)


def main() -> None:
    from cli import hydra_main

    hydra_main("finemoe-params", CONFIG_DIR, "params", "params_schema", ParamsJob, _run)


def _run(job: ParamsJob) -> None:
    print(format_table(job.model.validate()))


if __name__ == "__main__":
    main()
