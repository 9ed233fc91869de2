"""Where a training run's numbers and image grids go (rank 0 only).

- ``<output_dir>/metrics.jsonl``: one JSON line per logged step, ``{"step": N, name: value, ...}`` (a value that
  is not finite, a skipped step's loss, as null: strict JSON); written whatever is installed, so a run without
  tensorboard still keeps its curves;
- ``<output_dir>/images/step_<N:08d>.png``: the image grids (`image_file`), written by the trainer;
- tensorboard (``logging.tensorboard_dir``, default ``<output_dir>/tensorboard``) where it is installed; where
  it is not, a warning says so once, at the start.

A run resumed from step S has already logged steps past S before it stopped (up to its interruption): those
lines are dropped from metrics.jsonl, their image grids deleted, and tensorboard is told to purge them
(``purge_step``), so each step is logged once, by the run that kept its weights.

A write that fails (a full disk, a quota, a lost mount) ends the run with the file's name and the way on (the
checkpoints hold the run up to the last one), not a bare errno.
"""
from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path
from typing import Mapping, Optional

import numpy as np

METRICS_FILE = "metrics.jsonl"
IMAGES = "images"  # the image grids' folder in output_dir


def image_file(output_dir, step: int) -> Path:
    """Where the trainer writes step's image grid."""
    return Path(output_dir) / IMAGES / f"step_{step:08d}.png"


class RunLog:
    """``scalars(step, values)``, ``image(step, name, pixels)``, ``close()``; ``start``: the step the run
    continues from (0: a fresh run)."""

    def __init__(self, output_dir, tensorboard_dir: Optional[str], start: int):
        self.path = Path(output_dir) / METRICS_FILE
        self.tensorboard = tensorboard_dir or str(Path(output_dir) / "tensorboard")
        with naming_errors(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _drop_lines_after(self.path, start)
            self.file = open(self.path, "a", encoding="utf-8")
        _drop_images_after(Path(output_dir) / IMAGES, start)
        with naming_errors(self.tensorboard):
            self.writer = _summary_writer(self.tensorboard, start)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        with naming_errors(self.path):
            numbers = {k: float(v) for k, v in values.items()}
            self.file.write(json.dumps({"step": step, **{k: v if np.isfinite(v) else None
                                                         for k, v in numbers.items()}}) + "\n")
            self.file.flush()
        if self.writer is not None:
            with naming_errors(self.tensorboard):  # its writer thread's error surfaces at the next call
                for name, value in values.items():
                    self.writer.add_scalar(name, value, step)

    def image(self, step: int, name: str, pixels: np.ndarray) -> None:
        """pixels: uint8 [H, W, 3] (the PNG on disk is the trainer's; this adds it to tensorboard)."""
        if self.writer is not None:
            with naming_errors(self.tensorboard):
                self.writer.add_image(name, pixels, step, dataformats="HWC")

    def close(self) -> None:
        try:
            with naming_errors(self.path):
                self.file.close()
        finally:
            if self.writer is not None:
                with naming_errors(self.tensorboard):
                    self.writer.close()


def _unwritten(path, error: OSError) -> str:
    """The message for a run's file that could not be written: the file, the system's reason, the way on."""
    reason = error.strerror or str(error)
    return (f"{path} could not be written ({reason}): free space (or fix the folder), then resume=auto continues "
            "from the last checkpoint")


@contextlib.contextmanager
def naming_errors(path):
    """Re-raise an OSError in the block with `_unwritten`'s message (a full disk's bare errno names no file)."""
    try:
        yield
    except OSError as error:
        raise OSError(_unwritten(path, error)) from error


def last_logged_step(output_dir) -> Optional[int]:
    """The highest step output_dir's metrics.jsonl records (None: no such file or no step in it)."""
    path = Path(output_dir) / METRICS_FILE
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):  # none, or not a log this module wrote: nothing it would drop either
        return None
    steps = [step for step in map(_step, lines) if step is not None]
    return max(steps) if steps else None


def _drop_lines_after(path: Path, start: int) -> None:
    """Keep only the lines of steps <= start, and no line a crash cut off (it would run into the next one);
    rewritten atomically."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if line.endswith("\n") and (step := _step(line)) is not None and step <= start]
    if len(kept) == len(lines):
        return
    from fastfair.files import atomic_path  # imports torch: not at this module's import

    with atomic_path(str(path)) as temporary:  # a failed rewrite leaves no temporary file behind
        Path(temporary).write_text("".join(kept), encoding="utf-8")


def _drop_images_after(folder: Path, start: int) -> None:
    """Delete the image grids of steps past start (an interrupted run's, or one logged at another image_every)."""
    for path in folder.glob("step_*.png") if folder.is_dir() else ():
        step = path.stem[len("step_"):]
        if step.isdigit() and int(step) > start:
            with naming_errors(path):
                path.unlink()


def _step(line: str) -> Optional[int]:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def _summary_writer(folder: str, start: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        warnings.warn(f"tensorboard is not installed: the run's numbers go to {METRICS_FILE} in output_dir only "
                      "(pip install tensorboard, or fastfair[train], for its curves)", stacklevel=3)
        return None
    # purge_step: TensorBoard drops the steps the interrupted run logged past the checkpoint resumed from (all of
    # them for a run stopped before its first checkpoint, started afresh)
    return SummaryWriter(folder, purge_step=start + 1)
