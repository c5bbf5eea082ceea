"""metrics.jsonl: one JSON object per logged step, appended and flushed as it happens.

The first record after a resume that changed the config also holds `changed_on_resume`:
`{"optim.lr": [0.0003, 0.01], ...}` (old, new).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from train.callbacks.base import Callback


class JsonlMetrics(Callback):
    def __init__(self) -> None:
        self.path: Path | None = None
        self.changed: dict[str, list[Any]] = {}

    def on_resume(self, step: int, changed: dict[str, tuple[Any, Any]]) -> None:
        self.changed = {k: list(v) for k, v in changed.items()}

    def on_start(self, run_dir: Path, config: dict[str, Any], start_step: int) -> None:
        self.path = run_dir / "metrics.jsonl"
        if (
            start_step > 0 and self.path.exists()
        ):  # drop records a crashed run wrote after its last checkpoint
            kept = [
                ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln)["step"] <= start_step
            ]
            self.path.write_text("".join(ln + "\n" for ln in kept))

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        assert self.path is not None
        record: dict[str, Any] = {"step": step, **metrics}
        if self.changed:
            record["changed_on_resume"], self.changed = self.changed, {}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
