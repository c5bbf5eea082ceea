"""How every finemoe command fails on bad input: one line on stderr, exit status 2.

    finemoe-train: error: deepspeed.zero_stage must be 0, 1 or 2, got 3

A user error is a `ValueError` (the project's rule: what a user can cause), a file error
(`FileNotFoundError`, `FileExistsError`, `NotADirectoryError`, `IsADirectoryError`, `PermissionError`)
or a Hydra / OmegaConf configuration error (unknown key, wrong type, missing `???` value, unknown
group option, unparsable override). Anything else is a bug: it keeps its traceback and exit status 1.
`FINEMOE_DEBUG=1` (or Hydra's own `HYDRA_FULL_ERROR=1`) shows the traceback of user errors too.

Design choices:
- This package imports nothing from the project and nothing heavy (Hydra only inside `hydra_main`),
  so every package may use it without bending the import direction: `cli` <- moe <- upcycle <- train,
  `cli` <- data (which still imports nothing of moe/upcycle/train), `cli` <- launch.
- `@hydra.main` reports errors its own way (a trimmed traceback or a multi-line message, exit 1).
  `hydra_main` runs the app with `HYDRA_FULL_ERROR=1`, which makes Hydra raise instead, and reports here.
  Errors raised by the task itself are reported inside the task, before Hydra's job runner adds its
  "Error executing job with overrides" line; under `-m` the line names the job.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

EXIT_USER_ERROR = 2
DEBUG_VARS = ("FINEMOE_DEBUG", "HYDRA_FULL_ERROR")
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)
# Lines of Hydra's and OmegaConf's messages that say nothing about the input (`full_key` comes back
# as a prefix where the message does not name the key).
_NOISE = ("full_key:", "reference_type=", "object_type=", "Config search path:", "See https://hydra.cc")


def debugging() -> bool:
    """True when the user asked for full tracebacks."""
    return any(os.environ.get(v, "") not in ("", "0") for v in DEBUG_VARS)


def _config_errors() -> tuple[type[BaseException], ...]:
    """Hydra's and OmegaConf's configuration errors, if those libraries are loaded (never imports them)."""
    found: list[type[BaseException]] = []
    hydra_errors = sys.modules.get("hydra.errors")
    if hydra_errors is not None:
        found.append(hydra_errors.CompactHydraException)
    omegaconf_errors = sys.modules.get("omegaconf.errors")
    if omegaconf_errors is not None:
        found.append(omegaconf_errors.OmegaConfBaseException)
    return tuple(found)


def is_user_error(e: BaseException) -> bool:
    return isinstance(e, USER_ERRORS + _config_errors())


def _lines(e: BaseException) -> list[str]:
    """The message's lines; an indented list after a line ending in ':' is joined with commas."""
    out: list[str] = []
    listing = skipping = False
    for raw in str(e).splitlines():
        line = raw.strip()
        if listing and raw[:1].isspace():
            if not skipping:
                out[-1] += (" " if out[-1].endswith(":") else ", ") + line
            continue
        if not line or line.startswith(_NOISE):
            listing = skipping = line.startswith(_NOISE) and line.endswith(":")
            continue
        listing, skipping = line.endswith(":"), False
        out.append(line.rstrip("."))
    return out


def message(e: BaseException) -> str:
    """One line that says what is wrong, naming the field, key or file."""
    if isinstance(e, OSError) and e.strerror and e.filename is not None:  # raised by the OS, not by us
        names = [str(e.filename)] + ([str(e.filename2)] if e.filename2 is not None else [])
        return f"{e.strerror}: {' -> '.join(names)}"
    if type(e).__name__ == "MissingMandatoryValue" and getattr(e, "full_key", None):  # OmegaConf's `???`
        return f"{e.full_key} is required: add {e.full_key}=<value>"  # type: ignore[attr-defined]
    lines = _lines(e) or [type(e).__name__]
    override = getattr(e, "override", None)  # Hydra's OverrideParseException
    if isinstance(override, str) and override not in lines[0]:
        lines[0] = f"cannot parse the override {override!r}: {lines[0]}"
    key = getattr(e, "full_key", None)
    cause = e.__cause__  # Hydra's composition errors wrap OmegaConf's, which say what is wrong
    if isinstance(cause, _config_errors()):
        lines = lines[:1] + [ln for ln in _lines(cause) if ln not in lines] + lines[1:]
        key = key or getattr(cause, "full_key", None)
    text = lines[0] + (": " + "; ".join(lines[1:]) if len(lines) > 1 else "")
    return f"{key}: {text}" if key and key not in text else text


def run_without_finalizing(main: Callable[[], object]) -> NoReturn:
    """Call `main` and end the process as an uncaught end would: status 0; a `SystemExit`'s code
    (`--help`, a refused input's 2); 1 after an exception's traceback; after a KeyboardInterrupt's
    traceback, death by SIGINT, which is how the interpreter reports it to a shell. See
    `exit_without_finalizing` for why."""
    status: int | str | None = 0
    by_signal = None
    try:
        main()
    except SystemExit as e:
        status = e.code
    except BaseException as e:
        # kept for the end, as the interpreter keeps them: the failed run's objects are not torn down
        sys.last_type, sys.last_value, sys.last_traceback = type(e), e, e.__traceback__
        if sys.version_info >= (3, 12):
            sys.last_exc = e
        sys.excepthook(type(e), e, e.__traceback__)
        status, by_signal = 1, (signal.SIGINT if isinstance(e, KeyboardInterrupt) else None)
    exit_without_finalizing(status, by_signal)


