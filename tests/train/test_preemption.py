"""`train.preemption`: SIGTERM recorded from the start of `python -m train`, and only there.

The signal paths through the trainer and the launcher are tested end to end in test_trainer.py
(`test_sigterm_*`) and tests/launch/test_launch.py."""

from __future__ import annotations

import importlib
import signal
import subprocess
import sys

import pytest

from tests.train.runner import ROOT

POOL_AFTER_LISTEN = """
import multiprocessing, time
from train import preemption
preemption.listen()
# a worker that never takes a task (stuck in its initializer: in CI, a forked worker stalled on a lock)
with multiprocessing.get_context("fork").Pool(1, initializer=time.sleep, initargs=(3600,)):
    pass  # leaving terminates the pool: SIGTERM to the worker, then wait for it
print("pool terminated", flush=True)
"""


POOL_STUCK_IN_C = """
import ctypes, multiprocessing
from train import preemption
libc = ctypes.CDLL("libc.so.6")
mutex = ctypes.create_string_buffer(64)  # zeroed: PTHREAD_MUTEX_INITIALIZER (glibc)
libc.pthread_mutex_lock(mutex)  # held across the fork: the classic fork deadlock

def stuck():
    libc.pthread_mutex_lock(mutex)  # blocks in C: a Python-level handler would never run

preemption.listen()
with multiprocessing.get_context("fork").Pool(1, initializer=stuck):
    pass
print("pool terminated", flush=True)
"""


@pytest.mark.parametrize("probe", [POOL_AFTER_LISTEN, POOL_STUCK_IN_C], ids=["in_python", "in_c"])
def test_forked_pool_workers_still_die_of_sigterm(probe):
    """A multiprocessing pool forked while the trainer listens (datasets' map, data.prepare) is stopped
    with SIGTERM; its workers inherit the recording handler and must still die of it. Before, a
    worker that had not finished recorded it and went on, and `Pool.terminate` waited for it forever
    (a CI run hung so in a data.prepare test after an in-process `train.__main__.main()`). A worker
    blocked in C never runs a Python handler: the fork itself must restore the default action."""
    res = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "pool terminated" in res.stdout, res.stderr[-2000:]


def test_the_cli_gives_an_in_process_caller_its_handler_back(monkeypatch, capsys):
    """`train.__main__.run` listens from its first line; when it returns (here: refused input, exit 2)
    the caller's SIGTERM handler is back, so a test process or a notebook is not left ignoring it."""
    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(sys, "argv", ["train", "optim.lr=-1"])
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit) as exc:
        importlib.import_module("train.__main__").run()
    assert exc.value.code == 2 and "optim.lr" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_ctrl_c_stops_one_run_and_a_sigterm_every_later_one(monkeypatch):
    """`Trainer.fit` forgets a recorded SIGINT when its run ends (a notebook's next run trains); a
    SIGTERM stays (the process is being preempted: a sweep's later jobs stop too)."""
    import os

    from train import preemption

    monkeypatch.setattr(preemption, "_received", None)
    previous = preemption.listen(signal.SIGTERM, signal.SIGINT)
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert preemption.received() == signal.SIGINT
        preemption.forget_interrupt()
        assert preemption.received() is None
        os.kill(os.getpid(), signal.SIGTERM)
        preemption.forget_interrupt()
        assert preemption.received() == signal.SIGTERM
    finally:
        preemption.restore(previous)


FAILING_RANK = """
import os, signal, sys
import train.__main__ as cmd

def _main():
    raise RuntimeError("the write failed")  # a rank's own error, reported by its traceback

def excepthook(*exc):  # the launcher's SIGTERM (another rank failed first) lands while this one reports
    os.kill(os.getpid(), signal.SIGTERM)
    sys.__excepthook__(*exc)

sys.excepthook = excepthook
cmd._main = _main
cmd.main()
"""


def test_a_failed_rank_reports_its_error_though_the_launcher_sends_sigterm_meanwhile():
    """When one rank fails, DeepSpeed's launcher sends SIGTERM to the others, which may be failing too
    (a full disk on every rank). `python -m train` records SIGTERM to the process's end, so such a rank
    still prints its traceback and exits 1. Before, the handler was restored to the default before the
    traceback was printed, and the rank died of the signal with its error unsaid."""
    res = subprocess.run(
        [sys.executable, "-c", FAILING_RANK], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 1, (res.returncode, res.stderr[-2000:])
    assert res.stderr.rstrip().endswith("RuntimeError: the write failed")
