"""`python -m upcycle source=<dense HF dir> output=<new dir> [moe.<field>=...] [upcycle.<field>=...]`.

Hydra entry point (console script `finemoe-upcycle`). The MoE shape comes from a preset in
`configs/upcycle/moe/` (default Qwen1.5-MoE-A2.7B), the recipe from `upcycle.*`; see
docs/upcycling.md. Errors in the input are printed as one line and exit with status 2 (`cli`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from upcycle.config import MoEShape, UpcycleConfig

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")


@dataclass(kw_only=True)
class UpcycleJob:
    """One upcycling run."""

    source: str = "???"
    """Dense Hugging Face Qwen2 checkpoint directory."""
    output: str = "???"
    """Directory to create for the Qwen2-MoE checkpoint."""
    moe: MoEShape = field(default_factory=MoEShape)
    """The MoE shape (dense dimensions come from the source's config.json)."""
    upcycle: UpcycleConfig = field(default_factory=UpcycleConfig)
    """The recipe and output options."""


def main() -> None:
    from cli import hydra_main

    hydra_main("finemoe-upcycle", CONFIG_DIR, "upcycle", "upcycle_schema", UpcycleJob, _run)


def _run(job: UpcycleJob) -> None:
    from upcycle.run import upcycle

    upcycle(job.source, job.output, job.moe, job.upcycle, verbose=True)


if __name__ == "__main__":
    main()
