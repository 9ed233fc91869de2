"""How a training run behaves as a batch job: stop signals it answers with a checkpoint, its progress lines in a
log file, and the check that it can write where it will (fastfair.trainer uses these)."""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Optional


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # what a scheduler sends before it kills (Slurm: KillWait later)


class StopSignals:
    """The handler of STOP_SIGNALS during training: records the signal (signum: the last one's number, 0 while
    none came); the loop saves and stops at the end of the iteration in progress."""

    def __init__(self):
        self.signum = 0

    def __call__(self, signum, frame) -> None:
        self.signum = signum


@contextlib.contextmanager
def stop_signals():
    """Handle STOP_SIGNALS with a `StopSignals` for the block, then restore the previous handlers. Only in the main
    thread (Python runs handlers there only, and signal.signal refuses elsewhere): a run in another thread keeps
    the process's own handling."""
    stop = StopSignals()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {number: signal.signal(number, stop) for number in STOP_SIGNALS}
    try:
        yield stop
    finally:
        for number, handler in previous.items():  # None: a handler not set from Python (kept as the default)
            signal.signal(number, signal.SIG_DFL if handler is None else handler)


def _exit_at_sigterm(signum, frame) -> None:
    sys.exit(128 + signum)


@contextlib.contextmanager
def sigterm_as_exit():
    """SIGTERM raises SystemExit(143) in the block, so that cleanups run: the default action ends the process at
    once, leaving the temporary file of a `fastfair.files.atomic_path` write it stopped (``timeout``, as
    bench/gpu_check.sh runs each step, sends SIGTERM). Main thread only (Python runs handlers there only); the
    previous handler is restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _exit_at_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


class CtrlC:
    """SIGINT's handler during a command: notes that Ctrl-C came (``came``), then calls the handler it replaced
    (Python's, which raises KeyboardInterrupt)."""

    def __init__(self, previous):
        self.previous, self.came = previous, False

    def __call__(self, signum, frame) -> None:
        self.came = True
        self.previous(signum, frame)


@contextlib.contextmanager
def noticing_ctrl_c():
    """A `CtrlC` for the block, so that a Ctrl-C a library turned into another exception still ends a command as
    interrupted (numpy 1.x's ``np.unique(axis=0)``, interrupted in its comparison of rows, raises a TypeError
    instead; the run ended with a traceback and status 1). Only where SIGINT has Python's own handler (a
    background job ignores it; a caller may have its own) and in the main thread; inside another such block, that
    block's."""
    previous = signal.getsignal(signal.SIGINT)
    if isinstance(previous, CtrlC):
        yield previous
        return
    notice = CtrlC(previous)
    if threading.current_thread() is not threading.main_thread() or previous is not signal.default_int_handler:
        yield notice
        return
    signal.signal(signal.SIGINT, notice)
    try:
        yield notice
    finally:
        signal.signal(signal.SIGINT, previous)


def closing(close):
    """An ExitStack exit callback (`stack.push(closing(f))`) calling close(). When the block ends by an exception (a
    stop signal's SystemExit, an error), a failure of close() is printed and the ending exception goes on: the exit
    status and the traceback stay those of what ended the run (a full disk at a SIGTERM stop ended it with status
    2, not 143). When the block ends normally, a failure of close() is raised."""
    def exit_callback(exc_type, exc, tb) -> bool:
        if exc_type is None:
            close()
            return False
        try:
            close()
        except Exception as error:  # whatever it is: it must not replace the exception in flight
            with contextlib.suppress(Exception):  # nor may a stderr that cannot be written either
                print(f"while the run ended ({exc_type.__name__}): {type(error).__name__}: {error}", file=sys.stderr,
                      flush=True)
        return False

    return exit_callback


def cannot_write(folder: Path, setting: str, other: str) -> Optional[str]:
    """None where a run can create files in folder (made if missing: a temp folder is created and removed), else
    the message naming the setting, the folder, the system's reason and the fix."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(prefix=".tmp-probe-", dir=folder))
        return None
    except OSError as error:
        reason = "a file, not a folder" if folder.exists() and not folder.is_dir() else error.strerror or str(error)
    return (f"{setting}: cannot write in {folder} ({reason}): make it a folder this user can write in, or choose "
            f"another {other}")


def isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # None (pythonw), a replaced or closed stream
        return False


class _Lines:
    """The progress bar's stream outside a terminal: each redraw (a carriage return, the bar, padding) becomes a
    line of its own, which a log file, tail -f and grep show."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_options(in_terminal: bool, stream=None) -> dict:
    """tqdm's options for the training bar on stderr (or `stream`). In a terminal, its default: redrawn in place.
    Elsewhere (a batch job's log file, as under Slurm) one line per redraw, at most every 30 seconds: the
    carriage-return redraws made a single line of megabytes (3.8 MB over 10k steps) that less and tail show as
    one."""
    if in_terminal:
        return {}
    return {"mininterval": 30.0, "maxinterval": 30.0, "file": _Lines(stream or sys.stderr)}
