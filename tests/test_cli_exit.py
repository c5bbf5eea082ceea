"""`cli.exit_without_finalizing`: the end of a command that may hold process groups (`python -m train`).

Why it skips finalization is tested with gloo in tests/train/test_comm.py; here, that it otherwise ends
the process as a normal exit would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from tests.train.runner import ROOT


def run_python(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """`python -c code` (or `python *args`) with buffered output, as a job writing to a file has it."""
    cmd = [sys.executable, *args] if args else [sys.executable, "-c", code]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_buffered_output_of_python_and_of_c_reaches_a_pipe_and_the_status_is_sys_exits():
    """`os._exit` drops what sits in buffers: Python's (a pipe is block-buffered) and C stdio's, through
    which NCCL logs. Both are flushed. The status is read as `sys.exit` reads it."""
    code = """
import ctypes, sys
from cli import exit_without_finalizing
print("python line")
ctypes.CDLL(None).printf(b"c line\\n")
exit_without_finalizing({status!r})
"""
    res = run_python(code.format(status=3))
    assert res.returncode == 3 and res.stdout.splitlines() == ["python line", "c line"], res
    res = run_python(code.format(status="stopped: see the log"))
    assert res.returncode == 1 and res.stderr == "stopped: see the log\n", res
    assert run_python(code.format(status=None)).returncode == 0
    assert run_python(code.format(status=257)).returncode == 1  # as sys.exit(257): the low byte


def test_a_sigterm_still_stops_an_exit_that_hangs():
    """`python -m train` records SIGTERM to its end; the exit gives it its default action back first,
    so a hanging exit step (here a non-daemon thread that never ends) can still be stopped."""
    code = """
import threading, time
from cli import exit_without_finalizing
from train import preemption
preemption.listen()
threading.Thread(target=time.sleep, args=(60,)).start()  # joined by the exit, as by a normal one
print("exiting", flush=True)
exit_without_finalizing(0)
"""
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "exiting\n"
        time.sleep(0.5)  # in the join
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == -signal.SIGTERM
    finally:
        proc.kill()
        proc.wait()


def test_under_a_profiler_the_exit_is_a_normal_one(tmp_path):
    """`python -m cProfile -o` writes its profile at a normal exit only."""
    script = tmp_path / "job.py"
    script.write_text("from cli import exit_without_finalizing\nexit_without_finalizing(0)\n")
    prof = tmp_path / "job.prof"
    res = run_python("", "-m", "cProfile", "-o", str(prof), str(script))
    assert res.returncode == 0 and prof.stat().st_size > 0, res.stderr[-2000:]
