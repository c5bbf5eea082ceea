"""metrics.jsonl: one JSON object per logged step, appended and flushed as it happens.

The first record after a resume that changed the config also holds `changed_on_resume`:
`{"optim.lr": [0.0003, 0.01], ...}` (old, new).

At start the file keeps only the records up to the step the run starts from: a fresh start in a used
run directory (`checkpoint.resume=none`) keeps none, a resume drops what a crashed run logged after its
last checkpoint (or what a rolled-back branch logged). Dropped records are appended to
`metrics_dropped.jsonl`, not deleted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from train.callbacks.base import Callback

DROPPED = "metrics_dropped.jsonl"


class JsonlMetrics(Callback):
    def __init__(self) -> None:
        self.path: Path | None = None
        self.changed: dict[str, list[Any]] = {}

    def on_resume(self, step: int, changed: dict[str, tuple[Any, Any]]) -> None:
        self.changed = {k: list(v) for k, v in changed.items()}

    def on_start(self, run_dir: Path, config: dict[str, Any], start_step: int) -> None:
        self.path = run_dir / "metrics.jsonl"
        if not self.path.exists():
            return
        lines = [ln for ln in self.path.read_text().splitlines() if ln]
        keep = [start_step > 0 and json.loads(ln)["step"] <= start_step for ln in lines]
        kept = [ln for ln, k in zip(lines, keep) if k]
        dropped = [ln for ln, k in zip(lines, keep) if not k]
        if not dropped:
            return
        with (run_dir / DROPPED).open("a") as f:
            f.write("".join(ln + "\n" for ln in dropped))
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(ln + "\n" for ln in kept))
        tmp.replace(self.path)
        print(f"metrics.jsonl: {len(dropped)} records after step {start_step} moved to {DROPPED}")

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        assert self.path is not None
        record: dict[str, Any] = {"step": step, **metrics}
        if self.changed:
            record["changed_on_resume"], self.changed = self.changed, {}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
