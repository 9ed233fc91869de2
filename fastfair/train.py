"""Training entry point: ``python fastfair/train.py --config configs/<exp>.yaml [key=value ...]``, also under
``torchrun`` (and the ``deepspeed`` launcher).

Run as a script, Python puts this file's folder (``fastfair/``) first on sys.path, where ``evaluate.py`` and
friends would shadow packages that libraries import (DESIGN.md, pitfalls): drop it before importing anything,
and put the current folder there instead, as ``python -m`` does, so that a config's hook module beside the run
(``myhooks:detect``) imports in every launcher's ranks alike.
"""
import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
if os.getcwd() != _here:
    sys.path.insert(0, os.getcwd())

from fastfair.cli import user_errors  # noqa: E402
from fastfair.trainer import main  # noqa: E402

if __name__ == "__main__":
    with user_errors("fastfair/train.py"):
        main()
