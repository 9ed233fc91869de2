"""One configuration of a benchmark per fresh process: ``python SCRIPT --worker JSON`` runs it and prints its
result as the last line of its stdout. A fresh process gives each configuration its own peak memory (nothing
another left allocated or cached) and the allocator settings it asks for (``bench/_memory.py``'s worker_env)."""
import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional


def spawn(script, spec: dict, name: str, env: Optional[dict] = None, show_stderr: bool = False) -> dict:
    """The result dict ``python script --worker JSON(spec)`` prints last. show_stderr: its stderr (progress bars)
    goes to ours as it runs, instead of into the error raised when it fails; name: the configuration, for that
    error."""
    out = subprocess.run([sys.executable, str(script), "--worker", json.dumps(spec)], env=env, text=True,
                         stdout=subprocess.PIPE, stderr=None if show_stderr else subprocess.PIPE)
    if out.returncode != 0:
        detail = "its traceback is above" if show_stderr else f"its stderr ends:\n{out.stderr[-4000:]}"
        raise RuntimeError(f"worker {name} of {Path(script).name} failed with exit code {out.returncode}; {detail}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def add_worker_flag(parser: argparse.ArgumentParser) -> None:
    """The hidden ``--worker JSON`` flag by which spawn() hands a script its configuration."""
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)


def worker_or_none(args, body: Callable[[dict], dict]) -> bool:
    """In a worker process (``args.worker`` set): run ``body(spec)``, print its JSON line as spawn() reads it and
    return True; else False."""
    if not args.worker:
        return False
    print(json.dumps(body(json.loads(args.worker))))
    return True
