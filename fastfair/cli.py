"""How fastfair's command-line tools report a bad setting, path or input: the message alone, status 2."""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Callable, Iterator, Optional

from fastfair.optional import MissingPackage
from fastfair.process_group import OtherRankFailed
from fastfair.run_control import noticing_ctrl_c


@contextlib.contextmanager
def user_errors(prog: str, resume: Optional[str] = None) -> Iterator[None]:
    """Inside: a ValueError (fastfair raises them for bad input, with the fix in the message), an OSError (a path
    that is missing, a folder where a file goes, ...), a MissingPackage (the optional package a setting needs) or
    an OtherRankFailed (another process of the run failed, its error in its own output)
    exits with status 2 and ``prog: error: message`` on stderr, as argparse does (an ImportError of a broken
    installation keeps its traceback); FASTFAIR_TRACEBACK=1 re-raises it with its traceback (bitsandbytes' note
    on a hub kernel fastfair never uses is quieted where fastfair is imported: fastfair/__init__.py).
    Ctrl-C ends it with status 130 and ``prog: interrupted``, then ``resume`` (how to go on) when given."""
    def interrupted():
        print(f"{prog}: interrupted" + (f"; {resume}" if resume else ""), file=sys.stderr)
        raise SystemExit(130) from None

    with noticing_ctrl_c() as ctrl_c:
        try:
            yield
        except Exception as error:
            if os.environ.get("FASTFAIR_TRACEBACK") == "1":
                raise
            if ctrl_c.came:  # a Ctrl-C that a library turned into another exception: interrupted all the same
                interrupted()
            if not isinstance(error, (ValueError, OSError, MissingPackage, OtherRankFailed)):
                raise
            print(f"{prog}: error: {error}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            if os.environ.get("FASTFAIR_TRACEBACK") == "1":
                raise
            interrupted()


def folder_instead_of_file(flag: str, path: str, what: str, example: str) -> Optional[str]:
    """The message when ``path``, given as ``flag`` for a file to write, names a folder, or lies below a file
    (None otherwise): checked before the work, not found at the final save."""
    if path.endswith(os.sep) or os.path.isdir(path):
        return f"{flag} {path}: a folder; give the {what} file to write, e.g. {path.rstrip(os.sep)}{os.sep}{example}"
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):  # folders still to make: the first that exists must be a folder
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{flag} {path}: {parent} is a file, not a folder; give a path in a folder"
    return None


def file_instead_of_folder(flag: str, path, what: str) -> Optional[str]:
    """The message when ``path``, given as ``flag`` for a folder to write ``what`` in, is a file, lies below one,
    or lies where this process cannot write (None otherwise): checked before the work, not found at the end."""
    path = str(path)
    if not path:
        return f"{flag} '': give a folder for {what}"
    # not normalized: "a_file/../x" fails at mkdir, as the operating system walks it
    full = existing = os.path.join(os.getcwd(), path)
    while not os.path.exists(existing):  # folders still to make: the first that exists must be one to write in
        if os.path.islink(existing):
            return f"{flag} {path}: {existing} is a link to nothing; give a folder for {what}"
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        where = "a file" if existing == full.rstrip(os.sep) else f"{existing} is a file"
        return f"{flag} {path}: {where}; give a folder for {what}"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{flag} {path}: {existing} is not writable; give a folder you can write {what} in"
    return None


def device_problem(flag: str, device: str) -> Optional[str]:
    """The message when ``device``, given as ``flag``, is not a device torch can run on here (None otherwise):
    checked before the work, not found at the first tensor moved."""
    import torch

    try:
        where = torch.device(device)
    except RuntimeError:
        return f"{flag} {device}: not a device torch knows; e.g. cpu, cuda, cuda:1"
    if where.type == "cuda":
        if not torch.cuda.is_available():
            return f"{flag} {device}: CUDA is not available here (this torch: {torch.__version__}); use cpu"
        if where.index is not None and where.index >= torch.cuda.device_count():
            return f"{flag} {device}: this machine has {torch.cuda.device_count()} CUDA device(s), cuda:0 onwards"
    return None


def whole_number(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number written in ASCII digits (int() also reads other scripts' digits), at least
    ``minimum``."""
    def parse(text: str) -> int:
        if not (text.isascii() and text.isdigit()) or int(text) < minimum:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number >= {minimum}")
        return int(text)
    return parse
