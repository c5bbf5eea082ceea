"""`python -m train <overrides>` (console script `finemoe-train`), or under a launcher:
`deepspeed --num_gpus N --module train <overrides>`. `--help` lists the groups and the composed config.

Hydra reads `configs/train.yaml`; groups: model, data, optim, schedule, deepspeed, parallel, logging,
checkpointing, experiment. `-m` runs a sweep, one run directory per job (`train/sweep.py`). The
resolved config is written to `<run_dir>/config.yaml` with the git revision once the run is built.
Bad input fails before anything is built: one line on stderr, exit status 2 (`cli`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from functools import partial
from pathlib import Path

from cli import hydra_main, run_without_finalizing, user_errors
from train import preemption

PROG = "finemoe-train"
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


def groups_help() -> str:
    """`group: option, ...` for each group in `configs/train.yaml`'s defaults list (for `--help`)."""
    from omegaconf import OmegaConf

    lines = []
    defaults = OmegaConf.to_container(OmegaConf.load(Path(CONFIG_DIR) / "train.yaml").defaults)
    for entry in defaults:  # type: ignore[union-attr]
        if not isinstance(entry, dict) or next(iter(entry)).startswith("override "):
            continue  # the schema, _self_, Hydra's own groups
        group = next(iter(entry)).removeprefix("optional ")
        options = sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))
        lines.append(f"  {group}: {', '.join(options)}")
    return "\n".join(lines)


def main() -> None:
    """The console script and `python -m train`. SIGTERM is recorded from the first line until the run
    has ended: one received while the run is built stops it cleanly, not at once, and the SIGTERM a
    launcher sends when another rank failed cannot cut this rank's own traceback short. The process
    then ends with its status but without interpreter finalization, where gloo's threads can abort a
    finished run (`cli.run_without_finalizing`, which gives SIGTERM its default action back)."""
    preemption.listen()
    run_without_finalizing(_main)


def run() -> None:
    """The command, in process (a test, a notebook): returns when the run (every job of a sweep) is done."""
    previous = preemption.listen()  # first, as in `main`
    try:
        _main()
    finally:  # an in-process caller (a test, a notebook) gets its own handler back
        preemption.restore(previous)


def _main() -> None:
    from omegaconf import OmegaConf

    from train.config import TrainConfig, launcher_world_size
    from train.sweep import SweepPlan

    sys.argv = strip_launcher_args(sys.argv)
    with user_errors(PROG):
        plan = SweepPlan.from_argv(sys.argv[1:])
        plan.check(launcher_world_size())
    sys.argv += plan.hydra_overrides()
    OmegaConf.register_new_resolver("finemoe_train_groups", groups_help, replace=True)
    hydra_main(PROG, CONFIG_DIR, "train", "train_schema", TrainConfig, partial(_train, plan))


def _train(plan, cfg) -> None:
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from train.config import launcher_world_size

    plan.apply(cfg, HydraConfig.get())
    cfg.validate(launcher_world_size())  # bad values fail before DeepSpeed is even imported
    from train.trainer import Trainer

    trainer = Trainer(cfg)  # validates everything first; creates run_dir only once all is built
    if trainer.rank == 0:
        (Path(cfg.run_dir) / "config.yaml").write_text(
            OmegaConf.to_yaml(OmegaConf.structured(cfg)) + f"# git: {git_revision()}\n"
        )
    trainer.fit()


if __name__ == "__main__":
    main()
