"""Stop requests by signal: SIGTERM (preemption, Slurm's `--signal`) and, while training, SIGINT.

A received signal is only recorded; the trainer checks it after each step (every rank agrees through
one all-reduce), saves that step and exits 0. `python -m train` starts listening for SIGTERM before
it builds anything, because building a run (DeepSpeed, the model, a restore) takes minutes at scale and
the default action (die at once, exit 143) would fail the job: a SIGTERM that arrives then stops the
run before its first step, with nothing new to save. SIGINT keeps its default (KeyboardInterrupt)
until `Trainer.fit` starts, so Ctrl-C still interrupts building the run.

Processes forked meanwhile (datasets' and data.prepare's pools) get the default actions back at the
fork: their parent stops them with SIGTERM (`Pool.terminate`), which must kill them wherever they
are, in C code included, or the parent waits for them forever.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

_received: int | None = None
_listener_pid: int | None = None
_DEFAULTS: dict[signal.Signals, Callable[[int, FrameType | None], Any] | int] = {
    signal.SIGTERM: signal.SIG_DFL,
    signal.SIGINT: signal.default_int_handler,
}


_replaced: dict[signal.Signals, Any] = {}
"""What `listen` replaced (SIG_IGN under nohup): a forked child gets it back."""
_fork = threading.local()  # the forking thread's signal mask, blocked across the fork


def _child_handler(s: signal.Signals) -> Any:
    """The handler a forked child runs with instead of `_record`."""
    return _replaced.get(s, _DEFAULTS[s])


def _record(signum: int, frame: FrameType | None) -> None:
    global _received
    if os.getpid() != _listener_pid:  # a child forked without the hook (a fork outside Python's)
        signal.signal(signum, _child_handler(signal.Signals(signum)))
        os.kill(os.getpid(), signum)
        return
    _received = signum


def _before_fork() -> None:
    listening = any(signal.getsignal(s) is _record for s in _DEFAULTS)
    _fork.mask = signal.pthread_sigmask(signal.SIG_BLOCK, set(_DEFAULTS)) if listening else None


def _after_fork_in_parent() -> None:
    """The forking thread's mask as it was before the fork."""
    if getattr(_fork, "mask", None) is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, _fork.mask)


def _after_fork_in_child() -> None:
    """The default actions back, then the signals unblocked: one that arrived since the fork (the
    parent terminating a pool it just made) was held by the kernel and now acts by default. Unblocked
    before the reset, Python's handler would have caught it and then dropped it."""
    for s in _DEFAULTS:
        if signal.getsignal(s) is _record:
            signal.signal(s, _child_handler(s))
    _after_fork_in_parent()  # the same mask back, now in the child


def listen(*signums: signal.Signals) -> dict[signal.Signals, Callable[..., Any] | int | None]:
    """Record `signums` (SIGTERM when none is given) from now on, in this process only (forked
    children get the default actions back); returns the handlers they replace, for `restore`."""
    global _listener_pid
    if _listener_pid is None:
        os.register_at_fork(
            before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child
        )
    _listener_pid = os.getpid()
    previous = {s: signal.signal(s, _record) for s in signums or (signal.SIGTERM,)}
    for s, handler in previous.items():
        if handler is not _record and handler is not None:
            _replaced[s] = handler
    return previous


def restore(previous: dict[signal.Signals, Callable[..., Any] | int | None]) -> None:
    """Put back the handlers `listen` replaced."""
    for s, handler in previous.items():
        signal.signal(s, handler)


def received() -> int | None:
    """The last stop signal received since the process started, if any. A SIGTERM is never
    forgotten: the process is going down, and every later job of a sweep stops before its first step
    too. A SIGINT is forgotten when the run it stopped ends (`forget_interrupt`)."""
    return _received


def forget_interrupt() -> None:
    """Forget a recorded Ctrl-C: it stopped one run, not every later run of the process (a notebook)."""
    global _received
    if _received == signal.SIGINT:
        _received = None
