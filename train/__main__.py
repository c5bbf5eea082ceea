"""`python -m train <overrides>` or `deepspeed --num_gpus N --module train <overrides>`.

Hydra reads `configs/train.yaml`; groups: model, data, optim, schedule, deepspeed, parallel, logging,
checkpoint, experiment. The resolved config is written to `<run_dir>/config.yaml` with the git revision.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")


def strip_launcher_args(argv: list[str]) -> list[str]:
    """The deepspeed launcher appends `--local_rank=N`, which Hydra would reject; move it to the env."""
    kept = []
    it = iter(argv)
    for arg in it:
        if arg.startswith("--local_rank"):
            value = arg.split("=", 1)[1] if "=" in arg else next(it)
            os.environ.setdefault("LOCAL_RANK", value)
        else:
            kept.append(arg)
    return kept


def git_revision() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    import hydra
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from train.config import TrainConfig

    sys.argv = strip_launcher_args(sys.argv)
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)

    @hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
    def _run(dcfg) -> None:
        from train.trainer import run

        cfg: TrainConfig = OmegaConf.to_object(dcfg)  # type: ignore[assignment]
        run_dir = Path(cfg.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if int(os.environ.get("RANK", "0")) == 0:
            (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(dcfg) + f"# git: {git_revision()}\n")
        run(cfg)

    _run()


if __name__ == "__main__":
    main()