def exit_without_finalizing(
    status: int | str | None = 0, by_signal: signal.Signals | None = None
) -> NoReturn:
    """End the process as `sys.exit(status)` would, less the interpreter's finalization.

    A normal exit joins the non-daemon threads, runs the exit handlers, then finalizes the interpreter,
    which destroys what is left. Process groups that something still references (DeepSpeed's group
    registry, an engine: the expert and data-parallel groups) are destroyed only then, since
    `destroy_process_group` stops the unreferenced ones alone. A gloo thread that then needs the GIL
    (to release a finished collective's tensors, to run a future's callback) finds the interpreter
    finalizing and aborts the process: "terminate called without an active exception", status -6,
    after a run that had finished (pytorch/pytorch#190489; it failed a CI run).

    Here the first two steps run as exit runs them (train.engine's destroy of the groups among the
    handlers), Python's and C's buffered output is flushed (NCCL logs through C stdio), and `os._exit`
    ends the process before finalization. SIGTERM gets its default action back first, so a step that
    hangs can still be stopped. Under a profiler or debugger (`python -m cProfile`, `pdb`) the exit is
    a normal one, so they can write their results. `status` is read as `SystemExit` reads it: None is 0,
    a string is printed on stderr and gives 1. With `by_signal`, the process ends by that signal's
    default action instead (`status` if it survives it).
    """
    if sys.gettrace() is not None or sys.getprofile() is not None:
        raise SystemExit(status)
    if status is None:
        status = 0
    elif not isinstance(status, int):
        print(status, file=sys.stderr)
        status = 1
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    threading._shutdown()  # type: ignore[attr-defined]  # what exit does first: join non-daemon threads
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        if stream is not None:  # None: started with the descriptor closed
            with contextlib.suppress(OSError, ValueError):  # a closed pipe or stream: nothing can reach it
                stream.flush()
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).fflush(None)
    if by_signal is not None:
        signal.signal(by_signal, signal.SIG_DFL)
        os.kill(os.getpid(), by_signal)
    os._exit(status & 0xFF)


def fail(prog: str, msg: str) -> NoReturn:
    """Print `<prog>: error: <msg>` on stderr and exit with status 2 (under a launcher, on every rank)."""
    world = os.environ.get("WORLD_SIZE", "1")
    if world.isdigit() and int(world) > 1:
        msg = f"[rank {os.environ.get('RANK', '?')}] {msg}"
    print(f"{prog}: error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USER_ERROR)


@contextmanager
def user_errors(
    prog: str, context: str = "", debug: bool | None = None, also: tuple[type[BaseException], ...] = ()
) -> Iterator[None]:
    """Inside, a user error becomes `<prog>: error: [<context>: ]<message>` and exit status 2.

    Args:
        prog: the command's name, as the user typed it.
        context: what was being done (e.g. which job of a sweep); prefixed to the message.
        debug: re-raise instead (default: `debugging()`).
        also: more exception types to report this way (e.g. a failed stage of a pipeline).
    """
    try:
        yield
    except Exception as e:
        if (debugging() if debug is None else debug) or not (is_user_error(e) or isinstance(e, also)):
            raise
        fail(prog, f"{context}: {message(e)}" if context else message(e))


def guarded(prog: str, also: tuple[type[BaseException], ...] = ()) -> Callable[[F], F]:
    """Decorator for a plain (argparse) `main`: `user_errors(prog, also=also)` around every call."""

    def wrap(main: F) -> F:
        @functools.wraps(main)
        def guarded_main(*args: Any, **kwargs: Any) -> Any:
            with user_errors(prog, also=also):
                return main(*args, **kwargs)

        return guarded_main  # type: ignore[return-value]

    return wrap


def hydra_main(
    prog: str,
    config_dir: str,
    config_name: str,
    schema_name: str,
    schema: type,
    task: Callable[[Any], None],
) -> None:
    """Run `task(config object)` as a `@hydra.main` app, reporting user errors the one way.

    Args:
        prog: the command's name (`finemoe-train`).
        config_dir: the `configs/` directory.
        config_name: the primary config (`train` for `configs/train.yaml`).
        schema_name, schema: the dataclass that `config_name`'s defaults list names first.
        task: called with `OmegaConf.to_object(cfg)` (an instance of `schema`), once per job.
    """
    import hydra
    from hydra.core.config_store import ConfigStore
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    debug = debugging()
    ConfigStore.instance().store(name=schema_name, node=schema)

    @hydra.main(version_base="1.3", config_path=config_dir, config_name=config_name)
    def app(cfg: Any) -> None:
        hc = HydraConfig.get()
        context = ""
        if hc.mode == RunMode.MULTIRUN:
            context = f"job {hc.job.num} ({hc.job.override_dirname or 'no overrides'})"
        with user_errors(prog, context, debug):
            task(OmegaConf.to_object(cfg))

    saved = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises (its composition errors too) instead of reporting
    try:
        with user_errors(prog, debug=debug):
            app()
    finally:
        if saved is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = saved
