"""Stop requests by signal: SIGTERM (preemption, Slurm's `--signal`) and, while training, SIGINT.

A received signal is only recorded; the trainer checks it after each step (every rank agrees through
one all-reduce), saves that step and exits 0. `python -m train` starts listening for SIGTERM before
it builds anything, because building a run (DeepSpeed, the model, a restore) takes minutes at scale and
the default action (die at once, exit 143) would fail the job: a SIGTERM that arrives then stops the
run before its first step, with nothing new to save. SIGINT keeps its default (KeyboardInterrupt)
until training starts, so Ctrl-C still interrupts a slow start.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

_received: int | None = None
_listener_pid: int | None = None


def _record(signum: int, frame: FrameType | None) -> None:
    global _received
    if os.getpid() != _listener_pid:
        # a forked child (a multiprocessing pool of datasets or data.prepare) inherits this handler;
        # its parent stops it with SIGTERM (`Pool.terminate`), so it must die as by default, or the
        # parent waits for it forever
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    _received = signum


def listen(*signums: signal.Signals) -> dict[signal.Signals, Callable[..., Any] | int | None]:
    """Record `signums` (SIGTERM when none is given) from now on, in this process only (forked
    children keep the default action); returns the handlers they replace, for `restore`."""
    global _listener_pid
    _listener_pid = os.getpid()
    return {s: signal.signal(s, _record) for s in signums or (signal.SIGTERM,)}


def restore(previous: dict[signal.Signals, Callable[..., Any] | int | None]) -> None:
    """Put back the handlers `listen` replaced."""
    for s, handler in previous.items():
        signal.signal(s, handler)


def received() -> int | None:
    """The last stop signal received since the process started, if any. It is never forgotten: the
    process is going down, and every later job of a sweep stops before its first step too."""
    return _received
