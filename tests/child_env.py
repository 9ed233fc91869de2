"""The environment of a test's child process (a training script, torchrun): this one's, with tests/ put first on
PYTHONPATH, not in place of it (a --target install such as the GPU machine's /tmp/site lives there)."""
import os
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def child_env(**extra: str) -> dict:
    inherited = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS)] + ([inherited] if inherited else [])), **extra)
