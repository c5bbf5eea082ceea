"""Hydra sweeps of the trainer (`python -m train -m optim.lr=1e-3,3e-3`): one run directory per job.

A run lives in `run_dir` (default `runs/default`) and `checkpoint.resume=auto` continues whatever that
directory holds. Had every job of a sweep kept the default, job 1 would resume job 0's checkpoint
and train nothing with its own values. So under `-m`:
- each job's `run_dir` is its Hydra job directory, `<hydra.sweep.dir>/<job number>_<swept overrides>`
  (`runs/multirun/2025-01-31_12-00-00/1_optim.lr=3e-3`), and its wandb run is named after the swept
  overrides (`optim.lr=3e-3`); overrides that every job shares stay out of the names;
- an explicit `run_dir=` that the jobs would share is refused, unless `checkpoint.resume=` is given
  too: then every job continues the same run on purpose (stages such as `max_steps=1000,2000`);
- under a multi-process launcher every rank runs the sweep, and the ranks agree on the directories
  only with an explicit `hydra.sweep.dir=` (the default contains the time).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from train.config import TrainConfig


@dataclass(frozen=True)
class SweepPlan:
    """What the command line asks of Hydra, read before Hydra runs."""

    multirun: bool
    swept: tuple[str, ...] = ()
    """Keys that take several values (`k=a,b`, `k=range(...)`, `k=glob(...)`)."""
    given: tuple[str, ...] = ()
    """Keys of every override on the command line."""

    @classmethod
    def from_argv(cls, argv: list[str]) -> SweepPlan:
        """Parse Hydra's command line (without the program name). Unparsable overrides are left for
        Hydra to report."""
        from hydra._internal.utils import get_args_parser
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from hydra.errors import HydraException

        args, _ = get_args_parser().parse_known_args(argv)
        try:
            overrides = OverridesParser.create().parse_overrides(args.overrides)
        except HydraException:
            return cls(multirun=bool(args.multirun))
        multirun = args.multirun or any(
            o.key_or_group == "hydra.mode" and str(o.value()) == "MULTIRUN" for o in overrides
        )
        return cls(
            multirun=bool(multirun),
            swept=tuple(o.key_or_group for o in overrides if o.is_sweep_override()),
            given=tuple(o.key_or_group for o in overrides),
        )

    def check(self, world_size: int) -> None:
        """Refuse sweeps whose jobs would share a run directory, or whose ranks would not."""
        if not self.multirun:
            return
        shared = self.swept and "run_dir" in self.given and "run_dir" not in self.swept
        if shared and "checkpoint.resume" not in self.given:
            raise ValueError(
                f"run_dir is shared by every job of this sweep over {', '.join(self.swept)}: each job "
                "would resume the previous job's checkpoint. Drop run_dir= (each job then gets its own "
                "directory under hydra.sweep.dir), sweep it too (run_dir=a,b), or add "
                "checkpoint.resume=auto if every job is meant to continue the same run"
            )
        if world_size > 1 and "hydra.sweep.dir" not in self.given:
            raise ValueError(
                f"-m under a launcher of {world_size} processes needs hydra.sweep.dir=<dir>: its default "
                "contains the time, which the ranks would each read for themselves"
            )

    def hydra_overrides(self) -> list[str]:
        """Extra overrides that name each job's directory after its swept overrides only."""
        if not self.multirun:
            return []
        fixed = sorted({k for k in self.given if k not in self.swept and not k.startswith("hydra.")})
        out = ["hydra.job.config.override_dirname.exclude_keys=[" + ",".join(f"'{k}'" for k in fixed) + "]"]
        if not self.swept:  # nothing to name the one job after
            out.append("hydra.sweep.subdir=${hydra.job.num}")
        return out

    def apply(self, cfg: TrainConfig, hydra_cfg: Any) -> None:
        """In a job of a sweep: its own `run_dir` and wandb name, unless the command line set them."""
        if not self.multirun:
            return
        if "run_dir" not in self.given:
            out = Path(hydra_cfg.runtime.output_dir)
            try:
                cfg.run_dir = str(out.relative_to(Path.cwd()))
            except ValueError:
                cfg.run_dir = str(out)
        if "logging.name" not in self.given:
            cfg.logging.name = hydra_cfg.job.override_dirname or f"job{hydra_cfg.job.num}"
